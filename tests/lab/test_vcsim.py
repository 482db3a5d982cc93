"""The lab's vCenter (stillpoint-vcsim) through pyVmomi: TLS, login, inventory, snapshots with
point-in-time captures, exact CBT over pages, datastore HTTP, CreateVM, guestinfo, events,
knobs and capture hooks. One simulator per module, always stopped."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from appliance.errors import LabError
from stillpoint_lab.config import LabConfig
from stillpoint_lab.vcsim import (
    VcsimDisk,
    VcsimHandle,
    VcsimVM,
    start_vcsim,
    stop_vcsim_by_pidfile,
    thumbprint_sha256,
)

pytestmark = pytest.mark.lab

MiB = 1 << 20
BLOCK = 64 * 1024
SPAN_CAP = 4 * MiB
DISK1 = 128 * MiB  # 32 pages of SPAN_CAP

if shutil.which("go") is None:
    pytest.skip("Go toolchain not installed (golang-go)", allow_module_level=True)


@pytest.fixture(scope="module")
def hook_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hooks") / "hooks.log"


def _hook(log: Path, word: str) -> tuple[str, ...]:
    return ("sh", "-c", f'echo "{word} $STILLPOINT_VM $STILLPOINT_DISK_KEY" >> {log}')


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, hook_log: Path) -> Iterator[VcsimHandle]:
    state = tmp_path_factory.mktemp("vcsim-state")
    vms = [
        VcsimVM("lab-vm1", ip="10.77.0.10", hostname="lab-vm1.lab",
                disks=(VcsimDisk(DISK1, pre=_hook(hook_log, "pre"), post=_hook(hook_log, "post")),
                       VcsimDisk(64 * MiB))),
        VcsimVM("lab-win1", guest_id="windows2019srv_64Guest", tools_running=False,
                disks=(VcsimDisk(64 * MiB),)),
        VcsimVM("lab-hookfail", disks=(
            VcsimDisk(64 * MiB, pre=("false",), post=_hook(hook_log, "thawed")),)),
    ]
    handle = start_vcsim(LabConfig(), state, vms, span_cap_bytes=SPAN_CAP)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def si(lab: VcsimHandle) -> Iterator[Any]:
    conn = SmartConnect(host=lab.host, port=lab.port, user=lab.user, pwd=lab.password,
                        sslContext=lab.ssl_context())
    try:
        yield conn
    finally:
        Disconnect(conn)


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


def snapshot(vm: Any, name: str) -> Any:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    assert task.info.entity == vm
    return task.info.result


def remove(snap: Any, vm: Any) -> None:
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    WaitForTask(task)
    assert task.info.state == "success"
    assert task.info.entity == vm  # the VM, not the snapshot (pyVmomi would reject that)


def enable_cbt(vm: Any) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled is True


def capture_file(lab: VcsimHandle, snap: Any, key: int) -> tuple[Path, str]:
    disk = next(d for d in disks_of(snap.config) if d.key == key)
    ds_path = disk.backing.fileName
    rel = ds_path.split("] ", 1)[1]
    return lab.datastore_dir / rel.replace(".vmdk", "-flat.vmdk"), disk.backing.changeId


def query_all(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
    """Page QueryChangedDiskAreas like a backup does, checking the paging invariants."""
    areas: list[tuple[int, int]] = []
    offset = 0
    pages = 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset,
                                        changeId=change_id)
        assert info.startOffset == offset
        assert 0 < info.length <= SPAN_CAP
        for a in info.changedArea:
            assert offset <= a.start and a.start + a.length <= offset + info.length
            areas.append((a.start, a.length))
        offset += info.length
        pages += 1
    assert offset == capacity
    assert pages == -(-capacity // SPAN_CAP)
    return areas


def blocks_covered(areas: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for start, length in areas:
        assert start % BLOCK == 0 and length % BLOCK == 0
        out.update(range(start // BLOCK, (start + length) // BLOCK))
    return out


def block_hashes(path: Path) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            out.append(hashlib.sha256(chunk).digest())
    return out


def differing_blocks(a: Path, b: Path) -> set[int]:
    """Byte-by-byte comparison, block by block."""
    out: set[int] = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        n = 0
        while True:
            ba, bb = fa.read(BLOCK), fb.read(BLOCK)
            if not ba and not bb:
                return out
            if ba != bb:
                out.add(n)
            n += 1


def scribble(path: Path, rng: random.Random, count: int) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        for _ in range(count):
            length = rng.choice([1, 512, 4096, 70_000, 200_000])
            offset = rng.randrange(0, size - length)
            f.seek(offset)
            f.write(os.urandom(length))


def cookie_header(si: Any) -> str:
    return str(si._stub.cookie).split(";")[0]


def http(lab: VcsimHandle, method: str, path: str, *, headers: dict[str, str] | None = None,
         data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"https://127.0.0.1:{lab.port}{path}", data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=lab.ssl_context(), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# --- TLS and login ----------------------------------------------------------------------------


def test_tls_is_verified_against_the_lab_certificate(lab: VcsimHandle, si: Any) -> None:
    assert si.CurrentTime() is not None
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(f"https://127.0.0.1:{lab.port}/about",
                               context=ssl.create_default_context(), timeout=10)
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", lab.port)))
    assert thumbprint_sha256(der) == lab.thumbprint_sha256
    assert (lab.state_dir / "vcsim" / "password").stat().st_mode & 0o777 == 0o600
    assert (lab.state_dir / "vcsim" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert lab.password not in (lab.state_dir / "vcsim" / "config.json").read_text()


def test_wrong_password_is_invalid_login(lab: VcsimHandle) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(host=lab.host, port=lab.port, user=lab.user, pwd=lab.password + "x",
                     sslContext=lab.ssl_context())
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(host=lab.host, port=lab.port, user="root", pwd=lab.password,
                     sslContext=lab.ssl_context())


def test_token_and_certificate_logins_are_refused(lab: VcsimHandle) -> None:
    # The stock simulator would log in anyone whose SAML assertion names a subject.
    envelope = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        '<soapenv:Header><wsse:Security xmlns:wsse="http://docs.oasis-open.org/wss/2004/01/'
        'oasis-200401-wss-wssecurity-secext-1.0.xsd"><saml2:Assertion xmlns:saml2="urn:oasis:'
        'names:tc:SAML:2.0:assertion"><saml2:Subject><saml2:NameID>root</saml2:NameID>'
        '</saml2:Subject></saml2:Assertion></wsse:Security></soapenv:Header>'
        '<soapenv:Body><LoginByToken xmlns="urn:vim25"><_this type="SessionManager">'
        'SessionManager</_this></LoginByToken></soapenv:Body></soapenv:Envelope>')
    status, headers, body = http(lab, "POST", "/sdk", data=envelope.encode(),
                                 headers={"Content-Type": "text/xml", "SOAPAction": "urn:vim25/8.0"})
    assert status == 500 and b"InvalidLogin" in body
    assert "Set-Cookie" not in headers


# --- inventory --------------------------------------------------------------------------------


def test_inventory_has_our_vms_with_guest_facts(lab: VcsimHandle, si: Any) -> None:
    vm = find_vm(si, "lab-vm1")
    assert vm._moId == lab.vms["lab-vm1"].moref
    assert vm.config.guestId == "debian12_64Guest" == vm.guest.guestId
    assert vm.guest.toolsRunningStatus == "guestToolsRunning"
    assert vm.guest.ipAddress == "10.77.0.10"
    assert vm.guest.hostName == "lab-vm1.lab"
    assert vm.guest.net[0].ipAddress == ["10.77.0.10"] and vm.guest.net[0].macAddress
    assert vm.config.uuid and vm.config.instanceUuid
    assert vm.runtime.consolidationNeeded is False
    index = si.RetrieveContent().searchIndex  # walks the whole registry, side objects too
    assert index.FindByUuid(None, vm.config.uuid, True) == vm
    assert index.FindByUuid(None, vm.config.instanceUuid, True, True) == vm
    assert index.FindByDnsName(None, "lab-vm1.lab", True) == vm
    assert index.FindByIp(None, "10.77.0.10", True) == vm
    assert index.FindByDatastorePath(si.RetrieveContent().rootFolder.childEntity[0],
                                     vm.config.files.vmPathName) == vm
    win = find_vm(si, "lab-win1")
    assert win.guest.toolsRunningStatus == "guestToolsNotRunning"
    assert win.config.guestId == "windows2019srv_64Guest"

    disks = disks_of(vm.config)
    infos = lab.vms["lab-vm1"].disks
    assert [d.key for d in disks] == [i.key for i in infos] == [2000, 2001]
    for disk, info in zip(disks, infos):
        assert disk.backing.fileName == info.datastore_path
        assert disk.capacityInBytes == info.capacity_bytes
        assert disk.deviceInfo.label == info.label
        assert info.flat_file.stat().st_size == info.capacity_bytes
        assert info.flat_file.stat().st_blocks * 512 < info.capacity_bytes  # sparse
        descriptor = info.flat_file.with_name(info.flat_file.name.replace("-flat", ""))
        text = descriptor.read_text()
        assert 'createType="vmfs"' in text
        assert f'RW {info.capacity_bytes // 512} VMFS "{info.flat_file.name}"' in text
    assert infos[0].datastore_path == "[LocalDS_0] lab-vm1/lab-vm1.vmdk"
    assert infos[1].datastore_path == "[LocalDS_0] lab-vm1/lab-vm1_1.vmdk"


# --- snapshots and CBT ------------------------------------------------------------------------


def test_cbt_is_exact_over_pages_and_captures_are_point_in_time(
        lab: VcsimHandle, si: Any, hook_log: Path) -> None:
    vm = find_vm(si, "lab-vm1")
    enable_cbt(vm)
    live = lab.vms["lab-vm1"].disks[0].flat_file
    rng = random.Random(7)
    scribble(live, rng, 40)
    with open(live, "r+b") as f:  # the very last block and a block boundary
        f.seek(DISK1 - 10)
        f.write(b"z" * 10)
        f.seek(5 * BLOCK - 3)
        f.write(b"boundary")

    snap1 = snapshot(vm, "s1")
    cap1, change1 = capture_file(lab, snap1, 2000)
    assert cap1.exists() and cap1 != live
    assert change1 and "/" in change1
    # capture hooks ran around each disk of lab-vm1 that has them
    assert hook_log.read_text().splitlines()[-2:] == ["pre lab-vm1 2000", "post lab-vm1 2000"]

    # "*" covers every non-zero block of the capture, and only allocated ones
    allocated = blocks_covered(query_all(vm, snap1, 2000, "*", DISK1))
    zero = hashlib.sha256(bytes(BLOCK)).digest()
    nonzero = {i for i, h in enumerate(block_hashes(cap1)) if h != zero}
    assert nonzero <= allocated
    assert len(allocated) < DISK1 // BLOCK  # sparse: not the whole disk

    # changes between the snapshots: scattered writes, one rewrite with identical bytes
    with open(live, "r+b") as f:
        f.seek(0)
        same = f.read(BLOCK)
        f.seek(0)
        f.write(same)
    scribble(live, rng, 25)
    snap2 = snapshot(vm, "s2")
    cap2, change2 = capture_file(lab, snap2, 2000)
    assert change2.split("/")[0] == change1.split("/")[0] and change2 != change1

    expected = differing_blocks(cap1, cap2)
    assert expected, "the scribble must have changed something"
    got = blocks_covered(query_all(vm, snap2, 2000, change1, DISK1))
    assert got == expected

    # the capture does not change while the live disk keeps changing
    before = block_hashes(cap2)
    scribble(live, rng, 10)
    assert block_hashes(cap2) == before

    # the second disk did not change at all between the snapshots
    _, change1_b = capture_file(lab, snap1, 2001)
    assert query_all(vm, snap2, 2001, change1_b, 64 * MiB) == []

    # removal deletes the captures; the changeId stays queryable afterwards
    hashes1 = block_hashes(cap1)
    remove(snap1, vm)
    assert not cap1.exists() and not Path(str(cap1).replace("-flat", "")).exists()
    snap3 = snapshot(vm, "s3")
    cap3, _ = capture_file(lab, snap3, 2000)
    expected3 = {i for i, h in enumerate(block_hashes(cap3)) if i >= len(hashes1) or h != hashes1[i]}
    assert blocks_covered(query_all(vm, snap3, 2000, change1, DISK1)) == expected3

    # revert only moves currentSnapshot (documented), with the VM as the task's entity
    task = snap2.RevertToSnapshot_Task()
    WaitForTask(task)
    assert task.info.entity == vm and vm.snapshot.currentSnapshot == snap2

    task = vm.RemoveAllSnapshots_Task()
    WaitForTask(task)
    assert task.info.entity == vm
    assert not cap2.exists() and not cap3.exists()
    assert vm.snapshot is None


def test_removing_many_snapshots_never_touches_the_live_disks(lab: VcsimHandle, si: Any) -> None:
    # The stock simulator deletes files by layout keys that its storage refresh renumbers:
    # removing snapshots one by one could delete the live flat file.
    vm = find_vm(si, "lab-vm1")
    live = [d.flat_file for d in lab.vms["lab-vm1"].disks]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        snaps = [snapshot(vm, f"many-{i}") for i in range(4)]
        vmsn = sorted(p.name for p in live[0].parent.glob("*.vmsn"))
        assert len(vmsn) == 4
        for i in order:
            remove(snaps[i], vm)
            assert all(p.exists() for p in live), f"live disk deleted (order {order}, at {i})"
        assert list(live[0].parent.glob("*.vmsn")) == []
        assert [p.name for p in live[0].parent.iterdir() if "-0000" in p.name] == []


def test_unknown_change_id_and_cbt_reset_are_file_faults(lab: VcsimHandle, si: Any) -> None:
    vm = find_vm(si, "lab-vm1")
    enable_cbt(vm)
    snap1 = snapshot(vm, "r1")
    try:
        _, change1 = capture_file(lab, snap1, 2000)
        epoch = change1.split("/")[0]
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap1, deviceKey=2000, startOffset=0,
                                     changeId=epoch + "/99999")
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap1, deviceKey=2000, startOffset=0,
                                     changeId="52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1")
        lab.set_knobs("lab-vm1", cbt_reset=True)
        snap2 = snapshot(vm, "r2")
        _, change2 = capture_file(lab, snap2, 2000)
        assert change2.split("/")[0] != epoch
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=2000, startOffset=0,
                                     changeId=change1)
        # the new epoch works
        vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=2000, startOffset=0, changeId="*")
    finally:
        WaitForTask(vm.RemoveAllSnapshots_Task())

    win = find_vm(si, "lab-win1")  # CBT never enabled
    snap = snapshot(win, "nocbt")
    try:
        assert disks_of(snap.config)[0].backing.changeId in (None, "")
        with pytest.raises(vim.fault.FileFault):
            win.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")
    finally:
        remove(snap, win)


def test_knobs_make_snapshots_slow_or_fail(lab: VcsimHandle, si: Any) -> None:
    vm = find_vm(si, "lab-win1")
    status, _, _ = http(lab, "POST", "/lab/knobs", data=json.dumps({"vm": "lab-win1"}).encode())
    assert status == 401
    lab.set_knobs("lab-win1", snapshot_delay_s=1.5)
    try:
        t0 = time.monotonic()
        task = vm.CreateSnapshot_Task(name="slow", description="", memory=False, quiesce=False)
        assert time.monotonic() - t0 < 1.0  # the call returns at once, the task runs
        assert task.info.state in ("queued", "running")
        WaitForTask(task)
        assert time.monotonic() - t0 >= 1.5
        remove(task.info.result, vm)
        lab.set_knobs("lab-win1", snapshot_delay_s=0, snapshot_fail=True)
        task = vm.CreateSnapshot_Task(name="fail", description="", memory=False, quiesce=False)
        with pytest.raises(vim.fault.SnapshotFault):
            WaitForTask(task)
        assert vm.snapshot is None
    finally:
        lab.set_knobs("lab-win1", snapshot_delay_s=0, snapshot_fail=False)
    with pytest.raises(LabError):
        lab.set_knobs("no-such-vm", snapshot_fail=True)


def test_failing_pre_hook_fails_the_snapshot_and_post_still_runs(
        lab: VcsimHandle, si: Any, hook_log: Path) -> None:
    vm = find_vm(si, "lab-hookfail")
    task = vm.CreateSnapshot_Task(name="x", description="", memory=False, quiesce=False)
    with pytest.raises(vim.fault.FileFault):
        WaitForTask(task)
    assert hook_log.read_text().splitlines()[-1] == "thawed lab-hookfail 2000"
    assert vm.snapshot is None
    leftovers = [p.name for p in (lab.datastore_dir / "lab-hookfail").iterdir() if "-0000" in p.name]
    assert leftovers == []


def test_scheduled_snapshot_captures_like_a_soap_call(
        lab: VcsimHandle, si: Any, hook_log: Path) -> None:
    vm = find_vm(si, "lab-vm1")
    stm = si.RetrieveContent().scheduledTaskManager
    action = vim.action.MethodAction(name=vim.VirtualMachine.CreateSnapshot, argument=[
        vim.action.MethodActionArgument(value="scheduled"),
        vim.action.MethodActionArgument(value="by the scheduler"),
        vim.action.MethodActionArgument(value=False),
        vim.action.MethodActionArgument(value=False)])
    spec = vim.scheduler.ScheduledTaskSpec(
        name="stillpoint-test-snapshot", description="", enabled=True, action=action,
        scheduler=vim.scheduler.OnceTaskScheduler(
            runAt=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)))
    task = stm.CreateScheduledTask(vm, spec)
    try:
        task.RunScheduledTask()
        deadline = time.monotonic() + 30
        while vm.snapshot is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.snapshot is not None
        snap = vm.snapshot.rootSnapshotList[0].snapshot
        cap, _ = capture_file(lab, snap, 2000)
        assert cap.exists() and "-0000" in cap.name  # a capture, not the live disk
        assert hook_log.read_text().splitlines()[-1] == "post lab-vm1 2000"
    finally:
        task.RemoveScheduledTask()
        if vm.snapshot is not None:
            WaitForTask(vm.RemoveAllSnapshots_Task())


# --- datastore HTTP ---------------------------------------------------------------------------


def test_datastore_range_get_of_a_capture_and_put(lab: VcsimHandle, si: Any) -> None:
    vm = find_vm(si, "lab-vm1")
    live = lab.vms["lab-vm1"].disks[0].flat_file
    with open(live, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"range-me" * 1000)
    snap = snapshot(vm, "http")
    try:
        cap, _ = capture_file(lab, snap, 2000)
        rel = cap.relative_to(lab.datastore_dir)
        path = f"/folder/{rel}?dcPath=DC0&dsName=LocalDS_0"
        status, _, _ = http(lab, "GET", path, headers={"Range": "bytes=0-1"})
        assert status == 401  # no session, no data
        start, end = 3 * MiB - 100, 3 * MiB + 70_000
        status, headers, body = http(lab, "GET", path, headers={
            "Range": f"bytes={start}-{end}", "Cookie": cookie_header(si)})
        assert status == 206
        assert headers["Content-Range"] == f"bytes {start}-{end}/{DISK1}"
        with open(cap, "rb") as f:
            f.seek(start)
            assert body == f.read(end - start + 1)
    finally:
        remove(snap, vm)

    data = os.urandom(100_000)
    put_path = "/folder/uploads/blob.bin?dcPath=DC0&dsName=LocalDS_0"
    status, _, _ = http(lab, "PUT", put_path, data=data, headers={"Cookie": cookie_header(si)})
    assert status == 200
    assert (lab.datastore_dir / "uploads" / "blob.bin").read_bytes() == data


def test_create_vm_with_disk_then_put_into_it(lab: VcsimHandle, si: Any) -> None:
    content = si.RetrieveContent()
    dc = content.rootFolder.childEntity[0]
    cluster = dc.hostFolder.childEntity[0]
    scsi = vim.vm.device.VirtualDeviceSpec(
        operation="add",
        device=vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing"))
    disk = vim.vm.device.VirtualDeviceSpec(
        operation="add", fileOperation="create",
        device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=1000, unitNumber=0, capacityInKB=32 * 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName="[LocalDS_0] restored/restored.vmdk", diskMode="persistent",
                thinProvisioned=False)))
    spec = vim.vm.ConfigSpec(name="restored", guestId="debian12_64Guest",
                             files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
                             deviceChange=[scsi, disk])
    task = dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool)
    WaitForTask(task)
    vm = task.info.result
    try:
        flat = lab.datastore_dir / "restored" / "restored-flat.vmdk"
        assert flat.stat().st_size == 32 * MiB
        assert flat.stat().st_blocks == 0
        assert 'RW 65536 VMFS "restored-flat.vmdk"' in (flat.parent / "restored.vmdk").read_text()
        assert disks_of(vm.config)[0].backing.fileName == "[LocalDS_0] restored/restored.vmdk"

        data = os.urandom(MiB) + bytes(30 * MiB) + os.urandom(MiB)
        status, _, _ = http(lab, "PUT", "/folder/restored/restored-flat.vmdk?dcPath=DC0&dsName=LocalDS_0",
                            data=data, headers={"Cookie": cookie_header(si)})
        assert status == 200
        assert flat.read_bytes() == data
        assert flat.stat().st_blocks * 512 <= 3 * MiB  # zeros stay holes

        WaitForTask(vm.PowerOnVM_Task())
        assert vm.runtime.powerState == "poweredOn"
        # a restored VM can be snapshotted and tracked like any other
        enable_cbt(vm)
        snap = snapshot(vm, "after-restore")
        cap, change = capture_file(lab, snap, disks_of(vm.config)[0].key)
        assert cap.read_bytes() == data and change
        remove(snap, vm)
        WaitForTask(vm.PowerOffVM_Task())
    finally:
        WaitForTask(vm.Destroy_Task())


# --- guestinfo and events ---------------------------------------------------------------------


def test_guestinfo_round_trip(lab: VcsimHandle, si: Any) -> None:
    vm = find_vm(si, "lab-vm1")
    assert lab.guestinfo("lab-vm1", "guestinfo.stillpoint.restore") is None
    spec = vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="guestinfo.stillpoint.restore", value='{"point": "rp-1"}')])
    WaitForTask(vm.ReconfigVM_Task(spec))
    assert lab.guestinfo("lab-vm1", "guestinfo.stillpoint.restore") == '{"point": "rp-1"}'
    # no session needed: this is how lab guests read it, like vmware-rpctool
    status, headers, body = http(lab, "GET", "/lab/guestinfo/lab-vm1/guestinfo.stillpoint.restore")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert body == b'{"point": "rp-1"}'
    status, _, _ = http(lab, "GET", "/lab/guestinfo/lab-vm1/not.guestinfo")
    assert status == 400
    status, _, _ = http(lab, "GET", "/lab/guestinfo/nope/guestinfo.x")
    assert status == 404


def test_events_log_post_and_collect(lab: VcsimHandle, si: Any) -> None:
    content = si.RetrieveContent()
    vm = find_vm(si, "lab-vm1")
    em = content.eventManager
    em.LogUserEvent(entity=vm, msg="stillpoint: backup job-1 failed: writer postgresql")
    event = vim.event.GeneralUserEvent(
        message="stillpoint: backup job-2 ok", createdTime=datetime.datetime.now(datetime.UTC), key=0, chainId=0,
        userName=lab.user, vm=vim.event.VmEventArgument(vm=vm, name=vm.name))
    em.PostEvent(eventToPost=event)
    spec = vim.event.EventFilterSpec(entity=vim.event.EventFilterSpec.ByEntity(
        entity=vm, recursion="self"))
    collector = em.CreateCollectorForEvents(filter=spec)
    try:
        page = collector.latestPage
        # newest first, even with more history than a default page (a 0.24.2 simulator bug)
        assert page[0].fullFormattedMessage == "stillpoint: backup job-2 ok"
        assert page[1].fullFormattedMessage == "stillpoint: backup job-1 failed: writer postgresql"
        assert isinstance(page[1], vim.event.GeneralUserEvent)
        assert page[1].vm is not None and page[1].vm.vm == vm
        assert [e.key for e in page] == sorted((e.key for e in page), reverse=True)
        em.LogUserEvent(entity=vm, msg="stillpoint: live update")
        assert collector.latestPage[0].fullFormattedMessage == "stillpoint: live update"
        collector.RewindCollector()
        read = collector.ReadNextEvents(maxCount=1000)
        assert {e.key for e in read} == {e.key for e in collector.latestPage}
    finally:
        collector.DestroyCollector()
    queried = em.QueryEvents(filter=vim.event.EventFilterSpec(
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"),
        eventTypeId=["GeneralUserEvent"]))
    assert [e.fullFormattedMessage for e in queried][:3] == [
        "stillpoint: live update", "stillpoint: backup job-2 ok",
        "stillpoint: backup job-1 failed: writer postgresql"]


# --- process lifecycle ------------------------------------------------------------------------


def test_stop_by_pidfile_and_idempotent_stop(tmp_path: Path) -> None:
    handle = start_vcsim(LabConfig(), tmp_path, [VcsimVM("solo", disks=(VcsimDisk(MiB),))])
    pid = handle.pid
    try:
        assert Path(f"/proc/{pid}").exists()
        stop_vcsim_by_pidfile(tmp_path)  # as a teardown whose Python process died would
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").exists() and \
                Path(f"/proc/{pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (tmp_path / "vcsim" / "vcsim.pid").exists()
    finally:
        handle.stop()
        handle.stop()


def test_bad_config_fails_with_the_log_tail(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="multiple of 512 bytes"):
        start_vcsim(LabConfig(), tmp_path, [VcsimVM("odd", disks=(VcsimDisk(1000),))])
    assert not (tmp_path / "vcsim" / "vcsim.pid").exists()


def test_build_without_go_is_a_lab_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import stillpoint_lab.vcsim as vcsim_mod

    monkeypatch.setattr(vcsim_mod.shutil, "which", lambda name: None)
    with pytest.raises(LabError, match="Go is not installed"):
        vcsim_mod.build_vcsim()


def test_stop_lets_a_running_capture_run_its_post_hook(tmp_path: Path) -> None:
    marker = tmp_path / "thawed"
    vm_spec = VcsimVM("slow", disks=(VcsimDisk(MiB, pre=("sleep", "1"),
                                              post=("touch", str(marker))),))
    handle = start_vcsim(LabConfig(), tmp_path, [vm_spec])
    try:
        conn = SmartConnect(host=handle.host, port=handle.port, user=handle.user,
                            pwd=handle.password, sslContext=handle.ssl_context())
        try:
            find_vm(conn, "slow").CreateSnapshot_Task(name="s", description="", memory=False,
                                                      quiesce=False)
            time.sleep(0.3)  # the pre hook ("freeze") is running
        finally:
            Disconnect(conn)
    finally:
        handle.stop()
    assert marker.exists()
