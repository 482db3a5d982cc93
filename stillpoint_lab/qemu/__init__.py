"""The lab hypervisor's QEMU layer: one QEMU process per lab VM, and the vSphere VM
operations done on it the way ESXi does them (docs/lab-hypervisor.md, ../shared/LAB-QEMU.md).

Abstractions, bottom up:
    accel      KVM only where the CPU has vmx/svm, else TCG with a bounded code cache
    qmp.QMP    a QMP connection: execute(cmd, **args) with a timeout, an event queue,
               QMPError(cls, desc)
    qga.QGA    the guest agent (VMware Tools' role): resync, ping, fsfreeze, file read,
               exec, network interfaces, host name
    disks      a datastore disk = raw `<vm>-flat.vmdk` + metadata-only qcow2 beside it
               holding the persistent dirty bitmaps; qemu-img helpers for offline work
    machine    `Machine`: one QEMU process (argv, sockets, serial log, start / quit /
               kill / reset), tap helpers, `kill_all` for teardown
    cbt        changeIds, extent lists (merge, clip, 64 KiB alignment), paging,
               allocated areas of a flat file
    nbd_bitmap dirty bitmaps read over QEMU's NBD server with libnbd
    offline    a powered-off VM's snapshots, bitmap checks and NBD exports (qemu-img,
               qemu-nbd)
    host_vm    `HostVM`: power, snapshots (external, one QMP transaction), consolidation,
               QueryChangedDiskAreas from dirty bitmaps, CBT resets, guest identity, NBD
               export of a snapshot; state in `<run dir>/state.json`. Faults are
               `HostFault(fault_class, message)` with a vim fault class.
"""

from stillpoint_lab.qemu.host_vm import FAULTS, HostFault, HostVM, PowerOnSpec, VMDisk

__all__ = ["FAULTS", "HostFault", "HostVM", "PowerOnSpec", "VMDisk"]
