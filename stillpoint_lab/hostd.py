"""The lab's host agent (`stillpoint-lab-hostd`, "hostd", ESXi's hostd): one `HostVM` per VM.

The simulator (tests/lab/vcsim, "vCenter") delegates the power, snapshots and CBT of
QEMU-backed VMs to this process (docs/lab-hypervisor.md). It speaks HTTP/1.1 + JSON on the
unix socket `<state_dir>/hostd/hostd.sock` (0600, in a 0700 directory): every request is a
`POST` with a JSON object; the reply is `200 {...}` or a fault
`4xx/5xx {"fault": "<vim fault class>", "message": "..."}`, never a traceback (those go
to the log, `<state_dir>/hostd/hostd.log`).

    /vm/power-on        vm, uuid, memory_mib, cpus, mac, disks: [{key, flat, capacity_bytes}],
                        guestinfo: {key: value}, sandbox     -> {pid, ip, index, tap}
    /vm/power-off       vm                                   -> {}
    /vm/reset           vm                                   -> {}
    /vm/snapshot/create vm, snapshot, quiesce, cbt
                        -> {disks: [{key, frozen_flat, change_id}], timings_ms}
    /vm/snapshot/remove vm, snapshot                         -> {} (a fault: consolidation needed)
    /vm/consolidate     vm                                   -> {}
    /vm/cbt/query       vm, snapshot, key, start_offset, change_id, span_cap
                        -> {start_offset, length, areas: [[offset, length], ...]}
    /vm/cbt/reset       vm                                   -> {}
    /vm/status          vm  -> {running, pid, tools_running, ip, hostname, consolidation_needed,
                                snapshot, cbt_epoch, index, tap, sandbox, ...}
    /vm/forget          vm  (Destroy_Task: power off if need be, drop its hostd state) -> {}
    /host/ping                                               -> {pid, vms, reports}
    /debug/qemu-io      vm, key, command (X-Lab-Token only): an HMP `qemu-io` on the disk's
                        device, as the guest would write -> {output}

Operations on one VM are serialised (a lock per VM); different VMs run in parallel.

Power-on: hostd gives the VM its lab address (the lab's own VMs their fixed index from the
lab config, others the next free index from FIRST_INDEX up), a tap on the lab bridge (or on
the sandbox bridge for a VM whose extraConfig sets `stillpoint.sandbox`: only the host's
address is reachable from there), and the fw_cfg values `opt/stillpoint/lab-identity`
`{ip_cidr, gateway, authorized_keys}` and `opt/stillpoint/guestinfo` (HostVM writes them
as 0600 files; networking: hostd_net.py). While a VM runs, a thread asks its guest agent every POLL_S seconds who it
is and, on a change, POSTs `/lab/guest {vm, ip, hostname, tools_running}` to the simulator
(lab token): that is where vSphere's guest.ipAddress / hostName / toolsRunningStatus come
from. A QEMU that exits by itself (guest shutdown) is reported with `powered_off: true`.

SIGTERM: power off every running VM (QMP quit: a clean stop, bitmaps kept), remove the
taps, exit (`lab down`). SIGUSR1: exit and leave the VMs running; a new hostd re-attaches
to them (HostVM keeps its state in the VM's run directory).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

from appliance.errors import LabError
from stillpoint_lab import hostd_net
from stillpoint_lab.config import REPO_ROOT, LabConfig

PROCESS_NAME = "stillpoint-lab-hostd"
FIRST_INDEX = 20
LAST_INDEX = 244           # guest_ip(244) = <subnet>.254
POLL_S = 2.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0      # SIGTERM powers the VMs off first
MAX_BODY = 1 << 20
REPORT_TIMEOUT_S = 10.0
DEFAULT_FACTORY = "stillpoint_lab.qemu.host_vm:HostVM"
# A VM's host-side name (its run directory, QEMU's -name and process title): the VM's own
# name where that is safe there, else a slug of it and a hash. VM names are vSphere's: up to
# 80 printable characters, spaces and any script included.
_HOST_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
VM_NAME_MAX = 80
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_QEMU_IO = re.compile(r"^[A-Za-z0-9 ._:+-]{1,200}$")
log = logging.getLogger("stillpoint_lab.hostd")


def hostd_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "hostd"


def socket_path(cfg: LabConfig) -> Path:
    return hostd_dir(cfg) / "hostd.sock"


def vm_dir(cfg: LabConfig, vm: str) -> Path:
    """HostVM's run directory for `vm` (QMP/QGA sockets, state.json, fw_cfg files)."""
    return hostd_dir(cfg) / "vms" / host_name(vm)


def qemu_lab_name(cfg: LabConfig) -> str:
    """The `lab` of HostVM/Machine: QEMU processes are titled stillpoint-qemu-<this>-<vm>."""
    return f"lab{cfg.lab_id}"


@dataclass(frozen=True)
class HostdSettings:
    """hostd's configuration: `<state_dir>/hostd/config.json` (0600), made by start_hostd."""

    lab_id: int
    lab_root: str
    vcsim_url: str = ""             # https://127.0.0.1:<port>; "" = report guests to nobody
    ca_cert: str = ""               # the simulator's certificate (PEM)
    lab_token_file: str = ""        # 0600; X-Lab-Token for /lab/guest and /debug/*
    lab_vms: dict[str, int] = field(default_factory=dict)   # the lab's VMs: name -> index
    authorized_keys_file: str = ""  # the lab's SSH public key(s), for lab-identity
    network: bool = True            # taps on the lab / sandbox bridge (False: VMs without NIC)
    host_vm_factory: str = DEFAULT_FACTORY
    poll_s: float = POLL_S
    profile_path: str = ""          # the lab profile: booted VMs' guest access is added to it

    @property
    def lab(self) -> LabConfig:
        return LabConfig(lab_id=self.lab_id, lab_root=self.lab_root, vms=())

    @classmethod
    def load(cls, path: Path) -> "HostdSettings":
        doc = json.loads(path.read_text())
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


class Fault(Exception):
    """A reply fault raised by hostd itself (HostVM raises HostFault, same shape)."""

    def __init__(self, fault_class: str, message: str) -> None:
        self.fault_class = fault_class
        self.message = message
        super().__init__(f"{fault_class}: {message}")


_STATUS = {"NotFound": 404, "InvalidArgument": 400, "NotAuthenticated": 401}


def _fault_status(fault_class: str) -> int:
    return _STATUS.get(fault_class, 409)


def _load_factory(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


# --- request checking ---------------------------------------------------------------------


def _str(body: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Fault("InvalidArgument", f"{key} must be a non-empty string")
    return value


def _int(body: dict[str, Any], key: str, *, default: int | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Fault("InvalidArgument", f"{key} must be an integer")
    return value


def _vm(body: dict[str, Any]) -> str:
    name = _str(body, "vm")
    # vCenter keeps a "/" in a name as %2f: one here is a path, not a VM.
    if not (0 < len(name) <= VM_NAME_MAX and name.isprintable() and name.strip() == name
            and "/" not in name):
        raise Fault("InvalidArgument", f"bad VM name {name!r}")
    return name


def host_name(vm: str) -> str:
    if _HOST_SAFE.match(vm):
        return vm
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", vm).strip("_.-")[:40] or "vm"
    return f"{slug}-{hashlib.sha256(vm.encode()).hexdigest()[:10]}"


# --- per VM -------------------------------------------------------------------------------


class VMSlot:
    """hostd's record of one VM: its HostVM, lock, lab address and guest poller."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.host_vm: Any = None
        self.index: int | None = None
        self.tap: str | None = None
        self.sandbox = False
        self.poller: threading.Thread | None = None
        self.poll_stop = threading.Event()
        self.identity: dict[str, Any] = {}   # what the poller last heard from the guest agent
        self.host_key = ""          # "<ip> ssh-ed25519 AAAA...", read through the guest agent
        self.reported: dict[str, Any] | None = None   # what the simulator last took

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "tap": self.tap,
                "sandbox": self.sandbox}


class Hostd:
    """The daemon's logic, without the socket (`serve` adds that)."""

    def __init__(self, settings: HostdSettings,
                 factory: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self.cfg = settings.lab
        self.factory = factory or _load_factory(settings.host_vm_factory)
        self.slots: dict[str, VMSlot] = {}
        self.slots_lock = threading.Lock()
        self.index_lock = threading.Lock()
        self.profile_lock = threading.Lock()
        self.token = ""
        if settings.lab_token_file:
            self.token = Path(settings.lab_token_file).read_text().strip()
        self._ssl: ssl.SSLContext | None = None
        self.reports = 0   # guest reports the simulator accepted (tests look at it)

    # --- slots ----------------------------------------------------------------------
    def slot(self, name: str) -> VMSlot:
        with self.slots_lock:
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = VMSlot(name)
            return slot

    def _host_vm(self, slot: VMSlot) -> Any:
        """The slot's HostVM, made on first use. Caller holds slot.lock."""
        if slot.host_vm is None:
            slot.host_vm = self.factory(host_name(slot.name), vm_dir(self.cfg, slot.name),
                                        lab=qemu_lab_name(self.cfg))
        return slot.host_vm

    def _slot_file(self, name: str) -> Path:
        return vm_dir(self.cfg, name) / "hostd.json"

    def _save_slot(self, slot: VMSlot) -> None:
        hostd_net.write_private_json(self._slot_file(slot.name), slot.record())

    def reattach(self) -> None:
        """After a restart: take over the VMs that still run (HostVM re-attaches to QEMU)."""
        root = hostd_dir(self.cfg) / "vms"
        for d in sorted(root.glob("*/state.json")) if root.is_dir() else []:
            try:    # the VM's own name: its directory's may be a slug of it
                name = str(json.loads((d.parent / "hostd.json").read_text())["name"])
            except (OSError, ValueError, KeyError):
                name = d.parent.name
            if vm_dir(self.cfg, name) != d.parent:
                continue
            slot = self.slot(name)
            with slot.lock:
                try:
                    hv = self._host_vm(slot)
                    running = bool(hv.status().get("running"))
                except Exception:  # noqa: BLE001 - one broken VM must not stop hostd
                    log.exception("%s: cannot re-attach", name)
                    continue
                if not running:
                    continue
                try:
                    rec = json.loads(self._slot_file(name).read_text())
                    slot.index, slot.tap = rec.get("index"), rec.get("tap")
                    slot.sandbox = bool(rec.get("sandbox"))
                except (OSError, ValueError):
                    pass
                log.info("%s: re-attached to its running QEMU (index %s)", name, slot.index)
                self._start_poller(slot)

    # --- dispatch -------------------------------------------------------------------
    def dispatch(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "/vm/power-on": self.power_on,
            "/vm/power-off": self.power_off,
            "/vm/reset": self.reset,
            "/vm/snapshot/create": self.snapshot_create,
            "/vm/snapshot/remove": self.snapshot_remove,
            "/vm/consolidate": self.consolidate,
            "/vm/cbt/query": self.cbt_query,
            "/vm/cbt/reset": self.cbt_reset,
            "/vm/status": self.status,
            "/vm/forget": self.forget,
            "/host/ping": self.ping,
        }
        if path == "/debug/qemu-io":
            self._require_token(headers)
            return self.debug_qemu_io(body)
        fn = routes.get(path)
        if fn is None:
            raise Fault("NotFound", f"no such call {path}")
        return fn(body)

    def _require_token(self, headers: dict[str, str]) -> None:
        given = headers.get("x-lab-token", "")
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Fault("NotAuthenticated", "the lab token is required")

    def _locked(self, body: dict[str, Any],
                fn: Callable[[VMSlot, Any], dict[str, Any]]) -> dict[str, Any]:
        slot = self.slot(_vm(body))
        with slot.lock:
            return fn(slot, self._host_vm(slot))

    # --- power ----------------------------------------------------------------------
    def _used_indexes(self) -> set[int]:
        used = set(self.settings.lab_vms.values())
        with self.slots_lock:
            used |= {s.index for s in self.slots.values() if s.index is not None}
        # Guests of the namespace lab and of the older hypervisor (one lab, one subnet).
        for pattern in ("guests/*/guest.json", "hypervisor/*.json"):
            for meta in self.cfg.state_dir.glob(pattern):
                try:
                    used.add(int(json.loads(meta.read_text())["index"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return used

    def _allocate_index(self, name: str) -> int:
        """The VM's lab index. Caller holds index_lock."""
        if name in self.settings.lab_vms:
            return int(self.settings.lab_vms[name])
        used = self._used_indexes()
        for index in range(FIRST_INDEX, LAST_INDEX + 1):
            if index not in used:
                return index
        raise Fault("InvalidState", "no free lab address")

    def _authorized_keys(self) -> str:
        path = self.settings.authorized_keys_file
        if not path:
            from stillpoint_lab.guest_vm import lab_client_key

            path = str(lab_client_key(self.cfg)) + ".pub"
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    def _power_on_spec(self, slot: VMSlot, body: dict[str, Any], tap: str | None) -> Any:
        from stillpoint_lab.qemu.host_vm import PowerOnSpec, VMDisk

        disks = []
        for d in body.get("disks") or []:
            if not isinstance(d, dict):
                raise Fault("InvalidArgument", "disks must be objects")
            flat = _str(d, "flat")
            if not os.path.isabs(flat):
                raise Fault("InvalidArgument", f"disk flat path must be absolute: {flat}")
            disks.append(VMDisk(_int(d, "key"), Path(flat),
                                _int(d, "capacity_bytes", default=0) or None))
        if not disks:
            raise Fault("InvalidState", f"{slot.name} has no disks")
        mac = _str(body, "mac", required=False)
        if mac and not _MAC.match(mac):
            raise Fault("InvalidArgument", f"bad MAC {mac!r}")
        guestinfo = body.get("guestinfo") or {}
        if not isinstance(guestinfo, dict) or not all(
                isinstance(k, str) and k.startswith("guestinfo.") and isinstance(v, str)
                for k, v in guestinfo.items()):
            raise Fault("InvalidArgument", "guestinfo must map guestinfo.* keys to strings")
        assert slot.index is not None
        identity = {"ip_cidr": f"{self.cfg.guest_ip(slot.index)}/24",
                    "gateway": self.cfg.host_ip, "authorized_keys": self._authorized_keys()}
        return PowerOnSpec(
            memory_mib=_int(body, "memory_mib", default=0) or 1024,
            cpus=_int(body, "cpus", default=0) or 1,
            disks=tuple(disks), mac=(mac or None) if tap else None, tap=tap,
            uuid=_str(body, "uuid", required=False) or None,
            guestinfo=dict(guestinfo), identity=identity)

    def power_on(self, body: dict[str, Any]) -> dict[str, Any]:
        slot = self.slot(_vm(body))
        sandbox = bool(body.get("sandbox"))
        with slot.lock:
            hv = self._host_vm(slot)
            if hv.status().get("running"):
                raise Fault("InvalidState", f"{slot.name} is already powered on")
            with self.index_lock:
                slot.index = self._allocate_index(slot.name)
            slot.sandbox = sandbox
            tap = None
            try:
                if self.settings.network and body.get("mac"):   # no MAC: a VM without NIC
                    tap = hostd_net.add_tap(self.cfg, slot.index, sandbox=sandbox)
                slot.tap = tap
                spec = self._power_on_spec(slot, body, tap)
                t0 = time.monotonic()
                reply = hv.power_on(spec)
                started_ms = round((time.monotonic() - t0) * 1000, 1)
            except BaseException:
                self._release_net(slot)
                raise
            self._save_slot(slot)
            self._start_poller(slot)
            pid = reply.get("pid") if isinstance(reply, dict) else reply
            ip = self.cfg.guest_ip(slot.index)
            log.info("%s: powered on: QEMU pid %s, %s%s, tap %s, in %s ms", slot.name, pid, ip,
                     " (sandbox)" if sandbox else "", tap, started_ms)
            return {"pid": pid, "ip": ip, "index": slot.index, "tap": tap, "sandbox": sandbox,
                    "started_ms": started_ms}

    def _release_net(self, slot: VMSlot) -> None:
        """Caller holds slot.lock."""
        if slot.index is not None and slot.tap is not None:
            try:
                hostd_net.remove_tap(self.cfg, slot.index)
            except LabError as err:
                log.warning("%s: removing tap %s: %s", slot.name, slot.tap, err)
        with self.index_lock:
            slot.index, slot.tap = None, None
        if slot.host_key:
            slot.host_key = ""
            self._unpublish_access(slot.name)
        self._slot_file(slot.name).unlink(missing_ok=True)

    def power_off(self, body: dict[str, Any]) -> dict[str, Any]:
        slot = self.slot(_vm(body))
        self._stop_poller(slot)
        with slot.lock:
            hv = self._host_vm(slot)
            try:
                return dict(hv.power_off() or {})
            finally:
                if hv.status().get("running"):   # it failed: keep watching the guest
                    self._start_poller(slot)
                else:
                    self._release_net(slot)
                    slot.identity = {}

    def reset(self, body: dict[str, Any]) -> dict[str, Any]:
        def run(slot: VMSlot, hv: Any) -> dict[str, Any]:
            reply = dict(hv.reset() or {})
            slot.reported = None   # the simulator clears the guest: report it again
            return reply
        return self._locked(body, run)

    # --- snapshots and CBT ----------------------------------------------------------
    def snapshot_create(self, body: dict[str, Any]) -> dict[str, Any]:
        snap = _str(body, "snapshot")
        quiesce, cbt = bool(body.get("quiesce")), bool(body.get("cbt"))

        def run(slot: VMSlot, hv: Any) -> dict[str, Any]:
            reply = dict(hv.snapshot_create(snap, quiesce=quiesce, cbt=cbt))
            log.info("%s: snapshot %s (quiesce %s, cbt %s): %s ms", slot.name, snap, quiesce,
                     cbt, reply.get("timings_ms"))
            return reply
        return self._locked(body, run)

    def snapshot_remove(self, body: dict[str, Any]) -> dict[str, Any]:
        snap = _str(body, "snapshot")

        def run(slot: VMSlot, hv: Any) -> dict[str, Any]:
            t0 = time.monotonic()
            reply = dict(hv.snapshot_remove(snap) or {})
            log.info("%s: snapshot %s removed in %.0f ms", slot.name, snap,
                     (time.monotonic() - t0) * 1000)
            return reply
        return self._locked(body, run)

    def consolidate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._locked(body, lambda slot, hv: dict(hv.consolidate() or {}))

    def cbt_query(self, body: dict[str, Any]) -> dict[str, Any]:
        snap, change_id = _str(body, "snapshot"), _str(body, "change_id")
        key, start = _int(body, "key"), _int(body, "start_offset")
        span = body.get("span_cap")
        if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span <= 0):
            raise Fault("InvalidArgument", "span_cap must be a positive integer")
        return self._locked(body, lambda slot, hv: dict(
            hv.cbt_query(snap, key, start, change_id, span)))

    def cbt_reset(self, body: dict[str, Any]) -> dict[str, Any]:
        def run(slot: VMSlot, hv: Any) -> dict[str, Any]:
            reply = dict(hv.cbt_reset() or {})
            log.info("%s: CBT reset", slot.name)
            return reply
        return self._locked(body, run)

    def status(self, body: dict[str, Any]) -> dict[str, Any]:
        slot = self.slot(_vm(body))
        hv = slot.host_vm
        if hv is None:
            with slot.lock:
                hv = self._host_vm(slot)
        out = dict(hv.status())   # not under the VM's lock: a long commit must not block it
        ident = slot.identity if out.get("running") else {}
        out.update(tools_running=bool(ident.get("tools_running")), ip=ident.get("ip") or "",
                   hostname=ident.get("hostname") or "", index=slot.index, tap=slot.tap,
                   sandbox=slot.sandbox, host_key=slot.host_key if out.get("running") else "")
        return out

    def forget(self, body: dict[str, Any]) -> dict[str, Any]:
        """The VM was destroyed: stop it if it runs, drop its state directory."""
        slot = self.slot(_vm(body))
        self._stop_poller(slot)
        with slot.lock:
            hv = self._host_vm(slot)
            if hv.status().get("running"):
                hv.power_off()
            self._release_net(slot)
            shutil.rmtree(vm_dir(self.cfg, slot.name), ignore_errors=True)
            with self.slots_lock:
                self.slots.pop(slot.name, None)
        log.info("%s: forgotten", slot.name)
        return {}

    def ping(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.slots_lock:
            names = sorted(self.slots)
        return {"pid": os.getpid(), "vms": names, "reports": self.reports}

    def debug_qemu_io(self, body: dict[str, Any]) -> dict[str, Any]:
        """Lab only: an HMP `qemu-io` on disk `key`'s device (writes go where the guest's
        go: the delta while a snapshot exists), on the VM's spare QMP monitor."""
        key, command = _int(body, "key"), _str(body, "command")
        if not _QEMU_IO.match(command):
            raise Fault("InvalidArgument", f"bad qemu-io command {command!r}")

        def run(slot: VMSlot, hv: Any) -> dict[str, Any]:
            if hasattr(hv, "debug_qemu_io"):
                return {"output": hv.debug_qemu_io(key, command)}
            from stillpoint_lab.qemu.machine import nodes

            machine = getattr(hv, "machine", None)
            if machine is None or not machine.running:
                raise Fault("InvalidState", f"{slot.name} is powered off")
            qmp = machine.debug_qmp()
            try:
                out = qmp.execute("human-monitor-command", command_line=(
                    f'qemu-io -d {nodes(key).backend} "{command}"'))
            finally:
                qmp.close()
            return {"output": str(out)}
        return self._locked(body, run)

    # --- guest identity ------------------------------------------------------------
    def _start_poller(self, slot: VMSlot) -> None:
        slot.poll_stop = threading.Event()
        t = threading.Thread(target=self._poll, args=(slot, slot.poll_stop),
                             name=f"guest-{slot.name}", daemon=True)
        slot.poller = t
        t.start()

    def _stop_poller(self, slot: VMSlot) -> None:
        slot.poll_stop.set()
        t = slot.poller
        if t is not None and t is not threading.current_thread():
            t.join(timeout=REPORT_TIMEOUT_S + 5)
        slot.poller = None

    def _poll(self, slot: VMSlot, stop: threading.Event) -> None:
        """Watch one running VM: its guest identity (reported on change), and QEMU exiting
        by itself. Not under the VM's lock (the guest agent client serialises its own
        commands); power-off stops this thread before it acts."""
        slot.reported = None
        while not stop.is_set():
            hv = slot.host_vm
            try:
                running = bool(hv.status().get("running"))
            except Exception:  # noqa: BLE001 - log, keep polling
                log.exception("%s: status failed", slot.name)
                running = True
            if not running and self._exited(slot, stop):
                log.info("%s: QEMU exited by itself: reporting the VM powered off", slot.name)
                self._report(slot.name, {"ip": "", "hostname": "", "tools_running": False,
                                         "powered_off": True})
                return
            if running:
                ident = _identity(hv)
                ip, hostname = str(ident.get("ip") or ""), str(ident.get("hostname") or "")
                report: dict[str, Any] = {"ip": ip, "hostname": hostname,
                                          "tools_running": bool(ident.get("tools_running"))}
                if stop.is_set():
                    return
                slot.identity = report
                if report["tools_running"] and report["ip"] and not slot.host_key:
                    self._learn_host_key(slot, hv, ip)
                if report != slot.reported and self._report(slot.name, report):
                    slot.reported = report
            stop.wait(self.settings.poll_s)

    def _learn_host_key(self, slot: VMSlot, hv: Any, ip: str) -> None:
        """The guest's SSH host key, through the guest agent (the hypervisor's channel: no
        trust on first use over the network); then the VM's access goes into the profile."""
        from stillpoint_lab.image.layout import SSH_HOST_KEY_PUB

        machine = getattr(hv, "machine", None)
        if machine is None:
            return
        try:
            public = machine.qga.file_read(SSH_HOST_KEY_PUB).decode().split()
        except Exception as err:  # noqa: BLE001 - not made yet (first boot): ask again later
            log.info("%s: host key not readable yet: %s", slot.name, err)
            return
        if len(public) < 2:
            return
        slot.host_key = f"{ip} {public[0]} {public[1]}"
        log.info("%s: SSH host key %s %s...", slot.name, public[0], public[1][:16])
        if slot.name not in self.settings.lab_vms:
            self._publish_access(slot.name, ip, slot.host_key)

    def _publish_access(self, name: str, ip: str, host_key: str) -> None:
        """Add the guest's access to the lab profile, as an operator would after a restore."""
        from appliance.profile import write_private
        from stillpoint_lab.guest_vm import LAB_SSH_USER, lab_client_key

        if not self.settings.profile_path:
            return
        path = Path(self.settings.profile_path)
        with self.profile_lock:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                log.warning("%s: cannot read the profile %s: %s", name, path, err)
                return
            template: dict[str, Any] = next(iter(doc.get("guests", {}).values()), {})
            doc.setdefault("guests", {})[name] = {
                "transport": "ssh", "host": ip, "port": 22, "user": LAB_SSH_USER,
                "key_file": str(lab_client_key(self.cfg)), "host_key": host_key, "sudo": True,
                "agent": template.get("agent", {})}
            write_private(path, json.dumps(doc, indent=2))

    def _unpublish_access(self, name: str) -> None:
        from appliance.profile import write_private

        if not self.settings.profile_path or name in self.settings.lab_vms:
            return
        path = Path(self.settings.profile_path)
        with self.profile_lock:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                return
            if doc.get("guests", {}).pop(name, None) is not None:
                write_private(path, json.dumps(doc, indent=2))

    def _exited(self, slot: VMSlot, stop: threading.Event) -> bool:
        """QEMU is gone and no power operation is under way: free its address."""
        if not slot.lock.acquire(timeout=1.0):
            return False
        try:
            if stop.is_set() or slot.host_vm.status().get("running"):
                return False
            self._release_net(slot)
            slot.identity = {}
            return True
        except Exception:  # noqa: BLE001 - log, keep polling
            log.exception("%s: status failed", slot.name)
            return False
        finally:
            slot.lock.release()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self.settings.ca_cert or None)
        return self._ssl

    def _report(self, vm: str, report: dict[str, Any]) -> bool:
        """POST /lab/guest to the simulator; True if it took it."""
        if not self.settings.vcsim_url:
            return False
        req = urllib.request.Request(
            self.settings.vcsim_url.rstrip("/") + "/lab/guest",
            data=json.dumps({"vm": vm, **report}).encode(), method="POST",
            headers={"Content-Type": "application/json", "X-Lab-Token": self.token})
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(),
                                        timeout=REPORT_TIMEOUT_S) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ssl.SSLError) as err:
            log.warning("%s: reporting the guest to the simulator failed: %s", vm, err)
            return False
        self.reports += 1
        log.info("%s: guest reported: %s", vm, report)
        return True

    # --- shutdown -------------------------------------------------------------------
    def shutdown(self, *, power_off: bool) -> None:
        with self.slots_lock:
            slots = list(self.slots.values())
        for slot in slots:
            self._stop_poller(slot)
        if not power_off:
            return
        for slot in slots:
            with slot.lock:
                hv = slot.host_vm
                try:
                    if hv is not None and hv.status().get("running"):
                        log.info("%s: powering off (hostd stops)", slot.name)
                        hv.power_off()
                except Exception:  # noqa: BLE001 - the others still get powered off
                    log.exception("%s: power-off at shutdown failed", slot.name)
                self._release_net(slot)


def _identity(hv: Any) -> dict[str, Any]:
    try:
        return dict(hv.guest_identity())
    except Exception as err:  # noqa: BLE001 - an agent that does not answer: tools not running
        log.debug("guest identity: %s", err)
        return {"tools_running": False, "ip": None, "hostname": None}


# --- HTTP over the unix socket --------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    hostd: Hostd


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "stillpoint-lab-hostd"

    def address_string(self) -> str:
        return "unix"   # AF_UNIX peers have no address (BaseHTTPRequestHandler indexes it)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("%s", format % args)

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        self._reply(405, {"fault": "InvalidArgument", "message": "POST only"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib's name
        t0 = time.monotonic()
        path = self.path.split("?", 1)[0]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._reply(400, {"fault": "InvalidArgument", "message": "bad Content-Length"})
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = self.server.hostd.dispatch(path, body, headers)
            status = 200
        except ValueError as err:
            status, reply = 400, {"fault": "InvalidArgument", "message": f"bad JSON body: {err}"}
        except Exception as err:  # noqa: BLE001 - every failure is a JSON fault
            fault_class = getattr(err, "fault_class", None)
            if isinstance(fault_class, str):
                message = str(getattr(err, "message", err))
                status, reply = _fault_status(fault_class), {"fault": fault_class,
                                                             "message": message}
                log.info("%s %s: %s: %s", path, body.get("vm", ""), fault_class, message)
            else:
                log.exception("%s: internal error", path)
                status, reply = 500, {"fault": "SystemError", "message":
                                      f"hostd internal error: {type(err).__name__}: {err}"}
        self._reply(status, reply)
        log.debug("%s -> %d in %.1f ms", path, status, (time.monotonic() - t0) * 1000)


def serve(hostd: Hostd, path: Path) -> _Server:
    """Bind the socket (0600) and return the server (call serve_forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server = _Server(str(path), _Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.hostd = hostd
    return server


# --- process ---------------------------------------------------------------------------------


def _is_ours(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0.decode(errors="replace")) == PROCESS_NAME


def call(cfg: LabConfig, path: str, body: dict[str, Any] | None = None, *,
         token: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """POST to a running hostd (tests, the lab): its reply, or LabError naming the fault."""
    data = json.dumps(body or {}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: hostd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n")
    if token is not None:
        head += f"X-Lab-Token: {token}\r\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path(cfg)))
        sock.sendall(head.encode() + b"\r\n" + data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as err:
        raise LabError(f"hostd {path}: {err}") from err
    finally:
        sock.close()
    raw = b"".join(chunks)
    head_raw, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(head_raw.split(b" ", 2)[1])
        doc = json.loads(payload or b"{}")
    except (IndexError, ValueError) as err:
        raise LabError(f"hostd {path}: malformed reply {raw[:200]!r}") from err
    if status != 200:
        raise HostdError(status, str(doc.get("fault")), str(doc.get("message")))
    return dict(doc)


class HostdError(LabError):
    """hostd answered with a fault."""

    def __init__(self, status: int, fault: str, message: str) -> None:
        self.status = status
        self.fault = fault
        self.message = message
        super().__init__(f"hostd: {fault} ({status}): {message}")


def start_hostd(cfg: LabConfig, *, vcsim_url: str = "", ca_cert: Path | None = None,
                lab_token_file: Path | None = None, lab_vms: dict[str, int] | None = None,
                authorized_keys_file: Path | None = None, network: bool = True,
                host_vm_factory: str = DEFAULT_FACTORY, poll_s: float = POLL_S,
                profile_path: Path | None = None,
                timeout_s: float = READY_TIMEOUT_S) -> int:
    """Start hostd for lab `cfg` (after the simulator: it reports guests to `vcsim_url`,
    e.g. VcsimHandle.base_url(), trusting `ca_cert`, with the token in `lab_token_file`);
    returns its pid once it answers. `lab_vms` defaults to the lab config's VMs."""
    d = hostd_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    stop_hostd(cfg)  # a leftover of a crashed run
    settings = HostdSettings(
        lab_id=cfg.lab_id, lab_root=cfg.lab_root, vcsim_url=vcsim_url,
        ca_cert=str(ca_cert or ""), lab_token_file=str(lab_token_file or ""),
        lab_vms=dict(lab_vms if lab_vms is not None else
                     {spec.name: i for i, spec in enumerate(cfg.vms)}),
        authorized_keys_file=str(authorized_keys_file or ""), network=network,
        host_vm_factory=host_vm_factory, poll_s=poll_s,
        profile_path=str(profile_path or ""))
    config = d / "config.json"
    hostd_net.write_private_json(config, asdict(settings))
    socket_path(cfg).unlink(missing_ok=True)
    with open(d / "hostd.log", "ab") as out:
        proc = subprocess.Popen(
            [PROCESS_NAME, "-m", "stillpoint_lab.hostd", "run", str(config)],
            executable=sys.executable, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO_ROOT),
            # argv[0] is our name, so Python cannot find the venv from it: pass its paths.
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *(p for p in sys.path if p.endswith("-packages"))])})
    (d / "hostd.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise LabError(f"{PROCESS_NAME} exited ({proc.returncode}); log {d / 'hostd.log'}:\n"
                           f"{_log_tail(d / 'hostd.log')}")
        try:
            call(cfg, "/host/ping", timeout=2)
            return proc.pid
        except LabError:
            if time.monotonic() > deadline:
                stop_hostd(cfg)
                raise LabError(f"{PROCESS_NAME} did not answer within {timeout_s:g} s; "
                               f"log {d / 'hostd.log'}:\n{_log_tail(d / 'hostd.log')}") from None
            time.sleep(0.05)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_hostd(cfg: LabConfig, *, keep_vms: bool = False) -> None:
    """Stop hostd (checked by its argv[0]): by default it powers its VMs off first
    (SIGTERM); `keep_vms` leaves them running for a new hostd to re-attach (SIGUSR1)."""
    pidfile = hostd_dir(cfg) / "hostd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if _is_ours(pid):
        os.kill(pid, signal.SIGUSR1 if keep_vms else signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _is_ours(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_ours(pid):
            log.warning("%s (pid %d) did not stop: SIGKILL", PROCESS_NAME, pid)
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROCESS_NAME)
    parser.add_argument("command", choices=["run"])
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    settings = HostdSettings.load(args.config)
    hostd = Hostd(settings)
    server = serve(hostd, socket_path(settings.lab))
    hostd.reattach()
    how = {"power_off": True}

    def on_signal(signum: int, _frame: Any) -> None:
        how["power_off"] = signum != signal.SIGUSR1
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    log.info("serving on %s (pid %d, lab %d)", socket_path(settings.lab), os.getpid(),
             settings.lab_id)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        socket_path(settings.lab).unlink(missing_ok=True)
        hostd.shutdown(power_off=how["power_off"])
        log.info("stopped (VMs %s)", "powered off" if how["power_off"] else "left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FIRST_INDEX", "PROCESS_NAME", "Hostd", "HostdError", "HostdSettings", "call", "hostd_dir",
    "qemu_lab_name", "serve", "socket_path", "start_hostd", "stop_hostd", "vm_dir",
]
