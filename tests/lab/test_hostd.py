"""hostd (stillpoint_lab/hostd.py) behind the simulator, through pyVmomi.

Two labs (id 7, each in its own state directory, one after the other):

- TestDelegation: the simulator with an in-process hostd whose HostVM is a fake (what the
  simulator asks, faults it must map: consolidation, FileFault, sandbox networking, guest
  reports, destroy of a running VM); quick.
- TestQEMU: the simulator with the real hostd process and one QEMU-backed VM without an OS
  (a blank disk: enough for power, external snapshots and dirty-bitmap CBT), writes made
  through HMP qemu-io; and a VM on the simulator's own captured snapshots beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from stillpoint_lab import hostd as hostd_mod
from stillpoint_lab import hostd_net
from stillpoint_lab.config import LabConfig
from stillpoint_lab.shell import sh
from stillpoint_lab.vcsim import VcsimDisk, VcsimHandle, VcsimVM, start_vcsim

pytestmark = pytest.mark.lab

LAB_ID = 7
MiB = 1 << 20
BLOCK = 64 * 1024
SPAN_CAP = 16 * MiB
DISK = 64 * MiB

if os.geteuid() != 0:
    pytest.skip("hostd needs root (taps, bridges, QEMU)", allow_module_level=True)


# --- helpers ----------------------------------------------------------------------------------


def connect(lab: VcsimHandle) -> Any:
    return SmartConnect(host=lab.host, port=lab.port, user=lab.user, pwd=lab.password,
                        sslContext=lab.ssl_context())


def find_vm(si: Any, name: str) -> Any:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            if vm.name == name:
                return vm
    finally:
        view.Destroy()
    raise AssertionError(f"VM {name} not found")


def disks_of(config: Any) -> list[Any]:
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def mac_of(vm: Any) -> str:
    return next(d.macAddress for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualEthernetCard))


def wait(task: Any) -> Any:
    WaitForTask(task)
    return task.info.result


def snapshot(vm: Any, name: str, *, quiesce: bool = False) -> Any:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=quiesce)
    snap = wait(task)
    assert task.info.entity == vm
    return snap


def enable_cbt(vm: Any) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))


def query_all(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
    """Page QueryChangedDiskAreas as a backup does, checking the paging invariants."""
    areas, offset = [], 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset,
                                        changeId=change_id)
        assert info.startOffset == offset and 0 < info.length <= SPAN_CAP
        for a in info.changedArea:
            assert offset <= a.start and a.start + a.length <= offset + info.length
            areas.append((a.start, a.length))
        offset += info.length
    assert offset == capacity
    return areas


def covered(areas: list[tuple[int, int]]) -> set[int]:
    return {b for s, n in areas for b in range(s // BLOCK, -(-(s + n) // BLOCK))}


def wait_for(what: str, fn: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def links() -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(sh(["ip", "-j", "-d", "link"]).stdout)}


def teardown_network(cfg: LabConfig) -> None:
    hostd_net.remove_lab_taps(cfg)
    hostd_net.remove_lab_bridge(cfg)


def create_vm(si: Any, name: str, extra: dict[str, str]) -> Any:
    """A VM made through the API, as a restore makes one: disk, NIC, extraConfig."""
    content = si.RetrieveContent()
    dc = content.rootFolder.childEntity[0]
    cluster = dc.hostFolder.childEntity[0]
    devices = [
        vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.ParaVirtualSCSIController(
            key=1000, busNumber=0, sharedBus="noSharing")),
        vim.vm.device.VirtualDeviceSpec(
            operation="add", fileOperation="create", device=vim.vm.device.VirtualDisk(
                key=-1, controllerKey=1000, unitNumber=0, capacityInKB=8 * 1024,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[LocalDS_0] {name}/{name}.vmdk", diskMode="persistent"))),
        vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualVmxnet3(
            key=-2, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName="VM Network"))),
    ]
    spec = vim.vm.ConfigSpec(name=name, guestId="debian12_64Guest", memoryMB=256, numCPUs=1,
                             files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"), deviceChange=devices,
                             extraConfig=[vim.option.OptionValue(key=k, value=v)
                                          for k, v in extra.items()])
    return wait(dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool))


# --- a fake HostVM: what the simulator asks, faults on demand -----------------------------------


class FakeFault(Exception):
    def __init__(self, fault_class: str, message: str) -> None:
        self.fault_class, self.message = fault_class, message
        super().__init__(message)


class FakeHostVM:
    made: dict[str, "FakeHostVM"] = {}

    def __init__(self, name: str, run_dir: Path, *, lab: str) -> None:
        self.name, self.run_dir, self.lab = name, Path(run_dir), lab
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.running = False
        self.spec: Any = None
        self.snap: str | None = None
        self.seq, self.epoch = 0, "ep1"
        self.pending = False
        self.fail_remove = False
        self.snapshot_delay_s = 0.0
        self.identity: dict[str, Any] = {"tools_running": False, "ip": None, "hostname": None}
        self.calls: list[str] = []
        FakeHostVM.made[name] = self

    def power_on(self, spec: Any) -> dict[str, Any]:
        self.calls.append("power_on")
        if self.running:
            raise FakeFault("InvalidState", "already on")
        self.spec, self.running = spec, True
        return {"pid": 4242}

    def power_off(self) -> dict[str, Any]:
        self.calls.append("power_off")
        if not self.running:
            raise FakeFault("InvalidState", "already off")
        self.running = False
        return {}

    def reset(self) -> dict[str, Any]:
        self.calls.append("reset")
        return {}

    def status(self) -> dict[str, Any]:
        return {"running": self.running, "pid": 4242 if self.running else None,
                "consolidation_needed": self.pending, "snapshot": self.snap,
                "cbt_epoch": self.epoch}

    def snapshot_create(self, snapshot_id: str, *, quiesce: bool, cbt: bool) -> dict[str, Any]:
        self.calls.append(f"snapshot_create {snapshot_id} quiesce={quiesce} cbt={cbt}")
        time.sleep(self.snapshot_delay_s)
        if self.snap is not None:
            raise FakeFault("SnapshotFault", "one at a time")
        self.seq += 1
        self.snap = snapshot_id
        return {"disks": [{"key": d.key, "frozen_flat": str(d.flat),
                           "change_id": f"{self.epoch}/{self.seq}" if cbt else None}
                          for d in self.spec.disks],
                "timings_ms": {"freeze": 0.0, "snapshot": 1.0, "thaw": 0.0}}

    def snapshot_remove(self, snapshot_id: str) -> dict[str, Any]:
        self.calls.append(f"snapshot_remove {snapshot_id}")
        if self.snap != snapshot_id:
            raise FakeFault("NotFound", "no such snapshot")
        self.snap = None
        if self.fail_remove:
            self.pending = True
            raise FakeFault("SnapshotFault", "block-commit failed: injected")
        return {}

    def consolidate(self) -> dict[str, Any]:
        self.calls.append("consolidate")
        self.pending = False
        return {}

    def cbt_query(self, snapshot_id: str, key: int, start: int, change_id: str,
                  span_cap: int | None) -> dict[str, Any]:
        self.calls.append(f"cbt_query {snapshot_id} {key} {start} {change_id} {span_cap}")
        if not change_id.startswith(self.epoch + "/") and change_id != "*":
            raise FakeFault("FileFault", f"changeId {change_id} is from another epoch")
        capacity = next(d.capacity_bytes for d in self.spec.disks if d.key == key)
        length = min(span_cap or capacity, capacity - start)
        areas = [[start, BLOCK]] if start == 0 else []
        return {"start_offset": start, "length": length, "areas": areas}

    def cbt_reset(self) -> dict[str, Any]:
        self.calls.append("cbt_reset")
        self.epoch = "ep2"
        return {}

    def guest_identity(self) -> dict[str, Any]:
        return dict(self.identity)

    def debug_qemu_io(self, key: int, command: str) -> str:
        self.calls.append(f"qemu-io {key} {command}")
        return "wrote 512/512 bytes"


@pytest.fixture(scope="class")
def fake_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VcsimHandle, hostd_mod.Hostd]]:
    cfg = LabConfig(lab_id=LAB_ID, lab_root=str(tmp_path_factory.mktemp("hostd-fake")), vms=())
    teardown_network(cfg)
    FakeHostVM.made.clear()
    vc = start_vcsim(cfg, cfg.state_dir, [
        VcsimVM("qvm", hypervisor="qemu", memory_mib=256, cpus=1, disks=(VcsimDisk(8 * MiB),)),
        VcsimVM("fvm", ip="10.77.7.99", hostname="fvm", disks=(VcsimDisk(8 * MiB),)),
    ], span_cap_bytes=4 * MiB, hostd_socket=hostd_mod.socket_path(cfg))
    settings = hostd_mod.HostdSettings(
        lab_id=cfg.lab_id, lab_root=cfg.lab_root, vcsim_url=vc.base_url(),
        ca_cert=str(vc.cert_pem_path), lab_token_file=str(vc.lab_token_path), lab_vms={},
        network=True, poll_s=0.1)
    hostd = hostd_mod.Hostd(settings, factory=FakeHostVM)
    server = hostd_mod.serve(hostd, hostd_mod.socket_path(cfg))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield vc, hostd
    finally:
        server.shutdown()
        server.server_close()
        hostd.shutdown(power_off=True)
        vc.stop()
        teardown_network(cfg)


class TestDelegation:
    def test_power_guest_identity_and_power_off(self, fake_lab: Any) -> None:
        vc, hostd = fake_lab
        si = connect(vc)
        try:
            vm = find_vm(si, "qvm")
            assert vc.vms["qvm"].hypervisor == "qemu" and vc.vms["fvm"].hypervisor == "files"
            assert vm.runtime.powerState == "poweredOff"   # QEMU-backed VMs start off
            assert not vm.guest.ipAddress
            wait(vm.PowerOnVM_Task())
            assert vm.runtime.powerState == "poweredOn"
            fake = FakeHostVM.made["qvm"]
            spec = fake.spec
            assert [(d.key, d.flat, d.capacity_bytes) for d in spec.disks] == [
                (2000, vc.vms["qvm"].disks[0].flat_file, 8 * MiB)]
            assert spec.mac == mac_of(vm) and spec.memory_mib == 256 and spec.cpus == 1
            assert spec.uuid == vm.config.uuid
            assert spec.tap == "sp7t20" and spec.identity["ip_cidr"] == "10.77.7.30/24"
            assert spec.identity["gateway"] == "10.77.7.1"
            tap = links()["sp7t20"]
            assert tap["master"] == "spbr7"
            with pytest.raises(vim.fault.InvalidPowerState):
                wait(vm.PowerOnVM_Task())

            # the guest agent's answers become vSphere's guest facts
            fake.identity = {"tools_running": True, "ip": "10.77.7.30", "hostname": "qvm.lab"}
            wait_for("guest.ipAddress", lambda: vm.guest.ipAddress == "10.77.7.30")
            assert vm.guest.toolsRunningStatus == "guestToolsRunning"
            assert vm.guest.hostName == "qvm.lab"
            assert vm.guest.net[0].ipAddress == ["10.77.7.30"]
            assert vm.guest.net[0].macAddress == mac_of(vm)
            status = hostd_mod.call(vc_cfg(vc), "/vm/status", {"vm": "qvm"})
            assert status["running"] and status["ip"] == "10.77.7.30" and status["index"] == 20

            wait(vm.ResetVM_Task())
            assert "reset" in fake.calls and vm.runtime.powerState == "poweredOn"
            wait(vm.PowerOffVM_Task())
            assert vm.runtime.powerState == "poweredOff" and not fake.running
            assert vm.guest.toolsRunningStatus == "guestToolsNotRunning"
            assert not vm.guest.ipAddress
            assert "sp7t20" not in links()
        finally:
            Disconnect(si)

    def test_snapshots_cbt_and_consolidation(self, fake_lab: Any) -> None:
        vc, _ = fake_lab
        si = connect(vc)
        try:
            vm = find_vm(si, "qvm")
            wait(vm.PowerOnVM_Task())
            fake = FakeHostVM.made["qvm"]
            enable_cbt(vm)
            fake.snapshot_delay_s = 0.5
            task = vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=True)
            assert task.info.state in ("queued", "running")   # asynchronous, as before
            snap = wait(task)
            fake.snapshot_delay_s = 0.0
            assert task.info.entity == vm
            disk = disks_of(snap.config)[0]
            assert disk.backing.fileName == "[LocalDS_0] qvm/qvm.vmdk"   # its extent: the frozen flat
            assert disk.backing.changeId == "ep1/1"
            assert any(c.endswith("quiesce=True cbt=True") for c in fake.calls)
            # a second snapshot while one exists: hostd's SnapshotFault reaches the client
            with pytest.raises(vim.fault.SnapshotFault):
                snapshot(vm, "s2")

            info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0,
                                            changeId="ep1/1")
            assert (info.startOffset, info.length) == (0, 4 * MiB)
            assert [(a.start, a.length) for a in info.changedArea] == [(0, BLOCK)]
            assert fake.calls[-1] == f"cbt_query {vc.vms['qvm'].moref}-1 2000 0 ep1/1 {4 * MiB}"
            vc.set_knobs("qvm", cbt_reset=True)
            assert fake.calls[-1] == "cbt_reset"
            with pytest.raises(vim.fault.FileFault):
                vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0,
                                         changeId="ep1/1")

            # a failed commit: the snapshot is gone, the VM needs consolidation
            fake.fail_remove = True
            task = snap.RemoveSnapshot_Task(removeChildren=False)
            with pytest.raises(vim.fault.SnapshotFault):
                WaitForTask(task)
            assert task.info.entity == vm
            assert "block-commit failed" in task.info.error.msg
            assert vm.snapshot is None
            assert vm.runtime.consolidationNeeded is True
            assert (vc.datastore_dir / "qvm" / "qvm-flat.vmdk").exists()  # the base is hostd's
            fake.fail_remove = False
            wait(vm.ConsolidateVMDisks_Task())
            assert fake.calls[-1] == "consolidate"
            assert vm.runtime.consolidationNeeded is False

            snap = snapshot(vm, "s3")
            wait(vm.RemoveAllSnapshots_Task())
            assert vm.snapshot is None and fake.snap is None
            # CBT switched off: hostd drops its changeIds too
            WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
            assert fake.calls[-1] == "cbt_reset"
            # the guest shuts itself down (QEMU exits): hostd tells the simulator
            fake.running = False
            wait_for("poweredOff", lambda: vm.runtime.powerState == "poweredOff")
            assert "sp7t20" not in links() and not vm.guest.ipAddress
        finally:
            Disconnect(si)

    def test_restored_vm_is_qemu_backed_sandboxed_and_destroyed_running(
            self, fake_lab: Any) -> None:
        vc, hostd = fake_lab
        si = connect(vc)
        try:
            vm = create_vm(si, "restored", {"stillpoint.sandbox": "1",
                                            "guestinfo.stillpoint.restore": '{"rp": 1}'})
            wait(vm.PowerOnVM_Task())
            fake = FakeHostVM.made["restored"]
            assert fake.spec.guestinfo == {"guestinfo.stillpoint.restore": '{"rp": 1}'}
            assert fake.spec.tap == "sp7t20"   # qvm is off: its index is free again
            tap = links()["sp7t20"]
            assert tap["master"] == "spsb7"
            assert tap["linkinfo"]["info_slave_data"]["isolated"] is True
            route = sh(["ip", "route", "show", "10.77.7.30/32"]).stdout
            assert "dev spsb7" in route and "src 10.77.7.1" in route
            assert sh(["sysctl", "-n", "net.ipv4.conf.spsb7.forwarding"]).stdout.strip() == "0"
            wait(vm.Destroy_Task())
            assert fake.calls[-1] == "power_off" and not fake.running
            assert not hostd_mod.vm_dir(vc_cfg(vc), "restored").exists()
            assert "sp7t20" not in links()
            assert not sh(["ip", "route", "show", "10.77.7.30/32"]).stdout.strip()
        finally:
            Disconnect(si)

    def test_files_vm_keeps_captures_and_debug_needs_the_token(self, fake_lab: Any) -> None:
        vc, _ = fake_lab
        si = connect(vc)
        try:
            vm = find_vm(si, "fvm")
            assert vm.runtime.powerState == "poweredOn" and vm.guest.ipAddress == "10.77.7.99"
            enable_cbt(vm)
            snap = snapshot(vm, "f1")
            disk = disks_of(snap.config)[0]
            assert disk.backing.fileName == "[LocalDS_0] fvm/fvm-000001.vmdk"   # a capture
            assert disk.backing.changeId.startswith("52 ")
            wait(snap.RemoveSnapshot_Task(removeChildren=False))
            wait(vm.PowerOffVM_Task())
            wait(vm.PowerOnVM_Task())
            assert "fvm" not in FakeHostVM.made   # hostd never heard of it
        finally:
            Disconnect(si)
        cfg = vc_cfg(vc)
        with pytest.raises(hostd_mod.HostdError) as err:
            hostd_mod.call(cfg, "/debug/qemu-io", {"vm": "qvm", "key": 2000, "command": "x"})
        assert err.value.fault == "NotAuthenticated" and err.value.status == 401
        with pytest.raises(hostd_mod.HostdError):
            hostd_mod.call(cfg, "/debug/qemu-io", {"vm": "qvm", "key": 2000, "command": "x"},
                           token="wrong")
        out = hostd_mod.call(cfg, "/debug/qemu-io",
                             {"vm": "qvm", "key": 2000, "command": "write 0 512"},
                             token=vc.lab_token)
        assert out == {"output": "wrote 512/512 bytes"}
        with pytest.raises(hostd_mod.HostdError) as err:
            hostd_mod.call(cfg, "/vm/power-on", {"vm": "../etc"})
        assert err.value.fault == "InvalidArgument"
        with pytest.raises(hostd_mod.HostdError) as err:
            hostd_mod.call(cfg, "/no/such/call", {})
        assert err.value.fault == "NotFound" and err.value.status == 404
        assert hostd_mod.socket_path(cfg).stat().st_mode & 0o777 == 0o600


def vc_cfg(vc: VcsimHandle) -> LabConfig:
    """The lab config a VcsimHandle of these tests was started with."""
    return LabConfig(lab_id=LAB_ID, lab_root=str(vc.state_dir.parent), vms=())


# --- the real thing: hostd's process, QEMU --------------------------------------------------------


@pytest.fixture(scope="class")
def qemu_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimHandle]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing (install-deps installs QEMU)")
    cfg = LabConfig(lab_id=LAB_ID, lab_root=str(tmp_path_factory.mktemp("hostd-qemu")), vms=())
    teardown_network(cfg)
    vc = start_vcsim(cfg, cfg.state_dir, [
        VcsimVM("qvm1", hypervisor="qemu", memory_mib=128, cpus=1, disks=(VcsimDisk(DISK),)),
        VcsimVM("fvm1", ip="10.77.7.98", hostname="fvm1", disks=(VcsimDisk(16 * MiB),)),
    ], span_cap_bytes=SPAN_CAP, hostd_socket=hostd_mod.socket_path(cfg))
    try:
        hostd_mod.start_hostd(cfg, vcsim_url=vc.base_url(), ca_cert=vc.cert_pem_path,
                              lab_token_file=vc.lab_token_path, lab_vms={"qvm1": 0}, poll_s=0.5)
        yield vc
    finally:
        hostd_mod.stop_hostd(cfg)
        vc.stop()
        from stillpoint_lab.qemu.machine import kill_all, process_title

        kill_all(process_title(hostd_mod.qemu_lab_name(cfg), ""))
        teardown_network(cfg)


def qemu_io(vc: VcsimHandle, command: str) -> str:
    out = hostd_mod.call(vc_cfg(vc), "/debug/qemu-io",
                         {"vm": "qvm1", "key": 2000, "command": command}, token=vc.lab_token)
    # qemu-io reports to QEMU's stdout; the monitor shows only errors (e.g. no such device)
    assert out["output"].strip() in ("",) or "wrote" in out["output"], out
    return str(out["output"])


def alive(pid: int) -> bool:
    try:
        return "qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


class TestQEMU:
    def test_power_snapshots_cbt_on_a_real_qemu(self, qemu_lab: VcsimHandle) -> None:
        vc = qemu_lab
        cfg = vc_cfg(vc)
        flat = vc.vms["qvm1"].disks[0].flat_file
        si = connect(vc)
        timings: dict[str, float] = {}

        def timed(name: str, fn: Any) -> Any:
            t0 = time.monotonic()
            out = fn()
            timings[name] = round((time.monotonic() - t0) * 1000, 1)
            return out

        try:
            vm = find_vm(si, "qvm1")
            enable_cbt(vm)
            timed("power_on", lambda: wait(vm.PowerOnVM_Task()))
            status = hostd_mod.call(cfg, "/vm/status", {"vm": "qvm1"})
            pid = status["pid"]
            assert status["running"] and alive(pid)
            assert status["index"] == 0 and status["tap"] == "sp7t0"   # the lab VM's own index
            assert links()["sp7t0"]["master"] == "spbr7"
            assert vm.runtime.powerState == "poweredOn"
            # what the guest reads from its hypervisor: 0600 files, only their paths in argv
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            fw = dict(a.removeprefix("name=").split(",file=", 1) for a in argv
                      if a.startswith("name=opt/stillpoint/"))
            identity = Path(fw["opt/stillpoint/lab-identity"])
            assert identity.stat().st_mode & 0o777 == 0o600
            assert json.loads(identity.read_text())["ip_cidr"] == "10.77.7.10/24"
            assert json.loads(identity.read_text())["gateway"] == "10.77.7.1"
            assert json.loads(Path(fw["opt/stillpoint/guestinfo"]).read_text()) == {}

            snap1 = timed("snapshot_1", lambda: snapshot(vm, "b1"))
            disk1 = disks_of(snap1.config)[0]
            assert disk1.backing.fileName == "[LocalDS_0] qvm1/qvm1.vmdk"
            change1 = disk1.backing.changeId
            assert change1 and "/" in change1

            # the guest's writes (HMP qemu-io on the device) go to the delta: the base is frozen
            frozen = flat.read_bytes()
            qemu_io(vc, "write -P 0xab 1048576 65536")         # block 16
            qemu_io(vc, "write -P 0xcd 10489856 512")          # block 160, mid-block
            qemu_io(vc, f"write -P 0xef {DISK - 4096} 4096")   # the last block
            assert flat.read_bytes() == frozen
            timed("remove_1", lambda: wait(snap1.RemoveSnapshot_Task(removeChildren=False)))
            assert hostd_mod.call(cfg, "/vm/status", {"vm": "qvm1"})["running"] and alive(pid)
            assert vm.runtime.consolidationNeeded is False

            snap2 = timed("snapshot_2", lambda: snapshot(vm, "b2"))
            change2 = disks_of(snap2.config)[0].backing.changeId
            assert change2 != change1 and change2.split("/")[0] == change1.split("/")[0]
            data = flat.read_bytes()   # the commit put the writes into the base
            assert data[1048576:1048576 + 65536] == b"\xab" * 65536
            assert data[10489856:10489856 + 512] == b"\xcd" * 512
            assert data[-4096:] == b"\xef" * 4096
            areas = timed("query_changed", lambda: query_all(vm, snap2, 2000, change1, DISK))
            blocks = covered(areas)
            assert {16, 160, DISK // BLOCK - 1} <= blocks
            assert len(blocks) <= 8, areas   # the writes, not the disk
            assert query_all(vm, snap2, 2000, change2, DISK) == []
            timed("remove_2", lambda: wait(snap2.RemoveSnapshot_Task(removeChildren=False)))

            # the cbt_reset knob: the old changeId is refused, a full backup is due
            vc.set_knobs("qvm1", cbt_reset=True)
            snap3 = snapshot(vm, "b3")
            with pytest.raises(vim.fault.FileFault):
                vm.QueryChangedDiskAreas(snapshot=snap3, deviceKey=2000, startOffset=0,
                                         changeId=change2)
            assert query_all(vm, snap3, 2000, "*", DISK)   # the allocated areas still answer
            wait(vm.RemoveAllSnapshots_Task())
            assert vm.snapshot is None and alive(pid)

            timed("power_off", lambda: wait(vm.PowerOffVM_Task()))
            assert vm.runtime.powerState == "poweredOff"
            wait_for("QEMU to exit", lambda: not alive(pid), timeout=30)
            assert not hostd_mod.call(cfg, "/vm/status", {"vm": "qvm1"})["running"]
            assert "sp7t0" not in links()
        finally:
            Disconnect(si)
        print(f"\nhostd + QEMU (TCG, blank disk of {DISK // MiB} MiB) timings, ms: {timings}")

    def test_files_vm_beside_it_and_guest_reports(self, qemu_lab: VcsimHandle) -> None:
        vc = qemu_lab
        si = connect(vc)
        try:
            vm = find_vm(si, "fvm1")
            enable_cbt(vm)
            live = vc.vms["fvm1"].disks[0].flat_file
            with open(live, "r+b") as f:
                f.write(b"before")
            snap = snapshot(vm, "old-way")
            disk = disks_of(snap.config)[0]
            assert disk.backing.fileName == "[LocalDS_0] fvm1/fvm1-000001.vmdk"
            capture = vc.datastore_dir / "fvm1" / "fvm1-000001-flat.vmdk"
            with open(live, "r+b") as f:
                f.write(b"after!")
            assert capture.read_bytes()[:6] == b"before"
            wait(snap.RemoveSnapshot_Task(removeChildren=False))
            assert not capture.exists()

            # hostd's poller reports the guest once it has asked its agent (no OS here: no
            # agent, tools not running); then what hostd posts is what pyVmomi reads
            cfg = vc_cfg(vc)
            before = hostd_mod.call(cfg, "/host/ping")["reports"]
            qvm = find_vm(si, "qvm1")
            wait(qvm.PowerOnVM_Task())
            wait_for("hostd's report", lambda: hostd_mod.call(cfg, "/host/ping")["reports"]
                     > before, timeout=30)
            assert qvm.guest.toolsRunningStatus == "guestToolsNotRunning"
            assert not qvm.guest.ipAddress
            vc.report_guest("qvm1", ip="10.77.7.10", hostname="qvm1.lab", tools_running=True)
            assert qvm.guest.ipAddress == "10.77.7.10"
            assert qvm.guest.hostName == "qvm1.lab"
            assert qvm.guest.toolsRunningStatus == "guestToolsRunning"
            assert qvm.guest.toolsStatus == "toolsOk"
            assert qvm.guest.net[0].ipAddress == ["10.77.7.10"]
            wait(qvm.PowerOffVM_Task())
            assert not qvm.guest.ipAddress
        finally:
            Disconnect(si)
