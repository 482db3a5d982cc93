"""The pure parts of stillpoint_lab.qemu: QEMU's argv, accelerator choice, changeIds,
extent merging and paging, NBD block-status folding, file naming, and the QMP / guest agent
clients against fake peers on unix sockets (no QEMU)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stillpoint_lab.qemu import cbt
from stillpoint_lab.qemu.accel import TCG_ARGV, accel_argv, cpu_has_virt
from stillpoint_lab.qemu.disks import delta_path, meta_path
from stillpoint_lab.qemu.host_vm import HostFault, PowerOnSpec
from stillpoint_lab.qemu.machine import (
    MachineDisk,
    MachineError,
    MachineSpec,
    Nic,
    build_argv,
    process_title,
)
from stillpoint_lab.qemu.qga import QGA, QGAError, QGATimeout, first_ipv4
from stillpoint_lab.qemu.qmp import QMP, QMPConnectionError, QMPError

pytestmark = pytest.mark.unit

BLOCK = cbt.BLOCK
MiB = 1 << 20


# --- argv ------------------------------------------------------------------------------------
def spec(tmp_path: Path, **kw: object) -> MachineSpec:
    base: dict[str, object] = {
        "name": "vm1", "lab": "sptest6", "run_dir": tmp_path / "run", "accel": tuple(TCG_ARGV),
        "disks": (MachineDisk(2000, tmp_path / "ds" / "vm1-flat.vmdk"),
                  MachineDisk(2001, tmp_path / "ds" / "vm1_1-flat.vmdk",
                              delta=tmp_path / "ds" / "vm1_1-000001-delta.qcow2"))}
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def blockdevs(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]


def test_argv_names_every_block_node_and_boots_disk_0(tmp_path: Path) -> None:
    argv = build_argv(spec(tmp_path, nic=Nic("00:50:56:01:02:03", "sptap0"),
                           fw_cfg={"opt/stillpoint/guestinfo": tmp_path / "gi"},
                           uuid="4210aaaa-bbbb-cccc-dddd-eeeeffff0000"))
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-name") + 1] == "vm1,process=stillpoint-qemu-sptest6-vm1"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=128"
    assert argv[argv.index("-m") + 1] == "1024" and argv[argv.index("-smp") + 1] == "2"
    nodes = {d["node-name"]: d for d in blockdevs(argv)}
    flat = str(tmp_path / "ds" / "vm1-flat.vmdk")
    assert nodes["disk2000-data"] == {"driver": "file", "node-name": "disk2000-data",
                                      "filename": flat}
    assert nodes["disk2000-file"]["filename"] == flat + ".qcow2"
    assert nodes["disk2000-base"] == {"driver": "qcow2", "node-name": "disk2000-base",
                                      "file": "disk2000-file", "data-file": "disk2000-data"}
    assert "disk2000-delta" not in nodes
    assert nodes["disk2001-delta"]["backing"] == "disk2001-base"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-blk-pci,drive=disk2000-base,id=disk2000,bootindex=0" in devices
    assert "virtio-blk-pci,drive=disk2001-delta,id=disk2001" in devices
    assert "virtio-net-pci,netdev=net0,mac=00:50:56:01:02:03" in devices
    assert any("name=org.qemu.guest_agent.0" in d for d in devices)
    assert "tap,id=net0,ifname=sptap0,script=no,downscript=no" in argv
    assert f"name=opt/stillpoint/guestinfo,file={tmp_path / 'gi'}" in argv
    monitors = [a for a in argv if a.startswith("socket,id=qmp")]
    assert len(monitors) == 2 and argv.count("-mon") == 2
    assert argv[argv.index("-uuid") + 1].startswith("4210aaaa")


def test_argv_without_nic_in_a_netns_and_with_commas_escaped(tmp_path: Path) -> None:
    s = spec(tmp_path, run_dir=tmp_path / "a,b", netns="spns1", nic=None, disks=())
    argv = build_argv(s)
    assert argv[:4] == ["ip", "netns", "exec", "spns1"]
    assert "-netdev" not in argv
    assert f"socket,id=qga0,path={tmp_path}/a,,b/qga.sock,server=on,wait=off" in argv


@pytest.mark.parametrize("bad", [{"name": "vm 1"}, {"name": "a,process=x"}, {"lab": ""},
                                 {"fw_cfg": {"etc/x": Path("/f")}}])
def test_argv_refuses_bad_names(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(MachineError):
        build_argv(spec(tmp_path, **bad))


def test_process_title() -> None:
    assert process_title("sptest6", "vm1") == "stillpoint-qemu-sptest6-vm1"


def test_accel_only_with_vmx_or_svm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_has_virt("processor: 0\nflags\t\t: fpu vme de vmx sse\n")
    assert cpu_has_virt("flags : fpu svm lm\n")
    assert not cpu_has_virt("flags : fpu vme de pse tsc msr hypervisor\n")
    assert not cpu_has_virt("model name : vmx-ish CPU\nflags : fpu\n")
    monkeypatch.delenv("STILLPOINT_LAB_ACCEL", raising=False)
    assert accel_argv(force="tcg") == ["-accel", "tcg,tb-size=128", "-cpu", "qemu64"]
    assert accel_argv(force="kvm")[:2] == ["-accel", "kvm"]


def test_file_names() -> None:
    assert meta_path("/ds/vm1/vm1-flat.vmdk") == Path("/ds/vm1/vm1-flat.vmdk.qcow2")
    assert delta_path("/ds/vm1/vm1-flat.vmdk") == Path("/ds/vm1/vm1-000001-delta.qcow2")
    assert delta_path("/ds/vm1/vm1_1-flat.vmdk", 2) == Path("/ds/vm1/vm1_1-000002-delta.qcow2")


def test_power_on_spec_from_hostd_json() -> None:
    s = PowerOnSpec.from_dict({"vm": "vm1", "memory_mib": 512, "cpus": 1, "mac": "m",
                               "disks": [{"key": 2000, "flat": "/ds/f", "capacity_bytes": 4096}],
                               "guestinfo": {"guestinfo.a": "b"}, "sandbox": True})
    assert s.memory_mib == 512 and s.disks[0].key == 2000 and s.disks[0].capacity_bytes == 4096
    assert s.guestinfo == {"guestinfo.a": "b"} and s.tap is None


def test_host_fault_classes() -> None:
    assert HostFault("FileFault", "x").fault_class == "FileFault"
    with pytest.raises(ValueError):
        HostFault("NoSuchFault", "x")


# --- changeIds and extents ----------------------------------------------------------------
def test_change_id_grammar() -> None:
    assert cbt.parse_change_id("*") is None
    cid = cbt.parse_change_id("52de01ab/17")
    assert cid == cbt.ChangeId("52de01ab", 17) and str(cid) == "52de01ab/17"
    for bad in ("", "52de01ab", "52de01ab/", "/3", "XYZ/3", "52de01ab/-1", "52 de/3", "a/b/1"):
        with pytest.raises(ValueError):
            cbt.parse_change_id(bad)
    assert cbt.bitmap_name(4) == "stillpoint-cbt-4"
    assert cbt.bitmap_seq("stillpoint-cbt-4") == 4
    assert cbt.bitmap_seq("stillpoint-cbt-x") is None and cbt.bitmap_seq("other-4") is None


def test_merge_aligns_and_joins() -> None:
    assert cbt.merge([]) == []
    assert cbt.merge([(100, 10)]) == [(0, BLOCK)]
    assert cbt.merge([(BLOCK, 1), (0, 1)]) == [(0, 2 * BLOCK)]          # adjacent
    assert cbt.merge([(0, 3 * BLOCK), (BLOCK, BLOCK)]) == [(0, 3 * BLOCK)]  # contained
    assert cbt.merge([(0, 1), (2 * BLOCK + 5, 1)]) == [(0, BLOCK), (2 * BLOCK, BLOCK)]
    assert cbt.merge([(5 * BLOCK - 1, 2)]) == [(4 * BLOCK, 2 * BLOCK)]   # straddles
    assert cbt.merge([(7, 0)]) == []
    assert cbt.merge([(BLOCK + 3, 10)], end=BLOCK + 512) == [(BLOCK, 512)]


def test_window_and_paging() -> None:
    capacity = 10 * BLOCK + 512      # not a multiple of the block
    assert cbt.window(0, capacity, None) == (0, capacity)
    assert cbt.window(0, capacity, 3 * BLOCK + 7) == (0, 3 * BLOCK)
    assert cbt.window(0, capacity, 1) == (0, BLOCK)                     # at least a block
    assert cbt.window(9 * BLOCK, capacity, 4 * BLOCK) == (9 * BLOCK, capacity)
    for bad in (-1, capacity, capacity + 1):
        with pytest.raises(ValueError):
            cbt.window(bad, capacity, None)
    extents = [(100, 10), (2 * BLOCK, 2 * BLOCK + 1), (10 * BLOCK + 1, 100)]
    whole = cbt.page(extents, 0, capacity, None)
    assert whole == {"start_offset": 0, "length": capacity,
                     "areas": [[0, BLOCK], [2 * BLOCK, 3 * BLOCK], [10 * BLOCK, 512]]}
    got: list[tuple[int, int]] = []
    start = 0
    while start < capacity:
        p = cbt.page(extents, start, capacity, 2 * BLOCK)
        assert p["start_offset"] == start
        for off, n in p["areas"]:  # type: ignore[attr-defined]
            assert start <= off < off + n <= start + p["length"]  # type: ignore[operator]
        got += [tuple(a) for a in p["areas"]]  # type: ignore[attr-defined, misc]
        start += p["length"]  # type: ignore[operator]
    assert cbt.merge(got, end=capacity) == [tuple(a) for a in whole["areas"]]  # type: ignore[attr-defined]


def test_allocated_extents_of_a_sparse_file(tmp_path: Path) -> None:
    f = tmp_path / "flat"
    with open(f, "wb") as h:
        h.truncate(64 * MiB)
        h.seek(MiB + 10)
        h.write(b"x" * 100)
        h.seek(40 * MiB)
        h.write(b"y" * (2 * BLOCK))
    ext = cbt.allocated_extents(f)
    # file systems allocate in their own block size: every written byte must be covered,
    # nothing far away may be, and the result is merged and aligned
    assert ext == cbt.merge(ext)
    covered = {b for o, n in ext for b in range(o // BLOCK, (o + n) // BLOCK)}
    assert {MiB // BLOCK, 40 * MiB // BLOCK, 40 * MiB // BLOCK + 1} <= covered
    assert len(covered) <= 8
    assert cbt.allocated_extents(f, 2 * MiB, 30 * MiB) == []
    (tmp_path / "empty").write_bytes(b"")
    assert cbt.allocated_extents(tmp_path / "empty") == []


def test_union_of_block_status_replies() -> None:
    reply = {"qemu:dirty-bitmap:a": [BLOCK, 0, BLOCK, 1, 6 * BLOCK, 0],
             "qemu:dirty-bitmap:b": [3 * BLOCK, 1, BLOCK, 0]}         # answers less
    dirty, covered = cbt.union_from_block_status(reply, 10 * BLOCK)
    assert covered == 4 * BLOCK
    assert cbt.merge(dirty) == [(10 * BLOCK, 3 * BLOCK)]
    assert cbt.union_from_block_status({}, 0) == ([], 0)


def test_first_ipv4_skips_loopback() -> None:
    ifaces = [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4",
                                               "ip-address": "127.0.0.1"}]},
              {"name": "ens3", "ip-addresses": [
                  {"ip-address-type": "ipv6", "ip-address": "fe80::1"},
                  {"ip-address-type": "ipv4", "ip-address": "10.77.1.20"}]}]
    assert first_ipv4(ifaces) == "10.77.1.20"
    assert first_ipv4(ifaces[:1]) is None


# --- QMP and guest agent clients against fake peers -------------------------------------
def fake_server(path: Path, handler: Callable[[socket.socket], None]) -> Iterator[None]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            try:
                handler(conn)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    srv.close()
    t.join(5)


def lines(conn: socket.socket) -> Iterator[dict[str, object]]:
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield json.loads(line.lstrip(b"\xff"))


def send(conn: socket.socket, msg: object, prefix: bytes = b"") -> None:
    conn.sendall(prefix + json.dumps(msg).encode() + b"\n")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="spq", dir="/tmp") as d:   # short socket paths
        yield Path(d)


def test_qmp_commands_errors_and_events(sock_dir: Path) -> None:
    path = sock_dir / "q.sock"

    def qemu(conn: socket.socket) -> None:
        send(conn, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
        for msg in lines(conn):
            cmd, mid = msg["execute"], msg.get("id")
            if cmd == "qmp_capabilities":
                send(conn, {"return": {}, "id": mid})
            elif cmd == "query-status":
                send(conn, {"event": "BLOCK_JOB_READY", "data": {"device": "j1"}})
                send(conn, {"return": {"status": "running"}, "id": mid})
            elif cmd == "block-commit":
                assert msg["arguments"] == {"job-id": "j2", "base-node": "b"}
                send(conn, {"error": {"class": "GenericError", "desc": "nope"}, "id": mid})
            elif cmd == "block-job-complete":
                send(conn, {"return": {}, "id": mid})
                send(conn, {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j1"}})
            elif cmd == "hang":
                pass

    gen = fake_server(path, qemu)
    next(gen)
    q = QMP(path, timeout=5).connect(wait_s=2)
    assert q.greeting["QMP"]["version"]["qemu"]["major"] == 7
    assert q.execute("query-status") == {"status": "running"}
    with pytest.raises(QMPError) as err:
        q.execute("block-commit", job_id="j2", base_node="b")
    assert err.value.cls == "GenericError" and err.value.desc == "nope"
    assert q.wait_event("BLOCK_JOB_READY", match={"device": "j1"}, timeout=1)["data"] == {
        "device": "j1"}
    q.execute("block-job-complete", device="j1")
    assert q.wait_event(("BLOCK_JOB_COMPLETED", "X"), timeout=2)["event"] == "BLOCK_JOB_COMPLETED"
    with pytest.raises(QMPConnectionError):
        q.wait_event("NEVER", timeout=0.3)
    with pytest.raises(QMPConnectionError):
        q.execute("hang", timeout=0.3)
    q.close()
    with pytest.raises(StopIteration):
        next(gen)


def test_qga_resyncs_after_stale_replies_and_times_out_without_an_agent(
        sock_dir: Path) -> None:
    path = sock_dir / "g.sock"

    def agent(conn: socket.socket) -> None:
        conn.sendall(b'{"return": "stale from before"}\n garbage')
        for msg in lines(conn):
            cmd = msg["execute"]
            if cmd == "guest-sync-delimited":
                send(conn, {"return": 12345})          # an old sync's answer first
                send(conn, {"return": msg["arguments"]["id"]}, prefix=b"\xff")  # type: ignore[index]
            elif cmd == "guest-ping":
                send(conn, {"return": {}})
            elif cmd == "guest-get-host-name":
                send(conn, {"return": {"host-name": "db1"}})
            elif cmd == "guest-fsfreeze-freeze":
                send(conn, {"error": {"class": "GenericError", "desc": "hook failed"}})

    gen = fake_server(path, agent)
    next(gen)
    g = QGA(path, timeout=2)
    assert g.ping()
    assert g.host_name() == "db1"
    with pytest.raises(QGAError) as err:
        g.fsfreeze_freeze(timeout=2)
    assert err.value.desc == "hook failed" and not isinstance(err.value, QGATimeout)
    g.close()
    with pytest.raises(StopIteration):
        next(gen)

    silent = sock_dir / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # QEMU's end, no agent behind
    srv.bind(str(silent))
    srv.listen(1)
    try:
        g = QGA(silent)
        assert not g.ping(timeout=0.3)
        with pytest.raises(QGATimeout) as terr:
            g.fsfreeze_freeze(timeout=0.3)
        assert terr.value.command == "guest-sync-delimited"   # the freeze was never sent
    finally:
        srv.close()
    assert not QGA(sock_dir / "missing.sock").ping(timeout=0.2)
    assert os.path.exists(silent)


def test_a_freeze_that_times_out_is_thawed_and_faults(sock_dir: Path) -> None:
    """HostVM's quiesce window against a fake agent whose freeze hook hangs."""
    from types import SimpleNamespace

    from stillpoint_lab.qemu.host_vm import HostVM

    path = sock_dir / "a.sock"
    seen: list[str] = []

    def agent(conn: socket.socket) -> None:
        for msg in lines(conn):
            cmd = str(msg["execute"])
            seen.append(cmd)
            if cmd == "guest-sync-delimited":
                send(conn, {"return": msg["arguments"]["id"]}, prefix=b"\xff")  # type: ignore[index]
            elif cmd == "guest-fsfreeze-freeze":
                pass                       # the hook hangs: no answer in time
            elif cmd == "guest-fsfreeze-thaw":
                send(conn, {"return": 1})

    gen = fake_server(path, agent)
    next(gen)
    vm = HostVM("q", sock_dir / "run", lab="sptest6")
    machine = SimpleNamespace(qga=QGA(path), running=True)
    with pytest.raises(HostFault) as err:
        vm._freeze(machine, 0.5)  # type: ignore[arg-type]
    assert err.value.fault_class == "ApplicationQuiesceFault"
    assert "guest-fsfreeze-freeze" in seen and seen[-1] == "guest-fsfreeze-thaw"
    machine.qga.close()
    with pytest.raises(StopIteration):
        next(gen)
