"""Snapshots: create, remove, find ours, consolidate, and list a snapshot's disks.

Our snapshots are named `stillpoint-<job id>` so that a later run can find and remove
the ones a crashed run left behind (`find_snapshots`). A snapshot's disks are read from
the snapshot's own config (snapshot.config.hardware.device), whose backings name the
point-in-time files and carry the CBT changeId of that point in time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pyVmomi import vim, vmodl

from appliance.datastore import SnapshotDisk
from appliance.errors import NotFound, VSphereError
from appliance.vsphere.inventory import (
    SnapshotInfo,
    datacenter_of,
    datastore_of,
    flatten_snapshots,
    inventory_path,
)
from appliance.vsphere.props import retrieve_one
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.tasks import TaskFailed, fault_message, wait_for_task

__all__ = [
    "SNAPSHOT_PREFIX",
    "SnapshotDisk",
    "SnapshotRef",
    "consolidate_if_needed",
    "create_snapshot",
    "find_snapshots",
    "remove_abandoned_snapshot",
    "remove_snapshot",
    "remove_stale_snapshots",
    "snapshot_disks",
]

SNAPSHOT_PREFIX = "stillpoint-"


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot of a VM: what jobs hold between create and remove."""

    moref: str
    name: str
    vm_moref: str
    snapshot: Any  # vim.vm.Snapshot
    vm: Any  # vim.VirtualMachine
    create_time: datetime | None = None


def _mo_error(what: str, err: vmodl.MethodFault) -> VSphereError:
    return VSphereError(f"{what}: {type(err).__name__}: {fault_message(err)}")


def create_snapshot(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    name: str,
    description: str = "",
    quiesce: bool = False,
    memory: bool = False,
    timeout: float = 600.0,
    windows_vss: bool = False,
) -> SnapshotRef:
    """Create a snapshot and wait for it (TaskTimeout after `timeout` s, task left running:
    the caller decides whether to wait on or to remove what it made).

    windows_vss: VMware Tools drives VSS in the guest with a COPY-type backup
    (CreateSnapshotEx_Task with a WindowsQuiesceSpec), so no application truncates its logs
    before our restore point is committed; servers without CreateSnapshotEx_Task get a
    plain quiesced snapshot. ApplicationQuiesceFault / FilesystemQuiesceFault come back as
    TaskFailed with that fault name, which the job retries like a failed writer."""
    try:
        if windows_vss:
            task = _create_vss_snapshot_task(vm, name, description, vss_minutes(timeout))
        else:
            task = vm.CreateSnapshot_Task(
                name=name, description=description, memory=memory, quiesce=quiesce
            )
    except vmodl.MethodFault as err:
        raise _mo_error(f"snapshot {name} of {vm._moId}", err) from err
    result = wait_for_task(session, task, timeout, what=f"snapshot {name} of {vm._moId}")
    if isinstance(result, vim.vm.Snapshot):
        snap = result
    else:  # some servers return no result: find it by name, the newest wins
        mine = [s for s in find_snapshots(session, vm, prefix=name) if s.name == name]
        if not mine:
            raise VSphereError(f"snapshot {name} of {vm._moId} was created but cannot be found")
        return mine[-1]
    return SnapshotRef(snap._moId, name, vm._moId, snap, vm)


VSS_BT_COPY = 5  # VSS_BACKUP_TYPE: a copy backup, no log truncation by the writers


def vss_minutes(task_timeout_s: float) -> int:
    """WindowsQuiesceSpec.timeout (minutes) for a task we wait `task_timeout_s` for: a minute
    less, so that VMware Tools gives up (and thaws) before we stop waiting."""
    return max(1, int(task_timeout_s // 60) - 1)


def _create_vss_snapshot_task(vm: vim.VirtualMachine, name: str, description: str,
                              minutes: int) -> Any:
    spec = vim.vm.WindowsQuiesceSpec(timeout=minutes, vssBackupType=VSS_BT_COPY,
                                     vssBootableSystemState=True, vssPartialFileSupport=False,
                                     vssBackupContext="ctx_backup")
    try:
        return vm.CreateSnapshotEx_Task(name=name, description=description, memory=False,
                                        quiesceSpec=spec)
    except (vmodl.fault.MethodNotFound, vmodl.fault.NotSupported):
        return vm.CreateSnapshot_Task(name=name, description=description, memory=False,
                                      quiesce=True)


def remove_snapshot(
    session: VSphereSession,
    snapshot: SnapshotRef,
    consolidate: bool = True,
    timeout: float = 1800.0,
) -> None:
    """Remove one snapshot (its children are kept); NotFound if it is already gone."""
    what = f"removing snapshot {snapshot.name} ({snapshot.moref}) of {snapshot.vm_moref}"
    try:
        task = snapshot.snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=consolidate)
    except vmodl.fault.ManagedObjectNotFound as err:
        raise NotFound(f"snapshot {snapshot.moref} of {snapshot.vm_moref} is already gone") from err
    except vmodl.MethodFault as err:
        raise _mo_error(what, err) from err
    wait_for_task(session, task, timeout, what=what)


def find_snapshots(
    session: VSphereSession, vm: vim.VirtualMachine, prefix: str = SNAPSHOT_PREFIX
) -> list[SnapshotRef]:
    """The VM's snapshots whose name starts with `prefix`, oldest first."""
    tree = retrieve_one(session, vm, ["snapshot"]).get("snapshot")
    infos: list[SnapshotInfo] = flatten_snapshots(tree)
    refs = [
        SnapshotRef(
            i.moref, i.name, vm._moId, vim.vm.Snapshot(i.moref, session.si._stub), vm, i.create_time
        )
        for i in infos
        if i.name.startswith(prefix)
    ]
    return sorted(refs, key=lambda r: (r.create_time is None, r.create_time or 0, r.moref))


def remove_abandoned_snapshot(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    task_id: str,
    timeout: float = 600.0,
    name: str | None = None,
) -> int:
    """Undo a snapshot that missed its budget (create_snapshot raised TaskTimeout, whose
    `task_id` this is): cancel the task if vCenter still allows it, wait for it to end
    either way, and remove the snapshot it made (its result; and, given `name`, any
    snapshot so named, for servers that report no result). Returns how many were removed."""
    task = vim.Task(task_id, session.si._stub)
    try:
        task.CancelTask()
    except vmodl.MethodFault:
        pass  # not cancelable any more (or already done): wait for it instead
    made = None
    try:
        made = wait_for_task(session, task, timeout, what=f"abandoned snapshot task {task_id}")
    except TaskFailed:
        pass  # cancelled or failed: no snapshot came of it
    targets = {}
    if isinstance(made, vim.vm.Snapshot):
        targets[made._moId] = SnapshotRef(made._moId, name or made._moId, vm._moId, made, vm)
    if name is not None:
        targets.update(
            {s.moref: s for s in find_snapshots(session, vm, prefix=name) if s.name == name}
        )
    removed = 0
    for snap in targets.values():
        try:
            remove_snapshot(session, snap, timeout=timeout)
            removed += 1
        except NotFound:
            continue
    return removed


def remove_stale_snapshots(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    prefix: str = SNAPSHOT_PREFIX,
    keep: frozenset[str] = frozenset(),
    timeout: float = 1800.0,
) -> list[str]:
    """Remove our snapshots left by crashed runs (names starting with `prefix`, except
    those in `keep`), oldest first, then consolidate if vSphere asks for it. Returns the
    names removed."""
    removed = []
    for snap in find_snapshots(session, vm, prefix=prefix):
        if snap.name in keep:
            continue
        try:
            remove_snapshot(session, snap, timeout=timeout)
        except NotFound:
            continue  # removed meanwhile (e.g. by a concurrent run)
        removed.append(snap.name)
    consolidate_if_needed(session, vm, timeout=timeout)
    return removed


def consolidate_if_needed(
    session: VSphereSession, vm: vim.VirtualMachine, timeout: float = 3600.0
) -> bool:
    """Consolidate the VM's disks when vSphere says so; True if it did."""
    if not retrieve_one(session, vm, ["runtime.consolidationNeeded"]).get(
        "runtime.consolidationNeeded"
    ):
        return False
    try:
        task = vm.ConsolidateVMDisks_Task()
    except vmodl.MethodFault as err:
        raise _mo_error(f"consolidating disks of {vm._moId}", err) from err
    wait_for_task(session, task, timeout, what=f"consolidating disks of {vm._moId}")
    return True


def snapshot_disks(session: VSphereSession, snapshot: SnapshotRef) -> list[SnapshotDisk]:
    """The snapshot's virtual disks (flat-file backed), by device key order."""
    try:
        props = retrieve_one(session, snapshot.snapshot, ["config.hardware.device"])
    except NotFound as err:
        raise NotFound(f"snapshot {snapshot.moref} of {snapshot.vm_moref} not found") from err
    dc_path = inventory_path(session, datacenter_of(session, snapshot.vm))
    disks = []
    for d in props.get("config.hardware.device") or []:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        file_name = getattr(d.backing, "fileName", None)
        if not file_name:
            raise VSphereError(
                f"disk {d.key} of snapshot {snapshot.moref} has no file backing "
                f"({type(d.backing).__name__}); it cannot be backed up"
            )
        disks.append(
            SnapshotDisk(
                key=d.key,
                label=d.deviceInfo.label if d.deviceInfo else str(d.key),
                capacity=int(d.capacityInBytes or d.capacityInKB * 1024),
                file_name=file_name,
                change_id=getattr(d.backing, "changeId", None) or None,
                datastore=datastore_of(file_name),
                datacenter=dc_path,
                vm_moref=snapshot.vm_moref,
                snapshot_moref=snapshot.moref,
            )
        )
    return sorted(disks, key=lambda x: x.key)
