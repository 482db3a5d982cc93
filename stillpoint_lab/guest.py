"""A lab guest: a Linux "machine" made of a network namespace and a mount namespace.

The guest's disk 0 is the VM's flat disk file in the simulator's datastore, loop-mounted on
/data inside the guest's mount namespace; PostgreSQL 15 and MariaDB keep their data there,
and the agent's install dirs (/opt/stillpoint, /etc/stillpoint, /etc/vmware-tools) are bind
mounts from it. So a vSphere snapshot of the VM holds exactly what the applications and the
agent wrote. sshd listens on the guest's own address (key auth only, host key pinned).

Booting (`start_guest`) runs the agent's /etc/stillpoint/boot.d/ scripts BEFORE the
databases start, which is how a restored VM's first boot runs the post-restore procedure.

Everything is named from the lab id (config.LabConfig), so `stop_guest` / `teardown_all`
find and remove it by name, also after the process that made it crashed.
Modules: guest_ns (namespaces), guest_net (bridge, veth), guest_ssh (user, keys, sshd),
guest_apps (databases); the guest-side scripts live in tests/lab/guest/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import LabError
from stillpoint_lab import guest_apps, guest_ssh
from stillpoint_lab.config import GUEST_SOURCES, LabConfig
from stillpoint_lab.guest_net import (
    add_guest_link,
    lab_netns,
    remove_guest_link,
    remove_lab_links,
    setup_network,
)
from stillpoint_lab.guest_ns import (
    ensure_private_ns_dir,
    guest_dir,
    guests_dir,
    is_mountpoint,
    is_nsfs,
    kill_pids,
    mntns_path,
    netns_path,
    ns_dir,
    nsenter_argv,
    pids_in_ns,
    sh,
)

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 300
_MOUNT_MARKER = ".stillpoint-lab-mountpoint"
_AGENT_DIRS = ("/opt/stillpoint", "/etc/stillpoint", "/etc/vmware-tools")
_EXT4_MAGIC_OFFSET = 1024 + 0x38

__all__ = [
    "GuestHandle",
    "capture_hook_argv",
    "disk_mountpoint",
    "setup_network",
    "start_guest",
    "stop_guest",
    "teardown_all",
]


def disk_mountpoint(disk_index: int) -> str:
    return "/data" if disk_index == 0 else f"/data{disk_index}"


@dataclass
class GuestHandle:
    cfg: LabConfig
    index: int
    name: str
    netns: str
    ip: str
    ssh_user: str
    ssh_key_path: Path          # the lab's client private key
    host_key_line: str          # known_hosts format: "<ip> ssh-ed25519 AAAA..."
    host_key_sha256: str        # "SHA256:..."
    mntns_path: Path
    state_dir: Path
    apps: tuple[str, ...] = ("postgresql", "mariadb")
    boot_ok: bool = True        # every boot.d script exited 0
    boot_log: str = f"{guest_apps.LOG_DIR}/stillpoint-boot.log"  # guest view
    _app_children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def run(self, argv: list[str], input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `argv` as root inside the guest (both namespaces), clean environment."""
        try:
            return subprocess.run(self.command(argv), check=False, input=input, capture_output=True,
                                  text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"in guest {self.name}: {argv[0]}: {err}") from err

    def spawn(self, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the guest, output appended to `log` (host)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(argv, env), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return proc

    def _spawn_app(self, argv: list[str], log: Path) -> None:
        # Kept so that stop_apps can reap it (no zombie left behind).
        self._app_children.append(self.spawn(argv, log))

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """The host argv that runs `argv` as root inside the guest (for Popen)."""
        base = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        base.update(env or {})
        return [*nsenter_argv(self.cfg, self.name), "env", "-i",
                *(f"{k}={v}" for k, v in base.items()), *argv]

    def start_apps(self, after_boot: bool = False) -> None:
        if "postgresql" in self.apps:
            guest_apps.start_postgresql(self.run, self.ip, after_boot=after_boot)
        if "mariadb" in self.apps:
            log = self.state_dir / "mariadbd.out"
            guest_apps.start_mariadb(self.run, lambda argv: self._spawn_app(argv, log))

    def stop_apps(self) -> None:
        if "mariadb" in self.apps:
            guest_apps.stop_mariadb(self.run)
        if "postgresql" in self.apps:
            guest_apps.stop_postgresql(self.run)
        for child in self._app_children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)    # it has exited: stop_* waited for that
        self._app_children.clear()


def capture_hook_argv(cfg: LabConfig, vm_name: str, disk_index: int,
                      ) -> tuple[list[str], list[str]]:
    """(pre, post) commands that freeze / thaw the guest's file system on that disk.

    Pure function of names: the simulator gets it before the guest boots. A guest that is
    not running (or a disk not mounted) makes both hooks no-ops.
    """
    hook = str(GUEST_SOURCES / "capture-hook")
    state = str(guest_dir(cfg, vm_name) / f"capture-{disk_index}.state")
    args = [str(mntns_path(cfg, vm_name)), disk_mountpoint(disk_index), state]
    return [hook, "pre", *args], [hook, "post", *args]


def start_guest(cfg: LabConfig, index: int, vm_name: str, disk_files: list[Path],
                apps: tuple[str, ...] = ("postgresql", "mariadb"),
                guestinfo_url: str | None = None, ca_cert: Path | None = None,
                format_disks: bool = True) -> GuestHandle:
    """Bring up guest `vm_name` at cfg.guest_ip(index) on `disk_files` and boot it.

    format_disks: mkfs.ext4 a disk that holds no file system yet (first boot). A disk that
    already has one (e.g. restored) is never formatted; disk 0 must then have one.
    """
    if os.geteuid() != 0:
        raise LabError("lab guests need root (namespaces, loop devices, mounts)")
    if not disk_files:
        raise LabError(f"guest {vm_name} needs at least one disk")
    if cfg.netns(vm_name) in lab_netns(cfg) or is_nsfs(mntns_path(cfg, vm_name)):
        raise LabError(f"guest {vm_name} of lab {cfg.lab_id} is already running")
    try:
        return _start(cfg, index, vm_name, [Path(d) for d in disk_files], apps,
                      guestinfo_url, ca_cert, format_disks)
    except BaseException:
        stop_guest(cfg, vm_name)
        raise


def _start(cfg: LabConfig, index: int, vm_name: str, disks: list[Path],
           apps: tuple[str, ...], guestinfo_url: str | None, ca_cert: Path | None,
           format_disks: bool) -> GuestHandle:
    gdir = guest_dir(cfg, vm_name)
    gdir.mkdir(parents=True, exist_ok=True)
    gdir.chmod(0o755)
    (gdir / "guest.json").write_text(json.dumps(
        {"index": index, "disks": [str(d) for d in disks], "apps": list(apps)}))
    guest_ssh.ensure_user_and_keys(cfg)
    setup_network(cfg)
    mounts = _prepare_disks(vm_name, disks, format_disks)
    add_guest_link(cfg, index, vm_name)
    _make_mount_ns(cfg, vm_name, gdir, mounts, cfg.guest_ip(index), index)
    ip = cfg.guest_ip(index)
    host_key = guest_ssh.write_sshd_config(cfg, gdir, ip)
    handle = GuestHandle(
        cfg=cfg, index=index, name=vm_name, netns=cfg.netns(vm_name), ip=ip,
        ssh_user=guest_ssh.SSH_USER, ssh_key_path=guest_ssh.client_key_path(cfg),
        host_key_line=f"{ip} {host_key.public}", host_key_sha256=host_key.sha256,
        mntns_path=mntns_path(cfg, vm_name), state_dir=gdir, apps=apps,
    )
    if guestinfo_url:
        _write_guestinfo_config(handle, guestinfo_url, ca_cert)
    started = handle.run(["/usr/sbin/sshd", "-f", str(gdir / "sshd_config")])
    if started.returncode != 0:
        raise LabError(f"sshd in guest {vm_name} failed: {started.stderr.strip()}")
    boot = handle.run([str(GUEST_SOURCES / "stillpoint-boot"), str(BOOT_TIMEOUT_S)],
                      timeout=BOOT_TIMEOUT_S * 4)
    handle.boot_ok = boot.returncode == 0
    handle.start_apps(after_boot=True)
    return handle


def _prepare_disks(vm_name: str, disks: list[Path], format_disks: bool) -> list[str]:
    """mkfs where allowed and needed; returns "file=mountpoint" for each disk to mount."""
    mounts = []
    for i, disk in enumerate(disks):
        if not disk.is_file():
            raise LabError(f"disk {i} of {vm_name} not found: {disk}")
        if not _has_ext4(disk):
            if not format_disks:
                if i == 0:
                    raise LabError(f"disk 0 of {vm_name} holds no ext4 file system: {disk}")
                continue
            sh(["mkfs.ext4", "-q", "-F", "-L", f"{vm_name}-{i}"[:16], str(disk)],
               timeout=120)
        mountpoint = disk_mountpoint(i)
        _ensure_host_dir(Path(mountpoint))
        mounts.append(f"{disk}={mountpoint}")
    for d in _AGENT_DIRS:
        _ensure_host_dir(Path(d))
    return mounts


def _has_ext4(disk: Path) -> bool:
    with open(disk, "rb") as f:
        f.seek(_EXT4_MAGIC_OFFSET)
        return f.read(2) == b"\x53\xef"


def _ensure_host_dir(path: Path) -> None:
    """An empty mount point on the host's root; marked so the last teardown removes it."""
    if not path.exists():
        path.mkdir(parents=True)
        (path / _MOUNT_MARKER).touch()


def _remove_host_dirs() -> None:
    for path in [*Path("/").glob("data*"), *map(Path, _AGENT_DIRS)]:
        marker = path / _MOUNT_MARKER
        if marker.exists() and not is_mountpoint(path):
            marker.unlink()
            try:
                path.rmdir()
            except OSError:
                pass        # someone put files there: leave it


def _make_mount_ns(cfg: LabConfig, vm_name: str, gdir: Path, mounts: list[str],
                   ip: str, index: int) -> None:
    ensure_private_ns_dir(cfg)
    bin_dir = gdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    shutil.copy2(GUEST_SOURCES / "vmware-rpctool", bin_dir / "vmware-rpctool")
    etc_mysql = gdir / "etc-mysql"
    etc_mysql.mkdir(exist_ok=True)
    (etc_mysql / "my.cnf").write_text(guest_apps.mariadb_config(ip, server_id=index + 1))
    mnt = mntns_path(cfg, vm_name)
    mnt.touch()
    env = {"PATH": GUEST_PATH, "SP_NS_DIR": str(ns_dir(cfg)), "SP_DISKS": " ".join(mounts),
           "SP_BIN_DIR": str(bin_dir), "SP_ETC_MYSQL": str(etc_mysql)}
    sh(["unshare", f"--mount={mnt}", "--propagation", "private", "--",
        str(GUEST_SOURCES / "guest-init")], env=env, timeout=120)


def _write_guestinfo_config(handle: GuestHandle, url: str, ca_cert: Path | None) -> None:
    if ca_cert is None:
        raise LabError("guestinfo_url needs ca_cert: the guest verifies the simulator's TLS")
    if "/lab/guestinfo" not in url:
        url = url.rstrip("/") + "/lab/guestinfo"
    doc = json.dumps({"url": url, "vm": handle.name, "ca_cert": "/run/stillpoint-lab/ca.pem"})
    result = handle.run(["sh", "-c", ("mkdir -p /run/stillpoint-lab && "
                         f"cp '{ca_cert}' /run/stillpoint-lab/ca.pem && "
                         "cat > /run/stillpoint-lab/guestinfo.json")], input=doc)
    if result.returncode != 0:
        raise LabError(f"guestinfo config for {handle.name}: {result.stderr.strip()}")


def stop_guest(cfg: LabConfig, vm_name: str) -> None:
    """Stop one guest and remove all it made (idempotent, works without a handle)."""
    gdir = guest_dir(cfg, vm_name)
    meta = _read_meta(gdir)
    mnt = mntns_path(cfg, vm_name)
    # Thaw anything still frozen first, or stopping, killing and unmounting would hang.
    if is_nsfs(mnt):
        for i in range(len(meta.get("disks", [])) or 1):
            sh(["nsenter", f"--mount={mnt}", "fsfreeze", "-u", disk_mountpoint(i)],
               check=False)
    if is_nsfs(mnt) and cfg.netns(vm_name) in lab_netns(cfg):
        _graceful_stop(cfg, vm_name, meta)
    pids = set(pids_in_ns(netns_path(cfg, vm_name), "net")) | set(pids_in_ns(mnt, "mnt"))
    kill_pids(sorted(pids))
    for _ in range(5):
        if not is_mountpoint(mnt):
            break
        sh(["umount", "-l", str(mnt)], check=False)
    mnt.unlink(missing_ok=True)
    _detach_loops([Path(d) for d in meta.get("disks", [])])
    remove_guest_link(cfg, vm_name, meta.get("index"))
    shutil.rmtree(gdir, ignore_errors=True)


def _read_meta(gdir: Path) -> dict:
    try:
        return json.loads((gdir / "guest.json").read_text())
    except (OSError, ValueError):
        return {}


def _graceful_stop(cfg: LabConfig, vm_name: str, meta: dict) -> None:
    """Shut the databases down cleanly when possible; killing is the fallback."""
    handle = GuestHandle(cfg=cfg, index=meta.get("index", 0), name=vm_name,
                         netns=cfg.netns(vm_name), ip="", ssh_user="",
                         ssh_key_path=Path(), host_key_line="", host_key_sha256="",
                         mntns_path=mntns_path(cfg, vm_name), state_dir=guest_dir(cfg, vm_name),
                         apps=tuple(meta.get("apps", ())))
    try:
        handle.stop_apps()
    except LabError:
        pass


def _detach_loops(disks: list[Path]) -> None:
    """Loop devices of these disks: autoclear frees them when the namespace dies (async)."""
    deadline = time.monotonic() + 10
    while True:
        loops = [line.split(":")[0] for d in disks if d.exists()
                 for line in sh(["losetup", "-j", str(d)], check=False).stdout.splitlines()]
        if not loops:
            return
        if time.monotonic() > deadline:
            for loop in loops:
                sh(["losetup", "-d", loop], check=False)
            return
        time.sleep(0.1)


def teardown_all(cfg: LabConfig) -> None:
    """Remove every guest of lab `cfg.lab_id` and everything they made. Idempotent."""
    prefix = cfg.netns("")
    names = {p.name for p in guests_dir(cfg).glob("*") if p.is_dir()}
    names |= {ns[len(prefix):] for ns in lab_netns(cfg)}
    names |= {p.name[:-4] for p in ns_dir(cfg).glob("*.mnt")}
    for name in sorted(names):
        stop_guest(cfg, name)
    remove_lab_links(cfg)
    for _ in range(5):
        if not is_mountpoint(ns_dir(cfg)):
            break
        sh(["umount", "-l", str(ns_dir(cfg))], check=False)
    shutil.rmtree(ns_dir(cfg), ignore_errors=True)
    shutil.rmtree(guests_dir(cfg), ignore_errors=True)
    last_lab = not guest_ssh.other_labs_active(cfg)
    guest_ssh.remove_user_and_rule(cfg)
    if last_lab:
        _remove_host_dirs()
    shutil.rmtree(guest_ssh.ssh_dir(cfg), ignore_errors=True)
