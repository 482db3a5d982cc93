"""One QEMU process: a lab VM's "VMX". Builds the argv, starts QEMU, and stops it.

Everything lives in the spec's run dir:

    qmp.sock      QMP for the VM's owner (hostd)       qmp2.sock   a spare QMP (tests, debug)
    qga.sock      qemu-guest-agent (virtio-serial port org.qemu.guest_agent.0)
    nbd.sock      QEMU's NBD server, once started       serial.log  the guest's serial console
    qemu.pid      written by QEMU                       qemu.log    QEMU's own stderr

Block graph per disk (node names from `nodes(key)`, so QMP can name every layer):

    disk<key>  virtio-blk-pci device ─▶ [disk<key>-delta  qcow2, file disk<key>-dfile]
                                         └▶ disk<key>-base  qcow2 (metadata only, bitmaps)
                                              ├ file:      disk<key>-file  <flat>.qcow2
                                              └ data-file: disk<key>-data  <flat> (raw)

The delta layer exists only while the VM runs on a snapshot's delta. Disk 0 boots.
The process is titled `-name <vm>,process=stillpoint-qemu-<lab>-<vm>`: `kill_all` finds
stray ones by that argument in /proc/*/cmdline. fw_cfg values are passed as 0600 files,
never on the command line. QEMU is started in its own session (it outlives a restarted
hostd, which re-`attach`es to it through the pid file).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from stillpoint_lab.qemu.accel import accel_argv
from stillpoint_lab.qemu.disks import meta_path
from stillpoint_lab.qemu.qga import QGA
from stillpoint_lab.qemu.qmp import DEFAULT_TIMEOUT_S as DEFAULT_QMP_TIMEOUT_S
from stillpoint_lab.qemu.qmp import QMP, QMPError

QEMU = "qemu-system-x86_64"
TITLE_PREFIX = "stillpoint-qemu-"
START_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 30.0
MAX_SOCKET_PATH = 107
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class MachineError(Exception):
    """QEMU could not be started or stopped."""


def process_title(lab: str, vm: str) -> str:
    return f"{TITLE_PREFIX}{lab}-{vm}"


@dataclass(frozen=True)
class Nodes:
    """QMP names of one disk's block nodes and device."""

    key: int

    @property
    def data(self) -> str:
        return f"disk{self.key}-data"

    @property
    def file(self) -> str:
        return f"disk{self.key}-file"

    @property
    def base(self) -> str:
        return f"disk{self.key}-base"

    @property
    def delta(self) -> str:
        return f"disk{self.key}-delta"

    @property
    def delta_file(self) -> str:
        return f"disk{self.key}-dfile"

    @property
    def device(self) -> str:
        return f"disk{self.key}"

    @property
    def backend(self) -> str:
        """The device's block backend, for HMP `qemu-io -d` (writes as the guest makes them)."""
        return f"/machine/peripheral/{self.device}/virtio-backend"


def nodes(key: int) -> Nodes:
    return Nodes(key)


@dataclass(frozen=True)
class MachineDisk:
    key: int
    flat: Path
    delta: Path | None = None   # the active layer while the VM runs on a snapshot's delta

    @property
    def meta(self) -> Path:
        return meta_path(self.flat)


@dataclass(frozen=True)
class Nic:
    mac: str
    tap: str


@dataclass(frozen=True)
class MachineSpec:
    name: str
    lab: str
    run_dir: Path
    memory_mib: int = 1024
    cpus: int = 2
    disks: tuple[MachineDisk, ...] = ()
    nic: Nic | None = None
    fw_cfg: dict[str, Path] = field(default_factory=dict)   # "opt/stillpoint/x" → file
    uuid: str | None = None
    netns: str | None = None           # run QEMU inside this network namespace (its tap's)
    accel: tuple[str, ...] | None = None   # None: accel.accel_argv()
    extra_args: tuple[str, ...] = ()      # appended as they are (tests, debugging)
    qemu: str = QEMU

    @property
    def title(self) -> str:
        return process_title(self.lab, self.name)


def _blockdev(**opts: object) -> list[str]:
    return ["-blockdev", json.dumps(opts, separators=(",", ":"))]


def _kv(path: Path) -> str:
    return str(path).replace(",", ",,")


def build_argv(spec: MachineSpec) -> list[str]:
    """QEMU's command line for `spec` (pure: no files are touched)."""
    for what, value in (("vm name", spec.name), ("lab", spec.lab)):
        if not _NAME.match(value):
            raise MachineError(f"bad {what} {value!r}")
    run = Path(spec.run_dir).absolute()
    argv = [] if spec.netns is None else ["ip", "netns", "exec", spec.netns]
    argv += [spec.qemu, "-name", f"{spec.name},process={spec.title}",
             "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc",
             *(spec.accel if spec.accel is not None else accel_argv()),
             "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
             "-pidfile", str(run / "qemu.pid")]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    for i, path in enumerate((run / "qmp.sock", run / "qmp2.sock")):
        argv += ["-chardev", f"socket,id=qmp{i},path={_kv(path)},server=on,wait=off",
                 "-mon", f"chardev=qmp{i},mode=control"]
    argv += ["-chardev", f"socket,id=qga0,path={_kv(run / 'qga.sock')},server=on,wait=off",
             "-device", "virtio-serial-pci,id=vser0",
             "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
             "-chardev", f"file,id=serial0,path={_kv(run / 'serial.log')}",
             "-serial", "chardev:serial0",
             "-object", "rng-random,id=rng0,filename=/dev/urandom",
             "-device", "virtio-rng-pci,rng=rng0"]
    for i, disk in enumerate(spec.disks):
        n = nodes(disk.key)
        flat = Path(disk.flat).absolute()
        argv += _blockdev(driver="file", **{"node-name": n.data}, filename=str(flat))
        argv += _blockdev(driver="file", **{"node-name": n.file}, filename=str(meta_path(flat)))
        argv += _blockdev(driver="qcow2", **{"node-name": n.base, "file": n.file,
                                             "data-file": n.data})
        top = n.base
        if disk.delta is not None:
            argv += _blockdev(driver="file", **{"node-name": n.delta_file},
                              filename=str(Path(disk.delta).absolute()))
            argv += _blockdev(driver="qcow2", **{"node-name": n.delta, "file": n.delta_file,
                                                 "backing": n.base})
            top = n.delta
        dev = f"virtio-blk-pci,drive={top},id={n.device}"
        if i == 0:
            dev += ",bootindex=0"
        argv += ["-device", dev]
    if spec.nic is not None:
        argv += ["-netdev", f"tap,id=net0,ifname={spec.nic.tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.nic.mac}"]
    for name, path in sorted(spec.fw_cfg.items()):
        if not name.startswith("opt/") or "," in name:
            raise MachineError(f"bad fw_cfg name {name!r}")
        argv += ["-fw_cfg", f"name={name},file={_kv(Path(path).absolute())}"]
    return argv + list(spec.extra_args)


def _proc_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_ours(pid: int, title: str) -> bool:
    return _proc_alive(pid) and any(a.endswith(f"process={title}") for a in _cmdline(pid))


class Machine:
    """One QEMU process for one spec (see the module docstring)."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.run_dir = Path(spec.run_dir).absolute()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._qmp: QMP | None = None
        self._qga: QGA | None = None

    # --- paths ----------------------------------------------------------------------
    qmp_path = property(lambda self: self.run_dir / "qmp.sock")
    debug_qmp_path = property(lambda self: self.run_dir / "qmp2.sock")
    qga_path = property(lambda self: self.run_dir / "qga.sock")
    nbd_path = property(lambda self: self.run_dir / "nbd.sock")
    serial_path = property(lambda self: self.run_dir / "serial.log")
    pid_path = property(lambda self: self.run_dir / "qemu.pid")
    log_path = property(lambda self: self.run_dir / "qemu.log")

    def argv(self) -> list[str]:
        return build_argv(self.spec)

    # --- lifecycle ------------------------------------------------------------------
    def start(self, *, timeout: float = START_TIMEOUT_S) -> int:
        """Start QEMU and connect the owner's QMP; its pid. MachineError (with QEMU's
        stderr) if it exits or does not answer within `timeout`."""
        if self.running:
            raise MachineError(f"{self.spec.name}: QEMU already runs (pid {self.pid})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        for p in (self.qmp_path, self.debug_qmp_path, self.qga_path, self.nbd_path):
            if len(str(p)) > MAX_SOCKET_PATH:
                raise MachineError(f"socket path too long for a unix socket: {p}")
            p.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log, start_new_session=True,
                                              cwd=self.run_dir)
            except OSError as err:
                raise MachineError(f"cannot run {argv[0]}: {err}") from err
        self._pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise MachineError(f"{self.spec.name}: QEMU exited ({self._proc.returncode}): "
                                   f"{self.log_tail()}")
            try:
                self._qmp = QMP(self.qmp_path).connect()
                break
            except QMPError:
                if time.monotonic() >= deadline:
                    self.kill9()
                    raise MachineError(f"{self.spec.name}: QMP did not answer within "
                                       f"{timeout:.0f} s: {self.log_tail()}") from None
                time.sleep(0.05)
        return self._pid

    def attach(self, *, timeout: float = 5.0) -> bool:
        """Take over a QEMU that already runs for this spec (a restarted hostd)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return False
        if not _is_ours(pid, self.spec.title):
            return False
        self._proc, self._pid = None, pid
        try:
            self._qmp = QMP(self.qmp_path, timeout=timeout).connect()
        except QMPError:
            return False   # e.g. another client holds the monitor (QMP serves one at a time)
        self._qmp.timeout = DEFAULT_QMP_TIMEOUT_S
        return True

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and _is_ours(self._pid, self.spec.title)

    @property
    def qmp(self) -> QMP:
        """The owner's QMP connection (reconnected if it dropped)."""
        if self._qmp is None or not self._qmp.connected:
            if not self.running:
                raise MachineError(f"{self.spec.name}: QEMU is not running")
            self._qmp = QMP(self.qmp_path).connect()
        return self._qmp

    def debug_qmp(self) -> QMP:
        """A new connection to the spare QMP monitor (the caller closes it)."""
        return QMP(self.debug_qmp_path).connect()

    @property
    def qga(self) -> QGA:
        if self._qga is None:
            self._qga = QGA(self.qga_path)
        return self._qga

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        self.close()
        return True

    def close(self) -> None:
        """Close our QMP and guest agent connections; QEMU keeps running."""
        for chan in (self._qmp, self._qga):
            if chan is not None:
                chan.close()
        self._qmp = None
        self._qga = None

    def quit(self, *, timeout: float = QUIT_TIMEOUT_S) -> bool:
        """QMP `quit`: the guest loses power; QEMU flushes, stores the persistent bitmaps
        and exits. False if it had to be killed instead (not a clean stop)."""
        if not self.running:
            self.close()
            return True
        try:
            self.qmp.execute("quit", timeout=timeout)
        except QMPError:
            pass  # the connection often closes before the reply
        if self.wait_exit(timeout):
            return True
        self.kill9()
        return False

    def kill9(self) -> None:
        """SIGKILL: QEMU stops without closing its images (bitmaps stay "in use")."""
        pid = self._pid
        if pid is not None and self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait_exit(10)
        self.close()

    def reset(self) -> None:
        """A hard reset of the guest (`system_reset`)."""
        self.qmp.execute("system_reset")

    def serial_size(self) -> int:
        """How much the serial console log holds now (a `since` for `wait_banner`)."""
        try:
            return self.serial_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_banner(self, text: str, timeout: float, *, since: int = 0) -> bool:
        """Wait until `text` appears in the serial console log after byte `since`; False
        after `timeout` or when QEMU exits."""
        needle = text.encode()
        deadline = time.monotonic() + timeout
        pos = since
        buf = b""
        while True:
            try:
                with open(self.serial_path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                buf = buf[-len(needle):] + chunk
                if needle in buf:
                    return True
            if time.monotonic() >= deadline or not self.running:
                return False
            time.sleep(0.2)


# --- network and teardown helpers --------------------------------------------------
def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise MachineError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def create_tap(name: str, bridge: str | None = None, *, netns: str | None = None) -> None:
    """A tap device for a VM's NIC, on `bridge` and up (an old one is replaced)."""
    if len(name) > 15:
        raise MachineError(f"tap name too long: {name}")
    _ip(netns, "link", "del", name, check=False)
    _ip(netns, "tuntap", "add", "dev", name, "mode", "tap")
    if bridge:
        _ip(netns, "link", "set", name, "master", bridge)
    _ip(netns, "link", "set", name, "up")


def delete_tap(name: str, *, netns: str | None = None) -> None:
    _ip(netns, "link", "del", name, check=False)


def find_processes(prefix: str) -> list[int]:
    """Pids of live QEMU processes whose title starts with `prefix`
    (e.g. process_title("sptest6", "")) ."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if any(a.startswith("process=" + prefix) or f",process={prefix}" in a
               for a in _cmdline(pid)) and _proc_alive(pid):
            pids.append(pid)
    return pids


def kill_all(prefix: str, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every QEMU of ours whose title starts with `prefix`; the pids killed."""
    pids = [p for p in find_processes(prefix) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_proc_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids
