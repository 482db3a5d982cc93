"""The lab hypervisor's QEMU layer (stillpoint_lab.qemu.HostVM) on real QEMU processes.

The VMs have no OS (SeaBIOS finds nothing to boot): the tests write into the running VMs'
disks with HMP `qemu-io` on the virtio device's block backend, which goes through the same
block layer (delta, bitmaps) as the guest's writes. No network, no guest image. Names are
prefixed `sptest6` (QEMU titles `stillpoint-qemu-sptest6-*`), run dirs live under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stillpoint_lab.qemu import HostFault, HostVM, PowerOnSpec, VMDisk, offline
from stillpoint_lab.qemu.cbt import BLOCK, merge
from stillpoint_lab.qemu.disks import DiskError, ensure_meta, image_info
from stillpoint_lab.qemu.machine import (
    Machine,
    MachineDisk,
    MachineSpec,
    kill_all,
    nodes,
    process_title,
)

pytestmark = pytest.mark.lab

LAB = "sptest6"
MiB = 1 << 20
GiB = 1 << 30
KEY = 2000

if os.geteuid() != 0:
    pytest.skip("the QEMU lab layer needs root", allow_module_level=True)
if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("qemu-system-x86 is not installed", allow_module_level=True)


class VM:
    """A HostVM with no OS plus the test's view of it."""

    def __init__(self, root: Path, name: str, sizes: tuple[int, ...], **kw: Any) -> None:
        self.root = root / name
        self.name = name
        self.kw = kw
        self.disks = tuple(VMDisk(KEY + i, self.root / "ds" / (f"{name}{'_' + str(i) if i else ''}"
                                                               "-flat.vmdk"), size)
                           for i, size in enumerate(sizes))
        self.host = HostVM(name, self.root / "run", lab=LAB, **kw)

    def restart_hostd(self) -> None:
        """A new HostVM object on the same run dir (what a restarted hostd does)."""
        self.host.close()
        self.host = HostVM(self.name, self.root / "run", lab=LAB, **self.kw)

    def power_on(self) -> int:
        return int(self.host.power_on(PowerOnSpec(memory_mib=96, cpus=1, disks=self.disks))["pid"])

    def flat(self, i: int = 0) -> Path:
        return Path(self.disks[i].flat)

    def io(self, command: str, i: int = 0) -> None:
        """A qemu-io command on disk i, as the guest would issue it (through the device)."""
        assert self.host.machine is not None
        with self.host.machine.debug_qmp() as dbg:
            out = dbg.hmp(f'qemu-io -d {nodes(KEY + i).backend} "{command}"')
        assert out.strip() == "", out   # qemu-io reports success on QEMU's stdout

    def write(self, offset: int, length: int, pattern: int, i: int = 0) -> None:
        self.io(f"write -P {pattern} {offset} {length}", i)

    def qmp_status(self) -> str:
        assert self.host.machine is not None
        with self.host.machine.debug_qmp() as dbg:
            return str(dbg.execute("query-status")["status"])

    def areas(self, snapshot: str, change_id: str, span_cap: int | None = None,
              i: int = 0) -> list[tuple[int, int]]:
        """All pages of QueryChangedDiskAreas, checked like a careful client checks them."""
        capacity = self.flat(i).stat().st_size
        out: list[tuple[int, int]] = []
        start = 0
        while start < capacity:
            reply = self.host.cbt_query(snapshot, KEY + i, start, change_id, span_cap)
            assert reply["start_offset"] == start
            assert reply["length"] > 0
            for off, n in reply["areas"]:
                assert start <= off and off + n <= start + reply["length"]
                assert off % BLOCK == 0 and (n % BLOCK == 0 or off + n == capacity)
            out.extend((o, n) for o, n in reply["areas"])
            start += reply["length"]
        assert start == capacity
        return merge(out, end=capacity)


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[VM]]:
    made: list[VM] = []
    yield made
    for vm in made:
        try:
            if vm.host.running:
                vm.host.power_off()
        except HostFault:
            pass
        offline.stop_all_nbd(vm.root / "run")
    kill_all(process_title(LAB, ""))


def new_vm(vms: list[VM], tmp_path: Path, name: str, *sizes: int, **kw: Any) -> VM:
    vm = VM(tmp_path, name, sizes or (256 * MiB,), **kw)
    vms.append(vm)
    return vm


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def blocks(extents: list[tuple[int, int]]) -> set[int]:
    return {b for off, n in extents for b in range(off // BLOCK, (off + n + BLOCK - 1) // BLOCK)}


def differing_blocks(a: Path, b: Path) -> set[int]:
    out: set[int] = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        i = 0
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if not x and not y:
                return out
            if x != y:
                out.add(i)
            i += 1


def capture(vm: VM, dest: Path) -> Path:
    """A copy of the frozen flat file (a point-in-time image)."""
    subprocess.run(["cp", "--sparse=always", str(vm.flat()), str(dest)], check=True)
    return dest


def scattered_writes(vm: VM, rng: random.Random, count: int, model: bytearray | None = None,
                     ) -> list[tuple[int, int]]:
    """`count` writes of various sizes at random 512-byte aligned offsets; the extents."""
    capacity = vm.flat().stat().st_size
    done = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 65536 + 4096, 300_000])
        offset = rng.randrange(0, capacity - length) // 512 * 512
        pattern = rng.randrange(1, 256)
        vm.write(offset, length, pattern)
        if model is not None:
            model[offset:offset + length] = bytes([pattern]) * length
        done.append((offset, length))
    return done


def fault(fault_class: str, fn: Any, *args: Any, **kw: Any) -> HostFault:
    with pytest.raises(HostFault) as err:
        fn(*args, **kw)
    assert err.value.fault_class == fault_class, err.value
    return err.value


# --- tests ---------------------------------------------------------------------------------
def test_powered_off_vm_snapshots_cbt_and_export(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "off", 32 * MiB)
    fault("InvalidState", vm.host.snapshot_create, "never")    # disks unknown before a power-on
    vm.power_on()
    vm.write(MiB, 4096, 0x31)
    cid1 = vm.host.snapshot_create("o1", cbt=True)["disks"][0]["change_id"]
    vm.host.snapshot_remove("o1")
    vm.write(2 * MiB, 4096, 0x32)
    vm.host.power_off()
    s2 = vm.host.snapshot_create("o2", cbt=True, quiesce=True)  # nothing runs to quiesce
    cid2 = s2["disks"][0]["change_id"]
    assert cid2.split("/")[0] == cid1.split("/")[0]
    print(f"offline snapshot: {s2['timings_ms']['snapshot']} ms")
    assert blocks(vm.areas("o2", cid1)) == {2 * MiB // BLOCK}           # qemu-nbd, paged
    assert blocks(vm.areas("o2", cid1, span_cap=4 * MiB)) == {2 * MiB // BLOCK}
    assert vm.areas("o2", cid2) == []
    assert blocks(vm.areas("o2", "*")) >= {MiB // BLOCK, 2 * MiB // BLOCK}
    sock, export = vm.host.export_snapshot("o2", KEY)
    import nbd
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    assert h.pread(4096, 2 * MiB) == b"\x32" * 4096
    h.shutdown()
    vm.power_on()                     # stops the qemu-nbd servers, runs on the delta
    assert not list((vm.root / "run").glob("nbd-*.pid"))
    vm.write(3 * MiB, 4096, 0x33)
    assert blocks(vm.areas("o2", cid1)) == {2 * MiB // BLOCK}
    vm.host.snapshot_remove("o2")
    vm.host.snapshot_create("o3", cbt=True)
    assert blocks(vm.areas("o3", cid2)) == {3 * MiB // BLOCK}
    vm.host.snapshot_remove("o3")
    # a kill, then an offline snapshot: the in-use bitmaps are seen without QEMU
    os.kill(int(vm.host.status()["pid"]), signal.SIGKILL)
    assert vm.host.machine is not None and vm.host.machine.wait_exit(10)
    s4 = vm.host.snapshot_create("o4", cbt=True)
    assert "inconsistent" in vm.host.status()["cbt_resets"][-1]["reason"]
    assert s4["disks"][0]["change_id"].split("/")[0] != cid1.split("/")[0]
    fault("FileFault", vm.host.cbt_query, "o4", KEY, 0, cid2, None)
    vm.host.snapshot_remove("o4")


def test_metadata_qcow2_leaves_an_existing_flat_alone(tmp_path: Path) -> None:
    flat = tmp_path / "ds" / "old-flat.vmdk"
    flat.parent.mkdir()
    with open(flat, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(random.Random(1).randbytes(MiB))
    before = sha(flat)
    meta = ensure_meta(flat)
    assert sha(flat) == before and flat.stat().st_size == 16 * MiB
    info = image_info(meta)["format-specific"]["data"]
    assert info["data-file"] == str(flat) and info["data-file-raw"] is True
    assert ensure_meta(flat) == meta                     # idempotent
    assert sha(flat) == before
    assert not list(flat.parent.glob("*.dummy-data")) and not list(flat.parent.glob("*.tmp"))
    with open(flat, "r+b") as f:                         # the flat grew: refuse
        f.truncate(32 * MiB)
    with pytest.raises(DiskError):
        ensure_meta(flat)


def test_machine_serial_banner_reset_and_kill_all(tmp_path: Path) -> None:
    flat = tmp_path / "m-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(8 * MiB)
    ensure_meta(flat)
    sercon = tmp_path / "sercon-port"
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))   # SeaBIOS: console on COM1 too
    machine = Machine(MachineSpec(
        name="banner", lab=LAB, run_dir=tmp_path / "run", memory_mib=64, cpus=1,
        disks=(MachineDisk(KEY, flat),),
        extra_args=("-fw_cfg", f"name=etc/sercon-port,file={sercon}")))
    try:
        pid = machine.start()
        assert machine.running and machine.pid == pid
        assert machine.wait_banner("SeaBIOS", 30), machine.serial_path.read_bytes()[-300:]
        since = machine.serial_size()
        machine.reset()
        assert machine.wait_banner("SeaBIOS", 30, since=since)
        assert not machine.wait_banner("no such text", 0.5)
        assert stat_mode(machine.run_dir) == 0o700
        assert kill_all(process_title(LAB, "banner")) == [pid]
        assert machine.wait_exit(5) and not machine.running
    finally:
        machine.kill9()


def test_nic_on_a_tap_in_a_network_namespace(vms: list[VM], tmp_path: Path) -> None:
    ns, bridge, tap = "sptest6ns", "sptest6br", "sptest6tap0"
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", bridge, "type", "bridge"], check=True)
        vm = new_vm(vms, tmp_path, "nic", 16 * MiB)
        vm.host.power_on(PowerOnSpec(memory_mib=64, cpus=1, disks=vm.disks, netns=ns,
                                     mac="00:50:56:36:00:01", tap=tap, bridge=bridge))
        link = subprocess.run(["ip", "-n", ns, "-o", "link", "show", tap], check=True,
                              capture_output=True, text=True).stdout
        assert f"master {bridge}" in link
        assert vm.host.machine is not None
        with vm.host.machine.debug_qmp() as dbg:
            nics = dbg.execute("query-rx-filter")
        assert [n["main-mac"] for n in nics] == ["00:50:56:36:00:01"]
        vm.host.power_off()
        gone = subprocess.run(["ip", "-n", ns, "link", "show", tap], check=False,
                              capture_output=True)
        assert gone.returncode != 0, "the tap outlived its VM"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_power_state_faults(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "state", 16 * MiB)
    fault("InvalidState", vm.host.snapshot_create, "x")
    fault("InvalidState", vm.host.power_off)
    vm.power_on()
    fault("InvalidState", vm.power_on)
    vm.host.reset()
    assert vm.qmp_status() == "running"
    assert vm.host.debug_qemu_io(KEY, "write -P 0x61 0 4096") == ""
    assert vm.host.debug_qemu_io(KEY + 5, "write 0 512").strip()   # no such device
    with open(vm.flat(), "rb") as f:
        assert f.read(4096) == b"\x61" * 4096
    fault("NotFound", vm.host.snapshot_remove, "nope")
    fault("NotFound", vm.host.export_snapshot, "nope", KEY)
    st = vm.host.status()
    assert st["running"] and st["pid"] and not st["consolidation_needed"]
    gi = vm.root / "run" / "fw_cfg" / "opt_stillpoint_guestinfo"
    assert stat_mode(gi) == 0o600 and gi.read_text() == "{}"
    cid = vm.host.snapshot_create("x", cbt=True)["disks"][0]["change_id"]
    vm.host.snapshot_remove("x")
    vm.host.power_off()
    assert vm.host.status()["running"] is False
    with open(vm.flat(), "r+b") as f:     # a restore wrote the flat while the VM was off
        f.write(b"restored")
    vm.power_on()
    assert "changed while powered off" in vm.host.status()["cbt_resets"][-1]["reason"]
    vm.host.snapshot_create("y", cbt=True)
    fault("FileFault", vm.host.cbt_query, "y", KEY, 0, cid, None)


def test_snapshot_time_does_not_grow_with_the_disk(vms: list[VM], tmp_path: Path) -> None:
    small = new_vm(vms, tmp_path, "size2g", 2 * GiB)
    big = new_vm(vms, tmp_path, "size8g", 8 * GiB)
    times: dict[str, list[float]] = {small.name: [], big.name: []}
    for vm, size in ((small, 2 * GiB), (big, 8 * GiB)):
        vm.power_on()
        for k in range(8):   # data spread over the whole disk
            vm.write(k * (size // 8) + 3 * MiB, 4 * MiB, 0x30 + k)
    for rep in range(5):     # interleaved: a noisy machine slows both alike
        for vm in (small, big):
            t0 = time.monotonic()
            snap = vm.host.snapshot_create(f"s{rep}", cbt=True)
            wall = (time.monotonic() - t0) * 1000
            assert vm.qmp_status() == "running"
            vm.write(rep * MiB, 64 * 1024, 0x70 + rep)
            times[vm.name].append(snap["timings_ms"]["snapshot"])
            print(f"{vm.name}: transaction {snap['timings_ms']['snapshot']} ms, "
                  f"snapshot_create {wall:.1f} ms")
            vm.host.snapshot_remove(f"s{rep}")
            assert vm.qmp_status() == "running"
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"snapshot transaction, best/median: 2 GiB {best['size2g']}/{med['size2g']} ms, "
          f"8 GiB {best['size8g']}/{med['size8g']} ms")
    assert all(v < 1000 for v in med.values()), med
    assert max(best.values()) / max(min(best.values()), 5.0) < 5, best


def test_frozen_base_stays_put_and_remove_commits_every_write(vms: list[VM],
                                                               tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "frozen", 64 * MiB)
    vm.power_on()
    rng = random.Random(6)
    model = bytearray(64 * MiB)
    scattered_writes(vm, rng, 30, model)
    snap = vm.host.snapshot_create("snap-1", cbt=True)
    assert snap["disks"][0]["frozen_flat"] == str(vm.flat())
    assert Path(vm.host.state["deltas"][str(KEY)]).name == "frozen-000001-delta.qcow2"
    before = sha(vm.flat())
    assert before == hashlib.sha256(model).hexdigest()   # the flat is the guest's disk
    scattered_writes(vm, rng, 60, model)
    assert sha(vm.flat()) == before, "the frozen base changed while the snapshot existed"
    assert vm.qmp_status() == "running"
    vm.host.snapshot_remove("snap-1")
    st = vm.host.status()
    assert st["snapshot"] is None and not st["consolidation_needed"]
    assert not Path(vm.host.state["deltas"].get(str(KEY), "/nonexistent")).exists()
    assert not (vm.flat().parent / "frozen-000001-delta.qcow2").exists()
    assert vm.flat().read_bytes() == bytes(model), "the flat lacks writes made on the delta"
    assert vm.qmp_status() == "running"


def test_cbt_is_exact_pages_and_unions(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "cbt", 256 * MiB)
    vm.power_on()
    rng = random.Random(61)
    scattered_writes(vm, rng, 40)
    s1 = vm.host.snapshot_create("snap-1", cbt=True)
    cid1 = s1["disks"][0]["change_id"]
    img1 = capture(vm, tmp_path / "img1")
    # "*": the frozen flat's allocated areas, compared with qemu-img's own map
    mapped = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", str(vm.flat())],
                            capture_output=True, text=True, check=True).stdout
    data = merge((e["start"], e["length"]) for e in json.loads(mapped) if e["data"])
    assert vm.areas("snap-1", "*") == data
    assert vm.areas("snap-1", "*", span_cap=5 * BLOCK + 1) == data
    assert vm.areas("snap-1", cid1) == []        # nothing changed since itself
    vm.host.snapshot_remove("snap-1")

    scattered_writes(vm, rng, 60)
    with open(img1, "rb") as f:     # a rewrite of equal bytes: flagged, not changed
        f.seek(10 * MiB)
        same = f.read(BLOCK)
    if len(set(same)) == 1:
        vm.write(10 * MiB, BLOCK, same[0])
    s2 = vm.host.snapshot_create("snap-2", cbt=True)
    cid2 = s2["disks"][0]["change_id"]
    img2 = capture(vm, tmp_path / "img2")
    flagged = vm.areas("snap-2", cid1)
    changed = differing_blocks(img1, img2)
    missed = changed - blocks(flagged)
    print(f"CBT 1→2: {len(changed)} blocks changed, {len(blocks(flagged))} flagged, "
          f"{len(missed)} missed")
    assert not missed, f"changed blocks not reported: {sorted(missed)[:10]}"
    assert len(blocks(flagged)) <= len(changed) + 70    # no wild over-reporting
    # old image + flagged blocks = new image
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(["cp", "--sparse=always", str(img1), str(rebuilt)], check=True)
    with open(img2, "rb") as src, open(rebuilt, "r+b") as dst:
        for off, n in flagged:
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(n))
    assert sha(rebuilt) == sha(img2)
    # paging with a small cap reassembles the same list
    assert vm.areas("snap-2", cid1, span_cap=4 * MiB) == flagged
    assert vm.areas("snap-2", cid1, span_cap=1 * MiB + 7) == flagged
    one = vm.host.cbt_query("snap-2", KEY, 0, cid1, 1 * MiB)
    assert one["start_offset"] == 0 and one["length"] == 1 * MiB
    vm.host.snapshot_remove("snap-2")

    scattered_writes(vm, rng, 30)
    vm.host.snapshot_create("snap-3", cbt=True)
    img3 = capture(vm, tmp_path / "img3")
    since2 = vm.areas("snap-3", cid2)
    since1 = vm.areas("snap-3", cid1)          # two snapshots back: the union
    assert since1 == merge(flagged + since2)
    assert not differing_blocks(img1, img3) - blocks(since1)
    assert not differing_blocks(img2, img3) - blocks(since2)

    # changeIds the snapshot cannot answer
    epoch = cid1.split("/")[0]
    other = "0" * 8 if epoch != "0" * 8 else "1" * 8
    for bad in ("nonsense", f"{other}/1", f"{epoch}/99", ""):
        fault("FileFault", vm.host.cbt_query, "snap-3", KEY, 0, bad, None)
    fault("FileFault", vm.host.cbt_query, "snap-2", KEY, 0, cid1, None)       # removed
    fault("FileFault", vm.host.cbt_query, "snap-3", KEY + 7, 0, cid1, None)   # no such disk
    fault("FileFault", vm.host.cbt_query, "snap-3", KEY, 256 * MiB, cid1, None)
    fault("SnapshotFault", vm.host.snapshot_create, "snap-4", cbt=True)        # one at a time
    vm.host.snapshot_remove("snap-3")
    t0 = time.monotonic()
    err = fault("ApplicationQuiesceFault", vm.host.snapshot_create, "snap-4", quiesce=True,
                freeze_timeout_s=2)
    print(f"quiesce without a guest agent: {err.message} after {time.monotonic() - t0:.1f} s")
    assert vm.host.status()["snapshot"] is None
    assert vm.qmp_status() == "running"

    # CBT off: no bitmaps, no changeId, the epoch ends
    s5 = vm.host.snapshot_create("snap-5", cbt=False)
    assert s5["disks"][0]["change_id"] is None and vm.host.status()["cbt_epoch"] is None
    fault("FileFault", vm.host.cbt_query, "snap-5", KEY, 0, cid2, None)
    assert vm.areas("snap-5", "*")
    vm.host.snapshot_remove("snap-5")
    s6 = vm.host.snapshot_create("snap-6", cbt=True)
    assert s6["disks"][0]["change_id"].split("/")[0] != epoch
    fault("FileFault", vm.host.cbt_query, "snap-6", KEY, 0, cid2, None)
    vm.host.snapshot_remove("snap-6")


def test_only_the_last_bitmaps_are_kept(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "keep", 32 * MiB, max_bitmaps=3)
    vm.power_on()
    cids = []
    for n in range(5):
        vm.write(n * MiB, 4096, 0x40 + n)
        cids.append(vm.host.snapshot_create(f"k{n}", cbt=True)["disks"][0]["change_id"])
        if n < 4:
            vm.host.snapshot_remove(f"k{n}")
    # snapshot k4 keeps bitmaps of k2, k3 (and the recording k4)
    fault("FileFault", vm.host.cbt_query, "k4", KEY, 0, cids[1], None)
    assert blocks(vm.areas("k4", cids[2])) == {3 * MiB // BLOCK, 4 * MiB // BLOCK}
    names = [b["name"] for b in vm.host._node_bitmaps(nodes(KEY).base)]
    assert sorted(names) == ["stillpoint-cbt-3", "stillpoint-cbt-4", "stillpoint-cbt-5"]


def test_kill9_resets_cbt_to_a_new_epoch(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "kill", 64 * MiB)
    pid = vm.power_on()
    vm.write(MiB, 4096, 0x11)
    cid1 = vm.host.snapshot_create("a", cbt=True)["disks"][0]["change_id"]
    vm.host.snapshot_remove("a")
    vm.write(2 * MiB, 4096, 0x12)
    os.kill(pid, signal.SIGKILL)     # a crash: QEMU does not close its images
    deadline = time.monotonic() + 10
    while vm.host.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not vm.host.status()["running"]
    vm.restart_hostd()               # also: hostd finds the state it left
    vm.power_on()
    st = vm.host.status()
    assert st["cbt_resets"] and "inconsistent" in st["cbt_resets"][-1]["reason"], st
    assert vm.host.guest_identity(timeout=0.5) == {"tools_running": False, "ip": None,
                                                   "hostname": None}
    assert st["unclean_stop"] is True
    assert vm.host._ours_by_node() == {nodes(KEY).base: []}
    s = vm.host.snapshot_create("b", cbt=True)
    cid2 = s["disks"][0]["change_id"]
    assert cid2.split("/")[0] != cid1.split("/")[0], (cid1, cid2)
    assert st["cbt_epoch"] == cid2.split("/")[0]
    fault("FileFault", vm.host.cbt_query, "b", KEY, 0, cid1, None)
    assert blocks(vm.areas("b", "*")) >= {MiB // BLOCK, 2 * MiB // BLOCK}
    assert vm.areas("b", cid2) == []
    vm.host.snapshot_remove("b")
    vm.write(5 * MiB, 4096, 0x13)
    s = vm.host.snapshot_create("c", cbt=True)
    assert blocks(vm.areas("c", cid2)) == {5 * MiB // BLOCK}
    # the lab's cbt_reset knob: every changeId so far, the current snapshot's too, is gone
    vm.host.cbt_reset()
    fault("FileFault", vm.host.cbt_query, "c", KEY, 0, cid2, None)
    fault("FileFault", vm.host.cbt_query, "c", KEY, 0, s["disks"][0]["change_id"], None)
    assert vm.host.status()["cbt_epoch"] not in (None, cid2.split("/")[0])
    assert vm.areas("c", "*")
    vm.host.snapshot_remove("c")        # the bitmaps of the read-only base go after the commit
    assert vm.host._ours_by_node() == {nodes(KEY).base: []}
    # killed while a snapshot exists: the base was read-only since the snapshot (QEMU
    # stored its bitmaps when it froze it), so they survive: no reset, the changeId holds
    vm.write(6 * MiB, 4096, 0x14)
    resets = len(vm.host.status()["cbt_resets"])
    cid4 = vm.host.snapshot_create("d", cbt=True)["disks"][0]["change_id"]
    vm.write(7 * MiB, 4096, 0x15)
    os.kill(int(vm.host.status()["pid"]), signal.SIGKILL)
    vm.host.machine.wait_exit(10)  # type: ignore[union-attr]
    vm.power_on()
    st = vm.host.status()
    assert st["snapshot"] == "d" and len(st["cbt_resets"]) == resets, st
    assert vm.areas("d", cid4) == []
    assert 6 * MiB // BLOCK in blocks(vm.areas("d", "*"))
    assert 7 * MiB // BLOCK not in blocks(vm.areas("d", "*"))
    vm.host.snapshot_remove("d")
    with open(vm.flat(), "rb") as f:
        f.seek(7 * MiB)
        assert f.read(4096) == b"\x15" * 4096
    vm.host.snapshot_create("e", cbt=True)
    assert blocks(vm.areas("e", cid4)) == {7 * MiB // BLOCK}   # the delta's write, committed


def test_failed_consolidation_is_flagged_and_consolidate_fixes_it(vms: list[VM],
                                                                   tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "consol", 64 * MiB)
    vm.power_on()
    model = bytearray(64 * MiB)
    rng = random.Random(7)
    scattered_writes(vm, rng, 10, model)
    cid = vm.host.snapshot_create("s", cbt=True)["disks"][0]["change_id"]
    written_since = blocks(scattered_writes(vm, rng, 20, model))
    # The base's flat becomes unwritable (immutable: even root's open fd cannot write).
    if subprocess.run(["chattr", "+i", str(vm.flat())], check=False,
                      capture_output=True).returncode:
        pytest.skip("chattr +i does not work on this file system")
    try:
        err = fault("SnapshotFault", vm.host.snapshot_remove, "s")
        print(f"failed consolidation: {err.message}")
        st = vm.host.status()
        assert st["consolidation_needed"] and st["snapshot"] is None and st["running"]
        assert vm.qmp_status() == "running"
        written_since |= blocks(scattered_writes(vm, rng, 5, model))  # still on its delta
        fault("SnapshotFault", vm.host.snapshot_create, "s2", cbt=True)
        fault("SnapshotFault", vm.host.consolidate)   # still unwritable
    finally:
        subprocess.run(["chattr", "-i", str(vm.flat())], check=True)
    vm.host.consolidate()
    st = vm.host.status()
    assert not st["consolidation_needed"] and st["consolidation_error"] is None
    assert vm.flat().read_bytes() == bytes(model)
    # The retried commit's writes marked the recording bitmap: CBT covers every write.
    vm.host.snapshot_create("s3", cbt=True)
    assert blocks(vm.areas("s3", cid)) >= written_since
    vm.host.snapshot_remove("s3")


def test_power_cycles_keep_snapshot_chain_and_bitmaps(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, "cycle", 64 * MiB, 32 * MiB)
    vm.power_on()
    vm.write(MiB, 4096, 0x21)
    vm.write(MiB, 4096, 0x22, i=1)
    cid1 = vm.host.snapshot_create("p1", cbt=True)["disks"][0]["change_id"]
    vm.host.snapshot_remove("p1")
    vm.write(3 * MiB, 4096, 0x23)
    vm.write(7 * MiB, 4096, 0x24, i=1)
    # clean power off and on: the bitmaps survive
    vm.host.power_off()
    assert not vm.host.status()["running"]
    vm.restart_hostd()
    vm.power_on()
    assert not vm.host.status()["cbt_resets"]
    s2 = vm.host.snapshot_create("p2", cbt=True)
    assert [d["change_id"].split("/")[0] for d in s2["disks"]] == [cid1.split("/")[0]] * 2
    assert blocks(vm.areas("p2", cid1)) == {3 * MiB // BLOCK}
    assert blocks(vm.areas("p2", cid1, i=1)) == {7 * MiB // BLOCK}
    # writes on the delta, then power off with the snapshot: the VM comes back on its delta
    vm.write(9 * MiB, 4096, 0x25)
    frozen = sha(vm.flat())
    vm.host.power_off()
    vm.restart_hostd()
    vm.power_on()
    assert vm.host.status()["snapshot"] == "p2"
    assert blocks(vm.areas("p2", cid1)) == {3 * MiB // BLOCK}
    vm.write(11 * MiB, 4096, 0x26)
    assert sha(vm.flat()) == frozen
    sock, export = vm.host.export_snapshot("p2", KEY)
    import nbd  # the reader's view of the snapshot is the frozen base
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    assert h.get_size() == 64 * MiB and h.is_read_only()
    assert h.pread(4096, 9 * MiB) == bytes(4096) and h.pread(4096, 3 * MiB) == b"\x23" * 4096
    h.shutdown()
    # hostd restarts while QEMU runs: it re-attaches
    pid = vm.host.status()["pid"]
    vm.restart_hostd()
    assert vm.host.status()["running"] and vm.host.status()["pid"] == pid
    vm.host.snapshot_remove("p2")     # online commit of a delta opened at power-on
    with open(vm.flat(), "rb") as f:
        f.seek(9 * MiB)
        assert f.read(4096) == b"\x25" * 4096
        f.seek(11 * MiB)
        assert f.read(4096) == b"\x26" * 4096
    s3 = vm.host.snapshot_create("p3", cbt=True)
    cid3 = s3["disks"][0]["change_id"]
    assert blocks(vm.areas("p3", s2["disks"][0]["change_id"])) == {9 * MiB // BLOCK,
                                                                   11 * MiB // BLOCK}
    # powered off with a snapshot, removed offline: qemu-img commit marks the bitmap too
    vm.write(13 * MiB, 4096, 0x27)
    vm.host.power_off()
    vm.host.snapshot_remove("p3")
    assert not vm.host.status()["consolidation_needed"]
    with open(vm.flat(), "rb") as f:
        f.seek(13 * MiB)
        assert f.read(4096) == b"\x27" * 4096
    vm.power_on()
    assert not vm.host.status()["cbt_resets"]
    vm.host.snapshot_create("p4", cbt=True)
    assert blocks(vm.areas("p4", cid3)) == {13 * MiB // BLOCK}
