"""NBD transport with nbdkit started per disk: VDDK in production, a local file in the lab.

`NbdkitReader.open(disk)` starts one read-only nbdkit on a private Unix socket for that
snapshot disk and returns an NBD stream over it; closing the stream stops nbdkit.

    mode "vddk": nbdkit's VDDK plugin reads the snapshot disk from vSphere (needs VMware's
        VDDK library, libdir=...). The password reaches nbdkit as `password=+<file>` (a
        0600 file in a 0700 directory, removed on close), never in argv.
    mode "file": nbdkit's file plugin serves the snapshot's flat file from a locally
        mounted datastore directory (the lab's simulator datastore; or an NFS datastore
        mounted on the appliance). The descriptor is parsed for the flat extent.

Configuration (profile, under "vcenter"):
    "nbd": {"mode": "vddk", "vddk_libdir": "/opt/vmware-vix-disklib-distrib",
            "transports": "nbdssl:nbd"}
    "nbd": {"mode": "file", "datastores": {"LocalDS_0": "/var/lib/.../datastore"}}
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import TransportError, UsageError
from appliance.transport.base import DEFAULT_PIECE
from appliance.transport.nbd import NBDDiskStream, NBDReader
from appliance.transport.vmdk import flat_extent, is_descriptor
from appliance.vsphere import tls
from appliance.datastore import SnapshotDisk

__all__ = [
    "NbdkitConfig",
    "NbdkitDiskStream",
    "NbdkitReader",
    "VddkTarget",
    "file_args",
    "nbd_reader_from_profile",
    "vddk_args",
]

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class NbdkitConfig:
    mode: str  # "vddk" or "file"
    vddk_libdir: str | None = None
    transports: str = "nbdssl:nbd"
    datastores: Mapping[str, str] = field(default_factory=dict)  # name -> local directory


@dataclass(frozen=True)
class VddkTarget:
    """Where the VDDK plugin logs in (the disk names its VM and snapshot)."""

    host: str
    port: int
    user: str
    thumbprint_sha1: str     # 'AB:CD:...' of vCenter's verified certificate (VDDK's form)


def vddk_args(
    cfg: NbdkitConfig, target: VddkTarget, disk: SnapshotDisk, password_file: Path
) -> list[str]:
    """The plugin and its arguments for nbdkit's VDDK plugin (no secret among them)."""
    if not cfg.vddk_libdir:
        raise UsageError("nbd mode vddk needs vcenter.nbd.vddk_libdir (VMware's VDDK)")
    if not disk.vm_moref or not disk.snapshot_moref:
        raise UsageError(
            f"disk {disk.key}: VDDK needs the VM and snapshot morefs "
            "(use the SnapshotDisk that snapshot_disks() returns)"
        )
    args = [
        "vddk",
        f"libdir={cfg.vddk_libdir}",
        f"server={target.host}",
        f"port={target.port}",
        f"user={target.user}",
        f"password=+{password_file}",
        f"vm=moref={disk.vm_moref}",
        f"snapshot={disk.snapshot_moref}",
        f"transports={cfg.transports}",
        f"file={disk.file_name}",
    ]
    args.append(f"thumbprint={target.thumbprint_sha1}")
    return args


def file_args(cfg: NbdkitConfig, disk: SnapshotDisk) -> list[str]:
    """Filters, plugin and arguments serving a snapshot disk's flat file from a local
    datastore directory (with the offset filter when the extent does not start at 0)."""
    root = cfg.datastores.get(disk.datastore)
    if root is None:
        raise UsageError(
            f"nbd mode file: no local directory for datastore {disk.datastore} "
            f"(vcenter.nbd.datastores)"
        )
    backing = Path(root) / disk.path
    try:
        head = backing.open("rb").read(64 * 1024)
    except OSError as err:
        raise TransportError(f"cannot read {backing}: {err.strerror}") from err
    if is_descriptor(head):
        rel, base, size = flat_extent(disk.path, head.decode("utf-8", "replace"))
        flat = Path(root) / rel
    else:
        flat, base, size = backing, 0, backing.stat().st_size
    if size < disk.capacity:
        raise TransportError(f"{flat} holds {size} bytes, less than the disk's {disk.capacity}")
    if base:
        return [
            "--filter=offset",
            "file",
            f"file={flat}",
            f"offset={base}",
            f"range={disk.capacity}",
        ]
    return ["file", f"file={flat}"]


class NbdkitDiskStream(NBDDiskStream):
    """An NBD stream that owns the nbdkit serving it."""

    def __init__(
        self,
        reader: NBDReader,
        disk: SnapshotDisk,
        uri: str,
        proc: subprocess.Popen[bytes],
        workdir: Path,
    ) -> None:
        self._proc = proc
        self._workdir = workdir
        super().__init__(reader, disk, uri)

    def close(self) -> None:
        try:
            super().close()
        finally:
            _stop(self._proc)
            shutil.rmtree(self._workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class NbdkitReader:
    """DiskReader that serves each disk with its own nbdkit (see module doc)."""

    def __init__(
        self,
        cfg: NbdkitConfig,
        vddk: tuple[VddkTarget, str] | None = None,  # target and password, for mode vddk
        connections: int = 4,
        piece_size: int = DEFAULT_PIECE,
        nbdkit: str = "nbdkit",
    ) -> None:
        if cfg.mode not in ("vddk", "file"):
            raise UsageError(f"nbd mode must be vddk or file, not {cfg.mode!r}")
        if cfg.mode == "vddk" and vddk is None:
            raise UsageError("nbd mode vddk needs the vCenter session and snapshot")
        self.cfg = cfg
        self._vddk = vddk
        # Settings for the streams only: each stream gets its own server's socket.
        self._nbd = NBDReader("", connections=connections, piece_size=piece_size)
        self._nbdkit = nbdkit

    def open(self, disk: SnapshotDisk) -> NbdkitDiskStream:
        if shutil.which(self._nbdkit) is None:
            raise TransportError("nbdkit is not installed (Debian package nbdkit)")
        workdir = Path(tempfile.mkdtemp(prefix="stillpoint-nbd-"))  # 0700
        try:
            if self.cfg.mode == "vddk":
                assert self._vddk is not None
                target, password = self._vddk
                secret = workdir / "password"
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(password)
                plugin = vddk_args(self.cfg, target, disk, secret)
            else:
                plugin = file_args(self.cfg, disk)
            sock, pidfile = workdir / "nbd.sock", workdir / "nbdkit.pid"
            argv = [
                self._nbdkit,
                "--exit-with-parent",
                "-f",
                "-r",
                "-P",
                str(pidfile),
                "-U",
                str(sock),
                *plugin,
            ]
            log = (workdir / "nbdkit.log").open("wb")
            with log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            _wait_ready(proc, pidfile, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            return NbdkitDiskStream(self._nbd, disk, f"nbd+unix:///?socket={sock}", proc, workdir)
        except BaseException:
            _stop(proc)
            shutil.rmtree(workdir, ignore_errors=True)
            raise


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: Path, workdir: Path) -> None:
    # nbdkit writes its pid file only once it accepts connections.
    deadline = time.monotonic() + START_TIMEOUT_S
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            tail = (workdir / "nbdkit.log").read_bytes()[-2000:].decode(errors="replace")
            raise TransportError(f"nbdkit did not start (exit {proc.returncode}): {tail}")
        time.sleep(0.02)


def nbd_reader_from_profile(profile: Any, session: Any) -> NbdkitReader:
    """The NBD reader the profile configures (vcenter.nbd, see module doc); in vddk mode it
    logs in as the session's endpoint does (same user, password and pin)."""
    raw = (getattr(profile, "vcenter", None) or {}).get("nbd")
    if not isinstance(raw, dict) or raw.get("mode") not in ("vddk", "file"):
        raise UsageError(
            'the nbd transport needs vcenter.nbd in the profile: {"mode": "vddk", '
            '"vddk_libdir": ...} or {"mode": "file", "datastores": {"<name>": "<dir>"}}'
        )
    cfg = NbdkitConfig(
        mode=raw["mode"],
        vddk_libdir=raw.get("vddk_libdir"),
        transports=raw.get("transports", "nbdssl:nbd"),
        datastores=dict(raw.get("datastores") or {}),
    )
    if cfg.mode == "file":
        return NbdkitReader(cfg)
    ep = session.endpoint
    # VDDK checks vCenter by SHA-1 thumbprint: take it from the certificate this session's
    # own trust (CA or SHA-256 pin) verifies, so both kinds of profile give VDDK one.
    der = tls.verified_peer_certificate(ep.host, ep.port, session.ssl_context())
    target = VddkTarget(ep.host, ep.port, ep.user, tls.sha1_thumbprint_colon(der))
    return NbdkitReader(cfg, (target, ep.password))
