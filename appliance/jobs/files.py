"""File-level restore: browse and extract files of a restore point without restoring the VM.

    with disk_image(repo, rp, disk_key) as raw:          # sparse raw file, verified chunks
        with mounted_filesystems(raw) as filesystems:    # loop -r -P, kernel ro mounts
            fs = pick_filesystem(filesystems, partition)
            target = resolve_inside(fs.root, "/etc/hostname")

The file systems are read by the kernel's own drivers (ext2/3/4 with `ro,noload`: no
journal replay; xfs with `ro,norecovery`; vfat, ntfs3/ntfs where the kernel has them),
never by a parser of ours. Partitions come from `losetup -P`. LVM physical volumes are
recognised but refused: LVM needs device-mapper (state this; do not guess).
Everything made is undone in `finally`: unmount, detach the loop device, delete the image.

Paths from the user are resolved like a chroot would: `..` in the request is refused,
symlinks are followed with the image's root as "/", and a link that would leave the root
is refused with a clear error (PathEscapes).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.errors import NotFound, StillpointError, UsageError
from appliance.repository import Repository, RestorePoint

__all__ = [
    "Entry", "MountedFS", "PathEscapes", "disk_image", "extract", "list_dir",
    "mounted_filesystems", "open_filesystem", "pick_filesystem", "resolve_inside",
]

MAX_SYMLINKS = 40
_MOUNT_OPTIONS = {
    "ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery",
    "vfat": "ro", "ntfs": "ro", "ntfs3": "ro", "btrfs": "ro,nologreplay",
}


class PathEscapes(UsageError):
    """The path leaves the image's root."""


class ImageError(StillpointError):
    """The disk image could not be attached or mounted."""

    exit_code = 1


@dataclass(frozen=True)
class MountedFS:
    device: str
    partition: int          # 0 = the whole disk, else the partition number
    fstype: str
    root: Path


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str               # file, dir, link, other
    size: int
    mode: str
    mtime: str
    target: str | None = None


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImageError(f"{what}: {err}") from err
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


@contextmanager
def disk_image(repo: Repository, rp: str | RestorePoint, disk_key: int,
               workdir: Path | None = None) -> Iterator[Path]:
    """The disk restored to a private sparse raw file (deleted afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="stillpoint-img-", dir=workdir))
    os.chmod(tmp, 0o700)
    try:
        path = tmp / "disk.raw"
        repo.restore_disk_to(rp, disk_key, path)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _blkid_type(device: str) -> str:
    proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip()


@contextmanager
def mounted_filesystems(image: Path, *, writable: bool = False) -> Iterator[list[MountedFS]]:
    """Every file system of the image, mounted (read-only unless `writable`, which is only
    for the appliance's own private copies)."""
    if os.geteuid() != 0:
        raise ImageError("mounting a disk image needs root (loop devices)")
    loop = _run(["losetup", "--find", "--show", "--partscan",
                 *([] if writable else ["--read-only"]), str(image)], "losetup").strip()
    mnt_base = Path(tempfile.mkdtemp(prefix="stillpoint-mnt-"))
    # Traversable (not listable) by others: a sandbox runs as the image's own database
    # user (restore_db); what is visible below is governed by the image's permissions.
    os.chmod(mnt_base, 0o711)
    mounted: list[MountedFS] = []
    made_nodes: list[Path] = []
    try:
        devices = [(0, loop)] + _partitions(loop, made_nodes)
        refused = []
        for number, dev in devices:
            fstype = _blkid_type(dev)
            if fstype == "LVM2_member":
                refused.append(f"{dev} is an LVM physical volume (needs device-mapper, "
                               "which this system lacks)")
                continue
            if fstype not in _MOUNT_OPTIONS:
                continue
            target = mnt_base / str(number)
            target.mkdir()
            opts = _MOUNT_OPTIONS[fstype]
            if writable:
                opts = "rw"
            _run(["mount", "-t", fstype, "-o", f"{opts},nodev,nosuid,noexec", dev, str(target)],
                 f"mounting {dev} ({fstype})")
            mounted.append(MountedFS(dev, number, fstype, target))
        if not mounted:
            raise ImageError("no file system found on the disk"
                             + (": " + "; ".join(refused) if refused else ""))
        yield mounted
    finally:
        for fs in reversed(mounted):
            subprocess.run(["umount", str(fs.root)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        for node in made_nodes:
            node.unlink(missing_ok=True)
        shutil.rmtree(mnt_base, ignore_errors=True)


def _partitions(loop: str, made: list[Path]) -> list[tuple[int, str]]:
    """(number, device) of each partition of `loop`. `losetup --partscan` leaves none on
    some kernels (seen on the lab's: a Debian disk's MBR partition was not scanned), so
    `partx --add` asks again, and a node that udev did not make is made from sysfs."""
    name = Path(loop).name

    def scan() -> list[Path]:
        return sorted(Path("/sys/block", name).glob(f"{name}p*"))

    found = scan()
    if not found:
        subprocess.run(["partx", "--add", loop], capture_output=True, check=False)
        found = scan()
    parts = []
    for sys_part in found:
        dev = Path("/dev", sys_part.name)
        if not dev.exists():
            major, minor = (int(x) for x in (sys_part / "dev").read_text().split(":"))
            os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
            made.append(dev)
        parts.append((int(sys_part.name.rsplit("p", 1)[1]), str(dev)))
    return sorted(parts)


def pick_filesystem(filesystems: list[MountedFS], partition: int | None) -> MountedFS:
    if partition is None:
        return filesystems[0]
    for fs in filesystems:
        if fs.partition == partition:
            return fs
    raise NotFound(f"no mountable file system on partition {partition} (found: "
                   + ", ".join(f"{f.partition} ({f.fstype})" for f in filesystems) + ")")


@contextmanager
def open_filesystem(repo: Repository, rp: str | RestorePoint, disk_key: int,
                    partition: int | None = None) -> Iterator[MountedFS]:
    with disk_image(repo, rp, disk_key) as raw, mounted_filesystems(raw) as filesystems:
        yield pick_filesystem(filesystems, partition)


def resolve_inside(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """`path` inside the image rooted at `root`, symlinks resolved with `root` as "/"."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PathEscapes(f"{path}: '..' is not allowed in a path inside a restore point")
    resolved: list[str] = []
    links = 0
    pending = list(parts)
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise PathEscapes(f"{path}: a symbolic link leads outside the image's root")
            resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and (pending or follow_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise UsageError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []      # absolute links are relative to the IMAGE's root
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved.append(part)
    final = root.joinpath(*resolved)
    # Belt and braces: whatever the walk did, the result must be under the root.
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(final) if follow_last else
                           os.path.realpath(final.parent)]) != real_root:
        raise PathEscapes(f"{path}: resolves outside the image's root")
    return final


def _entry(path: Path) -> Entry:
    st = path.lstat()
    kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
            else "file" if stat.S_ISREG(st.st_mode) else "other")
    return Entry(name=path.name, kind=kind, size=st.st_size, mode=stat.filemode(st.st_mode),
                 mtime=datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds"),
                 target=os.readlink(path) if kind == "link" else None)


def list_dir(fs: MountedFS, path: str) -> list[Entry]:
    """The entries of a directory (or the one entry of a file) in the image."""
    target = resolve_inside(fs.root, path)
    if not target.exists() and not target.is_symlink():
        raise NotFound(f"{path}: no such file or directory in the restore point")
    if target.is_dir():
        return [_entry(p) for p in sorted(target.iterdir(), key=lambda p: p.name)]
    return [_entry(target)]


def extract(fs: MountedFS, path: str, dest_dir: Path) -> list[Path]:
    """Copy a file or a directory tree out of the image into `dest_dir` (symlinks inside a
    tree are copied as links, never followed); returns what was written."""
    source = resolve_inside(fs.root, path)
    if not source.exists():
        raise NotFound(f"{path}: no such file or directory in the restore point")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / (source.name or "root")
    if target.exists() or target.is_symlink():
        raise UsageError(f"{target} exists: choose another --to directory")
    written: list[Path] = []
    try:
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True,
                            copy_function=lambda s, d: written.append(Path(shutil.copy2(s, d))))
        else:
            written.append(Path(shutil.copy2(source, target)))
    except OSError as err:
        raise StillpointError(f"extracting {path}: {err}") from err
    return written
