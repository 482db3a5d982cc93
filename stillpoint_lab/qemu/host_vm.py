"""`HostVM`: the vSphere operations of one lab VM, done by ESXi's means on one QEMU process.

What hostd calls (docs/lab-hypervisor.md): power on / off / reset, status, snapshot create /
remove, consolidate, QueryChangedDiskAreas, CBT reset, guest identity, and an NBD export of
a snapshot's frozen disk for readers. Failures are `HostFault(fault_class, message)` with
the vim fault class hostd replies with (FAULTS).

Snapshots are external: one QMP `transaction` over all disks disables the recording CBT
bitmap, adds the next one (persistent, enabled, on the base node) and `blockdev-snapshot-sync`s
the base into `<name>-000001-delta.qcow2`. The base flat file then stops changing until
`snapshot_remove` commits the delta back (`block-commit` + `block-job-complete` online,
`qemu-img commit` offline). A failed commit leaves the VM on the delta with
`consolidation_needed`; `consolidate()` retries it. One snapshot per VM at a time (a second
one is a SnapshotFault: a lab limit). A powered-off VM (one that hostd has powered on
before, so that its disks are known) gets the same with qemu-img and qemu-nbd (offline.py).

CBT: bitmap `stillpoint-cbt-<n>` records the writes since snapshot n (a commit's writes
mark it too), changeId `<epoch>/<n>` (grammar in cbt.py). Only the last MAX_BITMAPS (8)
bitmaps per disk are kept: a changeId older than that is a FileFault, as is one from
another epoch, one newer than the snapshot, or any changeId while CBT is off. A QEMU that
did not stop cleanly reopens its bitmaps "inconsistent"; the next power-on then drops all
of them and starts a new epoch (ESXi's CBT reset: the next backup is a full). So does a
flat file that changed while the VM was off, and `cbt_reset()`. (A kill while a snapshot
exists costs nothing: QEMU stored the base's bitmaps when it made the base read-only.)

State (snapshot, deltas, CBT epoch and bitmaps, the last power-on spec) lives in
`<run dir>/state.json`, written atomically after every change, so that a restarted hostd
re-attaches to a running QEMU and finds its snapshot chain and CBT state.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillpoint_lab.qemu import cbt as cbtlib
from stillpoint_lab.qemu import offline
from stillpoint_lab.qemu.cbt import BLOCK, bitmap_name, bitmap_seq
from stillpoint_lab.qemu.disks import (
    DiskError,
    bitmaps_offline,
    commit_offline,
    create_flat,
    delta_path,
    ensure_meta,
    file_stamp,
    meta_path,
    remove_bitmaps_offline,
)
from stillpoint_lab.qemu.machine import (
    Machine,
    MachineDisk,
    MachineError,
    MachineSpec,
    Nic,
    create_tap,
    delete_tap,
    nodes,
)
from stillpoint_lab.qemu.nbd_bitmap import NBDBitmapError, dirty_extents
from stillpoint_lab.qemu.qga import QGAError, QGATimeout
from stillpoint_lab.qemu.qmp import QMPError

FAULTS = ("SnapshotFault", "FileFault", "ApplicationQuiesceFault", "InvalidState", "NotFound")
MAX_BITMAPS = 8
STATE_VERSION = 1
FREEZE_TIMEOUT_S = 60.0
THAW_TIMEOUT_S = 10.0
THAW_RETRY_S = 300.0
COMMIT_TIMEOUT_S = 600.0
FW_CFG_GUESTINFO = "opt/stillpoint/guestinfo"
FW_CFG_IDENTITY = "opt/stillpoint/lab-identity"


class HostFault(Exception):
    """A vSphere fault for hostd to return: `fault_class` is one of FAULTS."""

    def __init__(self, fault_class: str, message: str) -> None:
        if fault_class not in FAULTS:
            raise ValueError(f"unknown fault class {fault_class}")
        self.fault_class = fault_class
        self.message = message
        super().__init__(f"{fault_class}: {message}")


@dataclass(frozen=True)
class VMDisk:
    key: int
    flat: Path
    capacity_bytes: int | None = None   # a missing flat is created sparse with this size


@dataclass(frozen=True)
class PowerOnSpec:
    """What a power-on needs (hostd's /vm/power-on body, plus the lab's NIC plumbing)."""

    memory_mib: int = 1024
    cpus: int = 2
    disks: tuple[VMDisk, ...] = ()
    mac: str | None = None
    tap: str | None = None             # no tap: no NIC
    bridge: str | None = None          # set: create the tap on this bridge, delete it after
    netns: str | None = None           # the tap's (and so QEMU's) network namespace
    uuid: str | None = None
    guestinfo: dict[str, str] = field(default_factory=dict)   # → fw_cfg opt/stillpoint/guestinfo
    identity: dict[str, Any] | None = None                    # → fw_cfg opt/stillpoint/lab-identity
    fw_cfg: dict[str, str] = field(default_factory=dict)      # more fw_cfg name → content

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PowerOnSpec:
        return cls(
            memory_mib=int(d.get("memory_mib", 1024)), cpus=int(d.get("cpus", 2)),
            disks=tuple(VMDisk(int(x["key"]), Path(x["flat"]),
                               int(x["capacity_bytes"]) if x.get("capacity_bytes") else None)
                        for x in d.get("disks", [])),
            mac=d.get("mac"), tap=d.get("tap"), bridge=d.get("bridge"), netns=d.get("netns"),
            uuid=d.get("uuid"), guestinfo=dict(d.get("guestinfo") or {}),
            identity=d.get("identity"), fw_cfg=dict(d.get("fw_cfg") or {}))


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _fresh_state(name: str) -> dict[str, Any]:
    return {"version": STATE_VERSION, "vm": name, "machine": None, "qemu_started": False,
            "unclean_stop": False, "killed": False, "snapshot": None, "deltas": {}, "next_seq": 1,
            "cbt": {"epoch": None, "bitmaps": [], "recording": None},
            "cbt_resets": [], "stamps": {}, "consolidation_error": None, "tap_created": None}


class HostVM:
    """One VM's vSphere operations (see the module docstring). Thread-safe."""

    def __init__(self, name: str, run_dir: str | Path, *, lab: str,
                 max_bitmaps: int = MAX_BITMAPS, freeze_timeout_s: float = FREEZE_TIMEOUT_S,
                 commit_timeout_s: float = COMMIT_TIMEOUT_S) -> None:
        self.name = name
        self.lab = lab
        self.run_dir = Path(run_dir).absolute()
        self.max_bitmaps = max(2, max_bitmaps)
        self.freeze_timeout_s = freeze_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self._lock = threading.RLock()
        self._counter = 0
        self._cbt_exports: dict[int, tuple[tuple[str, ...], str]] = {}  # key → (bitmaps, export)
        self._nbd_server_up = False
        self._offline_cbt: dict[int, tuple[str, ...]] = {}   # key → bitmaps its qemu-nbd has
        self.machine: Machine | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load()
        for purpose in offline.running_nbd(self.run_dir):
            if purpose.startswith("cbt"):   # a former hostd's: its bitmaps are unknown here
                offline.stop_nbd(self.run_dir, purpose)
        self._reattach()

    # --- state ------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _fresh_state(self.name)
        except ValueError as err:
            raise HostFault("FileFault", f"{self.state_path} is not JSON: {err}") from err
        if data.get("version") != STATE_VERSION:
            raise HostFault("FileFault", f"{self.state_path}: unknown state version "
                                         f"{data.get('version')!r}")
        return {**_fresh_state(self.name), **data}

    def _save(self) -> None:
        tmp = self.state_path.with_name("state.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def _machine_spec(self) -> MachineSpec:
        m = self.state["machine"]
        deltas = self.state["deltas"]
        return MachineSpec(
            name=self.name, lab=self.lab, run_dir=self.run_dir,
            memory_mib=m["memory_mib"], cpus=m["cpus"],
            disks=tuple(MachineDisk(d["key"], Path(d["flat"]),
                                    Path(deltas[str(d["key"])]) if str(d["key"]) in deltas
                                    else None) for d in m["disks"]),
            nic=Nic(m["nic"]["mac"], m["nic"]["tap"]) if m.get("nic") else None,
            fw_cfg={k: Path(v) for k, v in m.get("fw_cfg", {}).items()},
            uuid=m.get("uuid"), netns=m.get("netns"))

    def _reattach(self) -> None:
        if not self.state.get("machine"):
            return
        machine = Machine(self._machine_spec())
        if machine.attach():
            self.machine = machine
            try:   # CBT exports of the hostd before us hold their bitmaps busy
                for e in machine.qmp.execute("query-block-exports"):
                    if str(e["id"]).startswith("cbt"):
                        self._export_del(e["id"])
            except QMPError:
                pass
        elif self.state["qemu_started"]:
            self._noticed_stop()   # QEMU went away while nobody watched

    def _forget_machine(self) -> None:
        self.machine = None
        self._cbt_exports.clear()   # they died with QEMU
        self._nbd_server_up = False

    def _noticed_stop(self) -> None:
        """QEMU went away by itself (guest shutdown, crash): let go of it and its tap."""
        self._forget_machine()
        self._drop_tap()
        self._note_stopped()

    def _note_stopped(self) -> None:
        """QEMU is gone: record the flats' stamps (to see a change while the VM is off)."""
        self.state["qemu_started"] = False
        self.state["stamps"] = {}
        for d in (self.state.get("machine") or {}).get("disks", []):
            try:
                self.state["stamps"][str(d["key"])] = file_stamp(d["flat"])
            except OSError:
                pass
        self._save()

    def _disks(self) -> list[dict[str, Any]]:
        return list((self.state.get("machine") or {}).get("disks", []))

    def _disk(self, key: int) -> dict[str, Any] | None:
        return next((d for d in self._disks() if int(d["key"]) == int(key)), None)

    def _running_machine(self, what: str) -> Machine:
        if self.machine is None or not self.machine.running:
            if self.machine is not None and self.state["qemu_started"]:
                self._noticed_stop()
            raise HostFault("InvalidState", f"{self.name} is powered off: cannot {what}")
        return self.machine

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{os.getpid()}-{self._counter}"

    def close(self) -> None:
        """Let go of QEMU (hostd stopping): connections closed, the VM keeps running."""
        with self._lock:
            if self.machine is not None:
                self.machine.close()

    # --- power ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.machine is not None and self.machine.running

    def power_on(self, spec: PowerOnSpec) -> dict[str, Any]:
        """Start QEMU (not wait for the guest): `{pid}`. A VM with a snapshot (or a pending
        consolidation) runs on its deltas. Drops the CBT bitmaps and starts a new epoch if
        QEMU did not stop cleanly or a flat file changed while the VM was off."""
        with self._lock:
            if self.running:
                raise HostFault("InvalidState", f"{self.name} is already powered on")
            if not spec.disks:
                raise HostFault("InvalidState", f"{self.name} has no disks")
            keys = {str(d.key) for d in spec.disks}
            stray = set(self.state["deltas"]) - keys
            if stray:
                raise HostFault("FileFault", f"{self.name}: deltas of disks {sorted(stray)} "
                                             "that the VM no longer has")
            self._stop_offline_servers()   # qemu-nbd holds the images QEMU must open
            reset_reason = None
            for d in spec.disks:
                try:
                    if not Path(d.flat).exists() and d.capacity_bytes:
                        create_flat(d.flat, d.capacity_bytes)
                    ensure_meta(d.flat)
                except (DiskError, OSError) as err:
                    raise HostFault("FileFault", f"disk {d.key}: {err}") from err
                delta = self.state["deltas"].get(str(d.key))
                if delta and not Path(delta).is_file():
                    raise HostFault("FileFault", f"disk {d.key}: delta {delta} is missing")
                old = self.state["stamps"].get(str(d.key))
                if old is not None and old != file_stamp(d.flat):
                    reset_reason = f"disk {d.key}'s flat file changed while powered off"
            if self.state["killed"]:
                reset_reason = reset_reason or "QEMU did not stop cleanly (killed)"
            self.state["machine"] = {
                "memory_mib": spec.memory_mib, "cpus": spec.cpus, "uuid": spec.uuid,
                "disks": [{"key": d.key, "flat": str(Path(d.flat).absolute())}
                          for d in spec.disks],
                "nic": {"mac": spec.mac, "tap": spec.tap} if spec.tap and spec.mac else None,
                "fw_cfg": self._write_fw_cfg(spec), "netns": spec.netns}
            if spec.tap and spec.bridge:
                try:
                    create_tap(spec.tap, spec.bridge, netns=spec.netns)
                except MachineError as err:
                    raise HostFault("InvalidState", str(err)) from err
                self.state["tap_created"] = {"tap": spec.tap, "netns": spec.netns}
            self._forget_machine()
            machine = Machine(self._machine_spec())
            try:
                pid = machine.start()
            except MachineError as err:
                self._drop_tap()
                self._save()
                raise HostFault("InvalidState", f"{self.name}: {err}") from err
            self.machine = machine
            self.state["qemu_started"] = True
            self.state["stamps"] = {}     # valid only from a stop to the next start
            self._save()
            self._check_bitmaps(reset_reason)
            return {"pid": pid}

    def _write_fw_cfg(self, spec: PowerOnSpec) -> dict[str, str]:
        values = dict(spec.fw_cfg)
        values[FW_CFG_GUESTINFO] = json.dumps(spec.guestinfo, sort_keys=True)
        if spec.identity is not None:
            values[FW_CFG_IDENTITY] = json.dumps(spec.identity, sort_keys=True)
        out = {}
        fw_dir = self.run_dir / "fw_cfg"
        fw_dir.mkdir(mode=0o700, exist_ok=True)
        for name, content in values.items():
            path = fw_dir / name.replace("/", "_")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
            os.chmod(path, 0o600)
            out[name] = str(path)
        return out

    def _drop_tap(self) -> None:
        tap = self.state.get("tap_created")
        if tap:
            delete_tap(tap["tap"], netns=tap.get("netns"))
            self.state["tap_created"] = None

    def power_off(self) -> dict[str, Any]:
        """QMP `quit`: a power cut for the guest, a clean stop for QEMU (bitmaps stored)."""
        with self._lock:
            if not self.running:
                if self.state["qemu_started"]:   # it stopped by itself (guest shutdown)
                    self._noticed_stop()
                raise HostFault("InvalidState", f"{self.name} is already powered off")
            assert self.machine is not None
            clean = self.machine.quit()
            self._forget_machine()
            self.state["killed"] = not clean
            self._drop_tap()
            self._note_stopped()
            return {}

    def kill(self) -> None:
        """SIGKILL QEMU (a host crash; the lab's fault injection)."""
        with self._lock:
            if self.machine is not None:
                self.machine.kill9()
                self._forget_machine()
                self.state["killed"] = True
                self._drop_tap()
                self._note_stopped()

    def reset(self) -> dict[str, Any]:
        with self._lock:
            machine = self._running_machine("reset")
            try:
                machine.reset()
            except QMPError as err:
                raise HostFault("InvalidState", f"reset: {err}") from err
            return {}

    def status(self) -> dict[str, Any]:
        running = self.running
        if not running and self.state["qemu_started"]:
            with self._lock:
                if not self.running and self.state["qemu_started"]:
                    self._noticed_stop()
        snap = self.state["snapshot"]
        return {"running": running, "pid": self.machine.pid if running and self.machine else None,
                "consolidation_needed": bool(self.state["deltas"]) and snap is None,
                "consolidation_error": self.state["consolidation_error"],
                "snapshot": snap["id"] if snap else None,
                "cbt_epoch": self.state["cbt"]["epoch"],
                "unclean_stop": bool(self.state["unclean_stop"]),
                "cbt_resets": list(self.state["cbt_resets"][-5:])}

    def guest_identity(self, *, timeout: float = 3.0) -> dict[str, Any]:
        """What VMware Tools would report: `{tools_running, ip, hostname}` (None if unknown)."""
        out: dict[str, Any] = {"tools_running": False, "ip": None, "hostname": None}
        machine = self.machine
        if machine is None or not machine.running:
            return out
        qga = machine.qga
        if not qga.ping(timeout=timeout):
            return out
        out["tools_running"] = True
        try:
            out["ip"] = qga.first_ipv4(timeout=timeout)
            out["hostname"] = qga.host_name(timeout=timeout)
        except QGAError:
            pass
        return out

    def debug_qemu_io(self, key: int, command: str) -> str:
        """Lab only: HMP `qemu-io` on disk `key`'s device, so writes go where the guest's go
        (the delta while a snapshot exists), on the spare QMP monitor. QEMU 7.2 prints
        qemu-io's own output (e.g. "wrote 4096/4096 bytes", also its complaints about a
        bad command) on its stdout (qemu.log): the reply is empty then; HMP's own errors
        (no such device, a permission conflict) come back as the reply's text."""
        machine = self._running_machine("run qemu-io")
        if '"' in command or "\n" in command:
            raise HostFault("InvalidState", f"bad qemu-io command {command!r}")
        with machine.debug_qmp() as dbg:
            return dbg.hmp(f'qemu-io -d {nodes(int(key)).backend} "{command}"')

    # --- bitmaps ----------------------------------------------------------------------
    def _node_bitmaps(self, node: str) -> list[dict[str, Any]]:
        assert self.machine is not None
        for n in self.machine.qmp.execute("query-named-block-nodes", flat=True):
            if n.get("node-name") == node:
                return [b for b in n.get("dirty-bitmaps", []) if "name" in b]
        raise HostFault("FileFault", f"{self.name}: no block node {node}")

    def _remove_bitmaps(self, names_by_node: dict[str, list[str]], *,
                        defer_readonly: bool = False) -> None:
        """Remove bitmaps. `defer_readonly`: skip those of a base that is read-only because
        a snapshot's delta is on top of it; `_remove_leftovers` gets them after the commit
        (they are no longer in the state, so nothing reads them meanwhile)."""
        if not any(names_by_node.values()):
            return
        assert self.machine is not None
        self._drop_cbt_exports()   # an exported bitmap is busy
        for node, names in names_by_node.items():
            for name in names:
                try:
                    self.machine.qmp.execute("block-dirty-bitmap-remove", node=node, name=name)
                except QMPError as err:
                    if defer_readonly and "readonly" in err.desc.replace("read-only", "readonly"):
                        continue
                    raise HostFault("FileFault", f"cannot remove bitmap {name} of {node}: "
                                                 f"{err}") from err

    def _remove_leftovers(self) -> None:
        """Remove our bitmaps that the state does not know (deferred removals)."""
        expected = {bitmap_name(s) for s in self.state["cbt"]["bitmaps"]}
        self._remove_bitmaps({node: [b["name"] for b in bms if b["name"] not in expected]
                              for node, bms in self._ours_by_node().items()},
                             defer_readonly=True)

    def _ours_by_node(self) -> dict[str, list[dict[str, Any]]]:
        return {nodes(int(d["key"])).base: [b for b in self._node_bitmaps(nodes(
            int(d["key"])).base) if bitmap_seq(b["name"]) is not None] for d in self._disks()}

    def _check_bitmaps(self, reset_reason: str | None) -> None:
        """After QEMU started: drop every CBT bitmap and start a new epoch if any is
        inconsistent (QEMU did not stop cleanly), one we expect is missing, or
        `reset_reason`. `unclean_stop` then tells whether the last stop was unclean."""
        ours = self._ours_by_node()
        expected = {bitmap_name(s) for s in self.state["cbt"]["bitmaps"]}
        unclean = bool(self.state["killed"])
        for node, bms in ours.items():
            if any(b.get("inconsistent") for b in bms):
                unclean = True
                reset_reason = reset_reason or (
                    f"bitmaps of {node} are inconsistent (QEMU did not stop cleanly)")
            missing = expected - {b["name"] for b in bms}
            if missing:
                reset_reason = reset_reason or f"{node} lacks bitmaps {sorted(missing)}"
        if reset_reason is not None:
            self._reset_cbt(ours, reset_reason)
        else:   # leftovers from an older state: not ours to keep
            self._remove_bitmaps({node: [b["name"] for b in bms if b["name"] not in expected]
                                  for node, bms in ours.items()}, defer_readonly=True)
        self.state["unclean_stop"] = unclean   # about the stop before this power-on
        self.state["killed"] = False
        self._save()

    def _reset_cbt(self, ours: dict[str, list[dict[str, Any]]], reason: str) -> None:
        self._remove_bitmaps({node: [b["name"] for b in bms] for node, bms in ours.items()},
                             defer_readonly=True)
        cbt = self.state["cbt"]
        self.state["cbt_resets"].append({"time": time.time(), "reason": reason,
                                         "old_epoch": cbt["epoch"]})
        self.state["cbt"] = {"epoch": _new_epoch() if cbt["epoch"] is not None else None,
                             "bitmaps": [], "recording": None}
        self._save()

    def cbt_reset(self) -> dict[str, Any]:
        """Drop all CBT bitmaps and start a new epoch (every changeId handed out so far,
        including the current snapshot's, becomes a FileFault)."""
        with self._lock:
            if self.running:
                self._reset_cbt(self._ours_by_node(), "cbt_reset")
                return {}
            self._stop_offline_servers()
            for d in self._disks():
                meta = meta_path(d["flat"])
                if meta.exists():
                    names = [b["name"] for b in bitmaps_offline(meta)
                             if bitmap_seq(b["name"]) is not None]
                    try:
                        remove_bitmaps_offline(meta, names)
                    except DiskError as err:
                        raise HostFault("FileFault", str(err)) from err
            self._reset_cbt({}, "cbt_reset")
            return {}

    # --- snapshots ------------------------------------------------------------------------
    def snapshot_create(self, snapshot_id: str, *, quiesce: bool = False, cbt: bool = True,
                        freeze_timeout_s: float | None = None) -> dict[str, Any]:
        """Take snapshot `snapshot_id` of every disk in one transaction:
        `{disks: [{key, frozen_flat, change_id}], timings_ms: {freeze, snapshot, thaw}}`."""
        with self._lock:
            if self.state["snapshot"] is not None:
                raise HostFault("SnapshotFault", f"{self.name} already has snapshot "
                                f"{self.state['snapshot']['id']} (the lab keeps one at a time)")
            if self.state["deltas"]:
                raise HostFault("SnapshotFault", f"{self.name} needs disk consolidation first")
            if not self.running:
                self._note_if_stopped()
                return self._snapshot_offline(snapshot_id, cbt)
            machine = self._running_machine("take a snapshot")
            qmp = machine.qmp
            seq = int(self.state["next_seq"])
            disks = self._disks()
            state_cbt = self.state["cbt"]
            # CBT housekeeping before the freeze window (and while the bases are writable).
            if cbt:
                if state_cbt["epoch"] is None:
                    state_cbt.update(epoch=_new_epoch(), bitmaps=[], recording=None)
                old = [s for s in state_cbt["bitmaps"] if s <= seq - self.max_bitmaps]
                if old:
                    self._remove_bitmaps({nodes(int(d["key"])).base: [bitmap_name(s) for s in old]
                                          for d in disks})
                    state_cbt["bitmaps"] = [s for s in state_cbt["bitmaps"] if s not in old]
                    if state_cbt["recording"] in old:
                        state_cbt["recording"] = None
            else:
                self._remove_bitmaps({node: [b["name"] for b in bms]
                                      for node, bms in self._ours_by_node().items()})
                self.state["cbt"] = state_cbt = {"epoch": None, "bitmaps": [], "recording": None}
            self._save()
            actions: list[dict[str, Any]] = []
            deltas = {}
            for d in disks:
                n = nodes(int(d["key"]))
                if cbt:
                    if state_cbt["recording"] is not None:
                        actions.append({"type": "block-dirty-bitmap-disable", "data": {
                            "node": n.base, "name": bitmap_name(state_cbt["recording"])}})
                    actions.append({"type": "block-dirty-bitmap-add", "data": {
                        "node": n.base, "name": bitmap_name(seq), "persistent": True,
                        "granularity": BLOCK}})
                delta = delta_path(d["flat"])
                delta.unlink(missing_ok=True)   # a leftover: no snapshot uses it
                deltas[str(d["key"])] = str(delta)
                actions.append({"type": "blockdev-snapshot-sync", "data": {
                    "node-name": n.base, "snapshot-file": str(delta),
                    "snapshot-node-name": n.delta, "format": "qcow2",
                    "mode": "absolute-paths"}})
            timings: dict[str, float] = {"freeze": 0.0, "snapshot": 0.0, "thaw": 0.0}
            if quiesce:
                t0 = time.monotonic()
                self._freeze(machine, freeze_timeout_s or self.freeze_timeout_s)
                timings["freeze"] = _ms(t0)
            thaw_error = None
            try:
                t0 = time.monotonic()
                try:
                    qmp.execute("transaction", actions=actions, timeout=60)
                except QMPError as err:
                    for p in deltas.values():
                        Path(p).unlink(missing_ok=True)
                    raise HostFault("SnapshotFault", f"snapshot of {self.name}: {err}") from err
                timings["snapshot"] = _ms(t0)
            finally:
                if quiesce:
                    t0 = time.monotonic()
                    thaw_error = self._thaw(machine)
                    timings["thaw"] = _ms(t0)
            self.state["snapshot"] = {"id": snapshot_id, "seq": seq, "cbt": cbt,
                                      "created": time.time()}
            self.state["deltas"] = deltas
            self.state["next_seq"] = seq + 1
            self.state["consolidation_error"] = None
            if cbt:
                state_cbt["bitmaps"].append(seq)
                state_cbt["recording"] = seq
            self._save()
            out: dict[str, Any] = {
                "disks": [{"key": int(d["key"]), "frozen_flat": d["flat"],
                           "change_id": f"{state_cbt['epoch']}/{seq}" if cbt else None}
                          for d in disks],
                "timings_ms": timings}
            if thaw_error:
                out["thaw_error"] = thaw_error
            return out

    def _snapshot_offline(self, snapshot_id: str, cbt: bool) -> dict[str, Any]:
        """A snapshot of a powered-off VM with qemu-img (quiesce does not apply: nothing
        runs). Before touching the bitmaps, checks them as a power-on would."""
        disks = self._disks()
        if not disks:
            raise HostFault("InvalidState", f"{self.name} was never powered on here: its disks "
                                            "are not known")
        t0 = time.monotonic()
        offline.stop_all_nbd(self.run_dir)
        metas = {str(d["key"]): meta_path(d["flat"]) for d in disks}
        state_cbt = self.state["cbt"]
        try:
            for d in disks:
                ensure_meta(d["flat"])
            if cbt:
                expected = {bitmap_name(s) for s in state_cbt["bitmaps"]}
                unclean = bool(self.state["killed"])
                reason = "QEMU did not stop cleanly (killed)" if unclean else None
                for meta in metas.values():
                    why, inconsistent = offline.check_bitmaps(meta, expected)
                    reason = reason or why
                    unclean = unclean or inconsistent
                if reason is not None:
                    for meta in metas.values():
                        offline.remove_bitmaps(meta, offline.our_bitmaps(meta))
                    self._reset_cbt({}, reason)
                    state_cbt = self.state["cbt"]
                if unclean:
                    self.state["unclean_stop"], self.state["killed"] = True, False
                if state_cbt["epoch"] is None:
                    state_cbt.update(epoch=_new_epoch(), bitmaps=[], recording=None)
            else:
                for meta in metas.values():
                    offline.remove_bitmaps(meta, offline.our_bitmaps(meta))
                self.state["cbt"] = state_cbt = {"epoch": None, "bitmaps": [], "recording": None}
            seq = int(self.state["next_seq"])
            old = [s for s in state_cbt["bitmaps"] if s <= seq - self.max_bitmaps]
            for meta in metas.values():
                offline.remove_bitmaps(meta, [bitmap_name(s) for s in old])
            state_cbt["bitmaps"] = [s for s in state_cbt["bitmaps"] if s not in old]
            if state_cbt["recording"] in old:
                state_cbt["recording"] = None
        except DiskError as err:
            self._save()
            raise HostFault("SnapshotFault", f"snapshot of {self.name}: {err}") from err
        self._save()
        deltas: dict[str, str] = {}
        disable = bitmap_name(state_cbt["recording"]) if cbt and state_cbt["recording"] else None
        try:
            for d in disks:
                key = str(d["key"])
                delta = delta_path(d["flat"])
                delta.unlink(missing_ok=True)
                offline.snapshot_disk(metas[key], delta, disable=disable,
                                      add=bitmap_name(seq) if cbt else None)
                deltas[key] = str(delta)
        except DiskError as err:
            for key, done in deltas.items():   # undo the disks done so far
                Path(done).unlink(missing_ok=True)
                try:
                    if cbt:
                        offline.remove_bitmaps(metas[key], [bitmap_name(seq)])
                    if disable:
                        offline.qemu_img("bitmap", "--enable", str(metas[key]), disable)
                except DiskError:
                    pass
            raise HostFault("SnapshotFault", f"snapshot of {self.name}: {err}") from err
        self.state["snapshot"] = {"id": snapshot_id, "seq": seq, "cbt": cbt,
                                  "created": time.time()}
        self.state["deltas"] = deltas
        self.state["next_seq"] = seq + 1
        self.state["consolidation_error"] = None
        if cbt:
            state_cbt["bitmaps"].append(seq)
            state_cbt["recording"] = seq
        self._save()
        return {"disks": [{"key": int(d["key"]), "frozen_flat": d["flat"],
                           "change_id": f"{state_cbt['epoch']}/{seq}" if cbt else None}
                          for d in disks],
                "timings_ms": {"freeze": 0.0, "snapshot": _ms(t0), "thaw": 0.0}}

    def _note_if_stopped(self) -> None:
        if self.machine is not None and not self.machine.running or (
                self.machine is None and self.state["qemu_started"]):
            self._noticed_stop()

    def _freeze(self, machine: Machine, timeout: float) -> None:
        try:
            machine.qga.fsfreeze_freeze(timeout=timeout)
        except QGAError as err:
            if err.command != "guest-sync-delimited":   # the freeze was sent: undo it
                self._thaw(machine)
            raise HostFault("ApplicationQuiesceFault",
                            f"{self.name}: the guest could not be quiesced: {err}") from err

    def _thaw(self, machine: Machine) -> str | None:
        """Thaw (twice if need be); the error if the guest may still be frozen. Then a
        background thread keeps trying for THAW_RETRY_S: a freeze that timed out may
        still finish in the guest, and nobody else would undo it."""
        last = None
        for _ in range(2):
            try:
                machine.qga.fsfreeze_thaw(timeout=THAW_TIMEOUT_S)
                return None
            except QGATimeout as err:
                last = str(err)
            except QGAError as err:
                return str(err)
        threading.Thread(target=self._thaw_later, args=(machine,), daemon=True,
                         name=f"thaw-{self.name}").start()
        return last

    def _thaw_later(self, machine: Machine) -> None:
        deadline = time.monotonic() + THAW_RETRY_S
        while time.monotonic() < deadline and machine.running:
            try:
                if machine.qga.fsfreeze_status() == "thawed":
                    return
                machine.qga.fsfreeze_thaw(timeout=THAW_TIMEOUT_S)
                return
            except QGAError:
                time.sleep(2)

    def snapshot_remove(self, snapshot_id: str) -> dict[str, Any]:
        """Remove the snapshot and consolidate its deltas into the bases. The snapshot
        leaves the tree first; a failed commit is a SnapshotFault with
        `consolidation_needed` set (the VM keeps running on the delta)."""
        with self._lock:
            snap = self.state["snapshot"]
            if snap is None or snap["id"] != snapshot_id:
                raise HostFault("NotFound", f"{self.name} has no snapshot {snapshot_id}")
            if self.running:
                self._unexport_all()
            self._stop_offline_servers()
            self.state["snapshot"] = None
            self._save()
            self._consolidate()
            return {}

    def consolidate(self) -> dict[str, Any]:
        """Finish a consolidation that failed before (nothing to do: no error)."""
        with self._lock:
            if self.state["snapshot"] is None:
                self._consolidate()
            return {}

    def _consolidate(self) -> None:
        errors = []
        for key, delta in sorted(self.state["deltas"].items()):
            try:
                if self.running:
                    self._commit_online(int(key))
                else:
                    commit_offline(delta)
                    disk = self._disk(int(key))
                    if disk is not None:   # our own change of the flat: not a reason to reset
                        self.state["stamps"][key] = file_stamp(disk["flat"])
            except (QMPError, DiskError, HostFault) as err:
                errors.append(f"disk {key}: {getattr(err, 'message', err)}")
                continue
            Path(delta).unlink(missing_ok=True)
            del self.state["deltas"][key]
            self._save()
        self.state["consolidation_error"] = "; ".join(errors) or None
        self._save()
        if not errors and self.running:
            try:
                self._remove_leftovers()   # removals deferred while the bases were read-only
            except HostFault:
                pass                       # tried again at the next power-on
        if errors:
            raise HostFault("SnapshotFault",
                            f"{self.name}: consolidation needed: {'; '.join(errors)}")

    def _commit_online(self, key: int) -> None:
        assert self.machine is not None
        qmp = self.machine.qmp
        n = nodes(key)
        job = self._next_id(f"commit{key}")
        qmp.execute("block-commit", job_id=job, device=n.delta, top_node=n.delta,
                    base_node=n.base)
        deadline = time.monotonic() + self.commit_timeout_s
        is_job = {"device": job}
        try:
            ev = qmp.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"), match=is_job,
                                timeout=self.commit_timeout_s)
            if ev["event"] == "BLOCK_JOB_READY":
                qmp.execute("block-job-complete", device=job)
                ev = qmp.wait_event("BLOCK_JOB_COMPLETED", match=is_job,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except QMPError:
            try:
                qmp.execute("block-job-cancel", device=job, force=True)
            except QMPError:
                pass
            raise
        error = ev.get("data", {}).get("error")
        if error:
            raise HostFault("SnapshotFault", f"block-commit failed: {error}")
        # A delta opened at power-on (-blockdev) is the monitor's: delete its nodes.
        names = {x.get("node-name") for x in qmp.execute("query-named-block-nodes", flat=True)}
        for node in (n.delta, n.delta_file):
            if node in names:
                qmp.execute("blockdev-del", node_name=node)

    # --- changed block tracking -------------------------------------------------------
    def cbt_query(self, snapshot_id: str, key: int, start_offset: int, change_id: str,
                  span_cap: int | None = None) -> dict[str, Any]:
        """QueryChangedDiskAreas: `{start_offset, length, areas: [[offset, length], …]}`
        for [start_offset, start_offset + min(span_cap, capacity - start_offset))."""
        with self._lock:
            snap = self.state["snapshot"]
            if snap is None or snap["id"] != snapshot_id:
                raise HostFault("FileFault", f"{self.name} has no snapshot {snapshot_id}")
            disk = self._disk(key)
            if disk is None:
                raise HostFault("FileFault", f"{self.name} has no disk {key}")
            capacity = os.stat(disk["flat"]).st_size
            try:
                lo, hi = cbtlib.window(int(start_offset), capacity, span_cap)
                cid = cbtlib.parse_change_id(change_id)
            except ValueError as err:
                raise HostFault("FileFault", str(err)) from err
            if cid is None:
                extents = cbtlib.allocated_extents(disk["flat"], lo, hi)
                return cbtlib.page(extents, lo, capacity, span_cap)
            state_cbt = self.state["cbt"]
            m = int(snap["seq"])
            if not snap["cbt"] or state_cbt["epoch"] is None:
                raise HostFault("FileFault", f"changed block tracking is off for {self.name}")
            if cid.epoch != state_cbt["epoch"]:
                raise HostFault("FileFault", f"changeId {change_id} is from another CBT epoch "
                                             "(tracking was reset): a full backup is needed")
            if cid.seq > m:
                raise HostFault("FileFault", f"changeId {change_id} is newer than the snapshot")
            if cid.seq == m:
                return cbtlib.page([], lo, capacity, span_cap)
            need = list(range(cid.seq, m))
            if any(s not in state_cbt["bitmaps"] for s in need):
                raise HostFault("FileFault", f"changeId {change_id} is too old (the lab keeps "
                                             f"the last {self.max_bitmaps} per disk)")
            names = [bitmap_name(s) for s in need]
            if self.running:
                extents = self._read_bitmaps(int(key), names, lo, hi)
            else:
                extents = self._read_bitmaps_offline(disk, names, lo, hi)
            return cbtlib.page(extents, lo, capacity, span_cap)

    def _ensure_nbd_server(self) -> str:
        assert self.machine is not None
        path = str(self.machine.nbd_path)
        if self._nbd_server_up:
            return path
        try:
            self.machine.qmp.execute("nbd-server-start",
                                     addr={"type": "unix", "data": {"path": path}})
        except QMPError as err:
            if "already" not in err.desc:
                raise HostFault("FileFault", f"nbd-server-start: {err}") from err
        self._nbd_server_up = True
        return path

    def _read_bitmaps(self, key: int, names: list[str], lo: int, hi: int,
                      ) -> list[cbtlib.Extent]:
        """Dirty areas of the union of `names` (disabled bitmaps of the base) in [lo, hi).
        The export stays for the next page (a client pages through the disk) until other
        bitmaps are asked for or the snapshot, the bitmaps or QEMU go away: an exported
        bitmap is busy (it can be neither removed nor exported twice)."""
        assert self.machine is not None
        qmp = self.machine.qmp
        sock = self._ensure_nbd_server()
        cached = self._cbt_exports.get(key)
        if cached is not None and cached[0] != tuple(names):
            self._drop_cbt_exports([key])
            cached = None
        if cached is None:
            export = self._next_id(f"cbt{key}")
            try:
                qmp.execute("block-export-add", type="nbd", id=export,
                            node_name=nodes(key).base, name=export, writable=False,
                            bitmaps=names)
            except QMPError as err:
                raise HostFault("FileFault", f"cannot export bitmaps {names}: {err}") from err
            self._cbt_exports[key] = (tuple(names), export)
        else:
            export = cached[1]
        try:
            return dirty_extents(sock, export, names, lo, hi)
        except NBDBitmapError as err:
            self._drop_cbt_exports([key])
            raise HostFault("FileFault", str(err)) from err

    def _read_bitmaps_offline(self, disk: dict[str, Any], names: list[str], lo: int,
                              hi: int) -> list[cbtlib.Extent]:
        """The same with the VM powered off: a qemu-nbd on the metadata qcow2, kept for
        the next page while the same bitmaps are asked for."""
        key = int(disk["key"])
        purpose = f"cbt{key}"
        sock, _ = offline.nbd_paths(self.run_dir, purpose)
        try:
            if self._offline_cbt.get(key) != tuple(names) or \
                    purpose not in offline.running_nbd(self.run_dir):
                self._offline_cbt.pop(key, None)
                offline.start_nbd(self.run_dir, purpose, meta_path(disk["flat"]), purpose,
                                  bitmaps=names, persistent=True)
                self._offline_cbt[key] = tuple(names)
            return dirty_extents(str(sock), purpose, names, lo, hi)
        except (DiskError, NBDBitmapError) as err:
            offline.stop_nbd(self.run_dir, purpose)
            self._offline_cbt.pop(key, None)
            raise HostFault("FileFault", str(err)) from err

    def _stop_offline_servers(self) -> None:
        offline.stop_all_nbd(self.run_dir)
        self._offline_cbt.clear()

    def _drop_cbt_exports(self, keys: list[int] | None = None) -> None:
        for key in list(self._cbt_exports) if keys is None else keys:
            entry = self._cbt_exports.pop(key, None)
            if entry is not None and self.running:
                self._export_del(entry[1])

    def _export_del(self, export_id: str) -> None:
        assert self.machine is not None
        qmp = self.machine.qmp
        try:
            qmp.execute("block-export-del", id=export_id)
            qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": export_id}, timeout=10)
        except QMPError:
            try:
                qmp.execute("block-export-del", id=export_id, mode="hard")
            except QMPError:
                pass

    # --- NBD export of a snapshot for readers -------------------------------------------
    def export_snapshot(self, snapshot_id: str, key: int) -> tuple[str, str]:
        """A read-only NBD export of the snapshot's frozen base: (unix socket, export
        name). Stays until `unexport` or the snapshot's removal."""
        with self._lock:
            snap = self.state["snapshot"]
            if snap is None or snap["id"] != snapshot_id:
                raise HostFault("NotFound", f"{self.name} has no snapshot {snapshot_id}")
            if self._disk(key) is None:
                raise HostFault("NotFound", f"{self.name} has no disk {key}")
            export = f"snap-{key}"
            if not self.running:
                self._note_if_stopped()
                disk = self._disk(key)
                assert disk is not None
                purpose = f"snap{key}"
                sock_path, _ = offline.nbd_paths(self.run_dir, purpose)
                if purpose not in offline.running_nbd(self.run_dir):
                    try:
                        offline.start_nbd(self.run_dir, purpose, meta_path(disk["flat"]),
                                          export, persistent=True)
                    except DiskError as err:
                        raise HostFault("FileFault", f"export of disk {key}: {err}") from err
                return str(sock_path), export
            machine = self._running_machine("export a snapshot")
            sock = self._ensure_nbd_server()
            existing = {e["id"] for e in machine.qmp.execute("query-block-exports")}
            if export not in existing:
                try:
                    machine.qmp.execute("block-export-add", type="nbd", id=export,
                                        node_name=nodes(key).base, name=export, writable=False)
                except QMPError as err:
                    raise HostFault("FileFault", f"export of disk {key}: {err}") from err
            return sock, export

    def unexport(self, snapshot_id: str, key: int) -> None:
        with self._lock:
            offline.stop_nbd(self.run_dir, f"snap{key}")
            if self.running:
                export = f"snap-{key}"
                assert self.machine is not None
                if export in {e["id"] for e in self.machine.qmp.execute("query-block-exports")}:
                    self._export_del(export)

    def _unexport_all(self) -> None:
        assert self.machine is not None
        self._cbt_exports.clear()
        for e in self.machine.qmp.execute("query-block-exports"):
            self._export_del(e["id"])
