"""The lab's vCenter: build, start and stop `stillpoint-vcsim` (tests/lab/vcsim, Go).

The simulator is govmomi's vSphere API simulator extended with point-in-time snapshot disks,
exact QueryChangedDiskAreas, guest identity, lab knobs and a guestinfo endpoint (see
docs/lab-vcsim.md). With a hostd socket, QEMU-backed VMs are run by the lab's host agent
(stillpoint_lab/hostd.py, docs/lab-hypervisor.md): the simulator delegates their power,
snapshots and CBT to it. This module builds it (cached by a hash of the Go sources), gives each
lab its own TLS certificate and random password, and starts it in its own process group.

The binary takes one argument, the path of a JSON config (secrets only by 0600 file path):

    {
      "listen": "0.0.0.0:0",                   host:port; port 0 = the simulator chooses
      "tls_cert": "<state>/vcsim/cert.pem",    PEM, SAN = 127.0.0.1, localhost, lab host IP
      "tls_key": "<state>/vcsim/key.pem",      PEM, 0600
      "user": "administrator@vsphere.local",
      "password_file": "<state>/vcsim/password",    0600
      "lab_token_file": "<state>/vcsim/lab-token",  0600; sent as X-Lab-Token to /lab/knobs
      "datastore_dir": "<state>/vcsim/datastore",   the datastore LocalDS_0 of datacenter DC0
      "datastore_type": "" | "vsan",                vsan: no disk data over /folder/; disks
                                                    are written through an import lease
      "span_cap_bytes": 1073741824,            QueryChangedDiskAreas span per reply (64 KiB multiple)
      "ready_file": "<state>/vcsim/ready.json",
      "hostd_socket": "<state>/hostd/hostd.sock",   optional; with it, VMs made through the
                                               API (restores) are QEMU-backed too
      "vms": [{"name": "lab-vm1", "folder": "",   optional: "prod/db" below the VM folder
               "guest_id": "debian12_64Guest", "tools_running": true,
               "ip": "10.77.0.10", "hostname": "lab-vm1",
               "hypervisor": "files",          "files" (default: captured snapshots, hash
                                               CBT) or "qemu" (hostd runs it; starts powered
                                               off; ip/hostname/tools come from its guest)
               "memory_mib": 1024, "cpus": 2,  optional (0: the simulator's defaults)
               "disks": [{"size_bytes": 536870912,
                          "pre": ["fsfreeze", "-f", "/mnt"], "post": ["fsfreeze", "-u", "/mnt"]}]}]
    }

Once serving it writes the ready file:

    {"url": "https://127.0.0.1:<port>/sdk", "port": <port>, "pid": <pid>,
     "vms": {"<name>": {"moref": "vm-42", "hypervisor": "files",
             "disks": [{"key": 2000, "label": "Hard disk 1",
             "capacity_bytes": ..., "datastore_path": "[LocalDS_0] lab-vm1/lab-vm1.vmdk",
             "flat_file": "/abs/.../lab-vm1/lab-vm1-flat.vmdk"}]}}}

Capture hooks (`pre`/`post`) run just before/after the simulator captures that disk for a
snapshot (`post` also when the capture failed), with STILLPOINT_VM, STILLPOINT_DISK_KEY and
STILLPOINT_FLAT_FILE in their environment; a failing hook fails the snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import LabError
from stillpoint_lab.certs import make_self_signed
from stillpoint_lab.config import GO_SOURCES, LabConfig

BINARY_NAME = "stillpoint-vcsim"
GOPATH = Path("/usr/share/gocode")
GOVMOMI = GOPATH / "src/github.com/vmware/govmomi/simulator"
DEFAULT_SPAN_CAP = 1 << 30
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class VcsimDisk:
    """One disk of a simulated VM, with optional capture hooks (argv lists)."""

    size_bytes: int
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()


@dataclass(frozen=True)
class VcsimVM:
    name: str
    folder: str = ""            # below the datacenter's VM folder ("prod/db")
    guest_id: str = "debian12_64Guest"
    tools_running: bool = True
    ip: str = ""
    hostname: str = ""
    disks: tuple[VcsimDisk, ...] = (VcsimDisk(512 << 20),)
    hypervisor: str = "files"   # or "qemu": run by hostd (needs start_vcsim(hostd_socket=...))
    memory_mib: int = 0         # 0: the simulator's default
    cpus: int = 0


@dataclass(frozen=True)
class DiskInfo:
    key: int
    label: str
    capacity_bytes: int
    datastore_path: str   # "[LocalDS_0] vm/vm.vmdk" (the descriptor)
    flat_file: Path       # absolute path of the flat extent on this host


@dataclass(frozen=True)
class VMInfo:
    moref: str
    disks: list[DiskInfo]
    hypervisor: str = "files"


def vms_from_lab_config(cfg: LabConfig) -> list[VcsimVM]:
    """The lab's VMs as the simulator should show them (no capture hooks)."""
    return [
        VcsimVM(
            name=spec.name,
            folder=spec.folder,
            guest_id=spec.guest_id,
            tools_running=spec.tools_running,
            ip=cfg.guest_ip(i) if spec.has_guest else "",
            hostname=spec.name if spec.has_guest else "",
            disks=tuple(VcsimDisk(d.size_bytes) for d in spec.disks),
        )
        for i, spec in enumerate(cfg.vms)
    ]


# --- build ----------------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("STILLPOINT_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "stillpoint" if base else Path.home() / ".cache" / "stillpoint"


def _sources_digest(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.glob("*.go")):
        if p.name.endswith("_test.go"):
            continue
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def go_cache_dir() -> Path:
    """Go's build cache for the simulator (its build and its `go test`s share it)."""
    return _cache_root() / "go-build"


def build_vcsim(src: Path = GO_SOURCES) -> Path:
    """Build stillpoint-vcsim (once per version of the Go sources) and return its path."""
    go = shutil.which("go")
    if go is None:
        raise LabError("Go is not installed (Debian package golang-go)")
    if not GOVMOMI.is_dir():
        raise LabError(f"govmomi sources missing at {GOVMOMI} "
                       "(Debian package golang-github-vmware-govmomi-dev)")
    out_dir = _cache_root() / "vcsim" / _sources_digest(src)
    binary = out_dir / BINARY_NAME
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{BINARY_NAME}.{os.getpid()}.tmp"
    env = dict(os.environ, GOPATH=str(GOPATH), GO111MODULE="off",
               GOCACHE=str(go_cache_dir()), GOFLAGS="")
    proc = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=src, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LabError(f"building {BINARY_NAME} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, binary)  # atomic: concurrent builders both end with a whole binary
    return binary


# --- TLS ------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _make_cert(cert_path: Path, key_path: Path, host_ip: str) -> str:
    """A self-signed certificate for this lab; returns its SHA-256 thumbprint."""
    made = make_self_signed(cert_path, key_path, common_name="stillpoint-lab-vcenter",
                            ips=("127.0.0.1", host_ip))
    return made.thumbprint_sha256


def thumbprint_sha256(der: bytes) -> str:
    """vSphere-style thumbprint: colon-separated uppercase hex of SHA-256(DER)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


# --- process --------------------------------------------------------------------------------


@dataclass
class VcsimHandle:
    url: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    cert_pem_path: Path
    thumbprint_sha256: str
    pid: int
    datastore_dir: Path
    vms: dict[str, VMInfo]
    state_dir: Path
    log_path: Path
    lab_token: str = field(repr=False)
    hostd_socket: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def lab_token_path(self) -> Path:
        """The 0600 file holding the lab token (hostd reads it from there)."""
        return self.state_dir / "vcsim" / "lab-token"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this lab's certificate."""
        return ssl.create_default_context(cafile=str(self.cert_pem_path))

    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; safe to call twice."""
        if self._proc is not None:
            _terminate_group(self.pid, self._proc.wait)
            self._proc = None
        else:
            _stop_pid(self.pid)
        (self.state_dir / "vcsim" / "vcsim.pid").unlink(missing_ok=True)

    def _lab_request(self, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url() + path, data=data,
                                     method="POST" if body is not None else "GET")
        req.add_header("X-Lab-Token", self.lab_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as err:
            raise LabError(f"vcsim {path}: HTTP {err.code}: {err.read()[:200]!r}") from err
        except (urllib.error.URLError, OSError) as err:
            raise LabError(f"vcsim {path}: {err}") from err

    def set_knobs(self, vm: str, *, snapshot_delay_s: float | None = None,
                  snapshot_fail: bool | None = None, cbt_reset: bool = False) -> dict[str, Any]:
        """Make snapshots of `vm` slow or failing, or reset its CBT (old changeIds invalid)."""
        body: dict[str, Any] = {"vm": vm, "cbt_reset": cbt_reset}
        if snapshot_delay_s is not None:
            body["snapshot_delay_s"] = float(snapshot_delay_s)
        if snapshot_fail is not None:
            body["snapshot_fail"] = bool(snapshot_fail)
        result: dict[str, Any] = json.loads(self._lab_request("/lab/knobs", body))
        return result

    def report_guest(self, vm: str, *, ip: str = "", hostname: str = "",
                     tools_running: bool = True) -> None:
        """Set the guest identity vSphere shows for `vm` (what hostd does from the guest agent)."""
        self._lab_request("/lab/guest", {"vm": vm, "ip": ip, "hostname": hostname,
                                         "tools_running": tools_running})

    def guestinfo(self, vm: str, key: str) -> str | None:
        """What a lab guest reads for `guestinfo.<key>` (None when unset)."""
        path = "/lab/guestinfo/" + urllib.parse.quote(vm) + "/" + urllib.parse.quote(key)
        req = urllib.request.Request(self.base_url() + path)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
                return bytes(resp.read()).decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise LabError(f"vcsim guestinfo: HTTP {err.code}") from err
        except (urllib.error.URLError, OSError) as err:
            raise LabError(f"vcsim guestinfo: {err}") from err


def _is_vcsim(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0.decode(errors="replace")) == BINARY_NAME


def _terminate_group(pid: int, wait: Any) -> None:
    """SIGTERM to the simulator only (it lets a running capture hook, e.g. a thaw, finish),
    then SIGKILL to its process group: after a timeout, and for any hook left behind."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"{BINARY_NAME} (pid {pid}) did not stop") from err


def _stop_pid(pid: int) -> None:
    """Stop a simulator we did not start in this process (checked by its argv[0])."""
    if not _is_vcsim(pid):
        return

    def wait(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _is_vcsim(pid):
                return
            time.sleep(0.05)
        raise subprocess.TimeoutExpired(BINARY_NAME, timeout)

    _terminate_group(pid, wait)


def stop_vcsim_by_pidfile(state_dir: Path) -> None:
    """Teardown for a lab whose Python process died: stop the simulator named by its pid file."""
    pidfile = state_dir / "vcsim" / "vcsim.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    _stop_pid(pid)
    pidfile.unlink(missing_ok=True)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_vcsim(cfg: LabConfig, state_dir: Path, vms: list[VcsimVM], *,
                port: int = 0, span_cap_bytes: int = DEFAULT_SPAN_CAP,
                timeout_s: float = READY_TIMEOUT_S,
                hostd_socket: Path | None = None) -> VcsimHandle:
    """Start the lab's vCenter with these VMs; returns once it serves.

    `hostd_socket`: where the lab's host agent listens (stillpoint_lab.hostd.socket_path);
    it may start after the simulator (it needs the simulator's URL and token), the
    simulator connects on each call."""
    for vm in vms:
        if vm.hypervisor not in ("files", "qemu"):
            raise LabError(f"VM {vm.name}: hypervisor must be 'files' or 'qemu', "
                           f"not {vm.hypervisor!r}")
        if vm.hypervisor == "qemu" and hostd_socket is None:
            raise LabError(f"VM {vm.name} is QEMU-backed: start_vcsim needs hostd_socket")
    binary = build_vcsim()
    home = state_dir / "vcsim"
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    stop_vcsim_by_pidfile(state_dir)  # a leftover from a crashed run holds files open

    datastore = home / "datastore"
    datastore.mkdir(exist_ok=True)
    cert, key = home / "cert.pem", home / "key.pem"
    thumbprint = _make_cert(cert, key, cfg.host_ip)
    password = secrets.token_urlsafe(24)
    lab_token = secrets.token_urlsafe(24)
    _write_private(home / "password", password.encode())
    _write_private(home / "lab-token", lab_token.encode())
    ready = home / "ready.json"
    ready.unlink(missing_ok=True)

    config = {
        "listen": f"0.0.0.0:{port}",
        "tls_cert": str(cert),
        "tls_key": str(key),
        "user": cfg.user,
        "password_file": str(home / "password"),
        "lab_token_file": str(home / "lab-token"),
        "datastore_dir": str(datastore),
        "datastore_type": cfg.datastore_type,
        "span_cap_bytes": span_cap_bytes,
        "ready_file": str(ready),
        "hostd_socket": str(hostd_socket) if hostd_socket is not None else "",
        "vms": [
            {
                "name": vm.name, "folder": vm.folder, "guest_id": vm.guest_id, "tools_running": vm.tools_running,
                "ip": vm.ip, "hostname": vm.hostname, "hypervisor": vm.hypervisor,
                "memory_mib": vm.memory_mib, "cpus": vm.cpus,
                "disks": [{"size_bytes": d.size_bytes, "pre": list(d.pre), "post": list(d.post)}
                          for d in vm.disks],
            }
            for vm in vms
        ],
    }
    config_path = home / "config.json"
    _write_private(config_path, json.dumps(config, indent=2).encode())

    log_path = home / "vcsim.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([BINARY_NAME, str(config_path)], executable=str(binary),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=home)
    (home / "vcsim.pid").write_text(f"{proc.pid}\n")

    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            info = json.loads(ready.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.05)
    if info is None:
        _terminate_group(proc.pid, proc.wait)
        (home / "vcsim.pid").unlink(missing_ok=True)
        raise LabError(f"{BINARY_NAME} did not become ready (exit {proc.returncode}); "
                       f"log {log_path}:\n{_log_tail(log_path)}")

    try:
        vm_infos = {
            name: VMInfo(moref=v["moref"], hypervisor=v.get("hypervisor") or "files", disks=[
                DiskInfo(key=d["key"], label=d["label"], capacity_bytes=d["capacity_bytes"],
                         datastore_path=d["datastore_path"], flat_file=Path(d["flat_file"]))
                for d in v["disks"] or []
            ])
            for name, v in info["vms"].items()
        }
        url, port = str(info["url"]), int(info["port"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        _terminate_group(proc.pid, proc.wait)
        (home / "vcsim.pid").unlink(missing_ok=True)
        raise LabError(f"{BINARY_NAME} wrote a malformed ready file {ready}: {err!r}") from err
    return VcsimHandle(
        url=url, host="127.0.0.1", port=port, user=cfg.user,
        password=password, cert_pem_path=cert, thumbprint_sha256=thumbprint, pid=proc.pid,
        datastore_dir=datastore, vms=vm_infos, state_dir=state_dir, log_path=log_path,
        lab_token=lab_token, hostd_socket=hostd_socket, _proc=proc,
    )


__all__ = [
    "BINARY_NAME", "DEFAULT_SPAN_CAP", "DiskInfo", "VMInfo", "VcsimDisk", "VcsimHandle", "VcsimVM", "build_vcsim",
    "start_vcsim", "stop_vcsim_by_pidfile", "thumbprint_sha256", "vms_from_lab_config",
]
