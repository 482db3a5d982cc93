"""Namespaces of a lab guest: paths, entering them, and finding what lives in them.

A guest is a network namespace (`ip netns`, file /run/netns/<name>) plus a mount namespace
persisted by bind-mounting its nsfs file onto `<state_dir>/ns/<vm>.mnt`. That directory is
bind-mounted onto itself and made private, like /run/netns, because the kernel refuses to
bind an nsfs file onto a shared mount.

Every process that enters a guest must join BOTH namespaces (`nsenter_argv`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from appliance.errors import LabError
from stillpoint_lab.config import LabConfig

NETNS_DIR = Path("/run/netns")


def guests_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "guests"


def guest_dir(cfg: LabConfig, vm_name: str) -> Path:
    return guests_dir(cfg) / vm_name


def ns_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "ns"


def mntns_path(cfg: LabConfig, vm_name: str) -> Path:
    return ns_dir(cfg) / f"{vm_name}.mnt"


def netns_path(cfg: LabConfig, vm_name: str) -> Path:
    return NETNS_DIR / cfg.netns(vm_name)


def nsenter_argv(cfg: LabConfig, vm_name: str) -> list[str]:
    return ["nsenter", f"--net={netns_path(cfg, vm_name)}",
            f"--mount={mntns_path(cfg, vm_name)}", "--"]


def sh(argv: list[str], *, check: bool = True, input: str | None = None,
       timeout: float = 60, env: dict[str, str] | None = None,
       ) -> subprocess.CompletedProcess[str]:
    """Run a host command; failures become LabError with the command's stderr."""
    try:
        proc = subprocess.run(argv, check=False, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LabError(f"{argv[0]} failed: {err}") from err
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def mountpoints() -> list[str]:
    """Mount points of the host's mount namespace, innermost (deepest) last."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            points.append(line.split()[4].replace("\\040", " "))
    return points


def is_mountpoint(path: Path) -> bool:
    return str(path) in mountpoints()


def ensure_private_ns_dir(cfg: LabConfig) -> Path:
    path = ns_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    if not is_mountpoint(path):
        sh(["mount", "--bind", str(path), str(path)])
    sh(["mount", "--make-private", str(path)])
    return path


def ns_inode(path: Path) -> tuple[int, int] | None:
    """(dev, ino) identifying a namespace file, or None when it names no namespace."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_ns(ns_file: Path, kind: str) -> list[int]:
    """PIDs whose `kind` (net, mnt) namespace is the one bound at `ns_file`."""
    target = ns_inode(ns_file)
    if target is None or not is_nsfs(ns_file):
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if ns_inode(Path(f"/proc/{entry}/ns/{kind}")) == target:
            found.append(int(entry))
    return found


def is_nsfs(path: Path) -> bool:
    """True when `path` is a bind of a namespace (nsfs) rather than the empty placeholder."""
    return _fs_type(path) == "nsfs"


def _fs_type(path: Path) -> str:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                sep = fields.index("-")
                return fields[sep + 1]
    return ""


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if alive(p)]
            if not pids:
                return
            time.sleep(0.1)
    if pids:
        raise LabError(f"processes would not die: {pids}")


def alive(pid: int) -> bool:
    """Running (a zombie is not: it only waits for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
