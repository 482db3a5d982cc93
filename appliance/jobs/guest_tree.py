"""A restore point's files as its guest saw them: a path is looked up on the file system
that the guest's own /etc/fstab mounts there, whichever disk holds it.

    with guest_tree(repo, rp, "/data/probe/blob.bin") as tree:
        files.extract(tree.fs, "/data/probe/blob.bin", dest)
        tree.used            # ["/ = disk 0 partition 1 (UUID=...)", "/data = disk 1 (LABEL=spdata)"]

The root is the first file system (disks in order, partitions in order) that has an
/etc/fstab. Each fstab entry whose mount point is on the way to the path is bind-mounted,
read-only, at its place under the root's mount, so symbolic links resolve as in the guest
(absolute ones from the guest's "/") — only across the mounts on that path: a link into
another mount finds the bare mount point, as in a guest that has not mounted it.
fstab sources understood: UUID=, LABEL=, PARTUUID=, PARTLABEL=, /dev/disk/by-{uuid,label,
partuuid,partlabel}/..., and kernel names of the VM's disks in order (/dev/vdb1, /dev/sdb,
/dev/xvdb, /dev/nvme0n2p1). Other sources (LVM, network, tmpfs) are not on a disk image:
a path below them is refused with the fstab line. A disk is restored only when needed.
No /etc/fstab anywhere (e.g. Windows): the first file system of disk 0, as with --disk 0.

The disks are private copies (files.disk_image), so their file systems are mounted the way
the guest's kernel would mount them after a crash: the journal replayed (a crash-consistent
restore point's newest metadata is only in the journal; `ro,noload` would not show files
made in the last seconds before the snapshot). A file system the kernel refuses to recover
is mounted read-only without replay instead (files.mounted_filesystems' defaults).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import NotFound
from appliance.jobs import files
from appliance.repository import Repository, RestorePoint

NOT_ON_DISK = ("swap", "tmpfs", "proc", "sysfs", "devpts", "devtmpfs", "nfs", "nfs4", "cifs",
               "none", "efivarfs", "bpf", "cgroup", "cgroup2", "fuse", "overlay")
_KERNEL_NAME = re.compile(r"^/dev/(?:(?:[svx]|xv)d([a-z]+)(\d*)|nvme0n(\d+)(?:p(\d+))?)$")


@dataclass(frozen=True)
class FstabEntry:
    source: str
    mount_point: str
    fstype: str


@dataclass
class GuestTree:
    fs: files.MountedFS          # the root file system, with the mounts on the path under it
    used: list[str] = field(default_factory=list)   # "<mount point> = <where>", for the user


def parse_fstab(text: str) -> list[FstabEntry]:
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 3 and fields[1].startswith("/"):
            mp = "/" + "/".join(p for p in fields[1].replace("\\040", " ").split("/") if p)
            out.append(FstabEntry(fields[0], mp, fields[2]))
    return out


def mounts_on_path(entries: list[FstabEntry], path: str) -> list[FstabEntry]:
    """The fstab entries (not "/") whose mount point is `path` or one of its parents,
    outermost first."""
    norm = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
    on = [e for e in entries if e.mount_point != "/" and e.fstype not in NOT_ON_DISK
          and (norm == e.mount_point or norm.startswith(e.mount_point + "/"))]
    return sorted(on, key=lambda e: e.mount_point.count("/"))


def _ids(device: str) -> dict[str, str]:
    got = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True,
                         text=True, check=False)
    ids = dict(line.split("=", 1) for line in got.stdout.splitlines() if "=" in line)
    return {"UUID": ids.get("UUID", ""), "LABEL": ids.get("LABEL", ""),
            "PARTUUID": ids.get("PART_ENTRY_UUID", ""), "PARTLABEL": ids.get("PART_ENTRY_NAME", "")}


def _wanted(source: str) -> tuple[str, str] | tuple[int, int] | None:
    """("UUID", value) / ("LABEL", value) / ... or (disk index, partition) of a source."""
    for key, prefix in (("UUID", "/dev/disk/by-uuid/"), ("LABEL", "/dev/disk/by-label/"),
                        ("PARTUUID", "/dev/disk/by-partuuid/"),
                        ("PARTLABEL", "/dev/disk/by-partlabel/")):
        if source.startswith(key + "="):
            return key, source[len(key) + 1:].strip('"')
        if source.startswith(prefix):
            return key, source[len(prefix):].replace("\\x2f", "/").replace("\\x20", " ")
    m = _KERNEL_NAME.match(source)
    if m is None:
        return None
    if m.group(1) is not None:
        index = 0
        for ch in m.group(1):
            index = index * 26 + (ord(ch) - ord("a") + 1)
        return index - 1, int(m.group(2) or 0)
    return int(m.group(3)) - 1, int(m.group(4) or 0)


def _matches(fs: files.MountedFS, disk_index: int, wanted: tuple[object, object]) -> bool:
    key, value = wanted
    if isinstance(key, int):
        return key == disk_index and value == fs.partition
    have = _ids(fs.device).get(str(key), "")
    if key in ("UUID", "PARTUUID"):
        return bool(value) and have.lower() == str(value).lower()
    return bool(value) and have == value


def _where(disk_index: int, fs: files.MountedFS, source: str) -> str:
    return (f"disk {disk_index}" + (f" partition {fs.partition}" if fs.partition else "")
            + f" ({source})")


@contextmanager
def replayed_filesystems(raw: Path) -> Iterator[list[files.MountedFS]]:
    """The file systems of a private disk copy, journals replayed by the kernel (a writable
    attach); read-only without replay if that fails."""
    try:
        cm = files.mounted_filesystems(raw, writable=True)
        filesystems = cm.__enter__()
    except files.ImageError:
        cm = files.mounted_filesystems(raw)
        filesystems = cm.__enter__()
    try:
        yield filesystems
    finally:
        cm.__exit__(None, None, None)


@contextmanager
def guest_tree(repo: Repository, rp: RestorePoint, path: str) -> Iterator[GuestTree]:
    with ExitStack() as stack:
        attached: dict[int, list[files.MountedFS]] = {}

        def attach(index: int) -> list[files.MountedFS]:
            if index not in attached:
                raw = stack.enter_context(files.disk_image(repo, rp, rp.disks[index].key))
                try:
                    attached[index] = stack.enter_context(replayed_filesystems(raw))
                except files.ImageError:
                    attached[index] = []
            return attached[index]

        root: tuple[int, files.MountedFS] | None = None
        for index in range(len(rp.disks)):
            fs = next((f for f in attach(index) if (f.root / "etc" / "fstab").is_file()), None)
            if fs is not None:
                root = (index, fs)
                break
        if root is None:
            first = attach(0)
            if not first:
                raise files.ImageError("no file system found on disk 0")
            yield GuestTree(first[0], ["/ = disk 0 (no /etc/fstab in the image)"])
            return
        root_index, root_fs = root
        tree = GuestTree(root_fs, [f"/ = {_where(root_index, root_fs, 'its /etc/fstab')}"])
        entries = parse_fstab((root_fs.root / "etc" / "fstab").read_text(errors="replace"))
        for entry in mounts_on_path(entries, path):
            wanted = _wanted(entry.source)
            if wanted is None:
                raise NotFound(f"{path}: the guest mounts {entry.mount_point} from "
                               f"{entry.source} ({entry.fstype}), which is not a file system "
                               "on the restore point's disks; use --disk/--partition")
            found = None
            for index in [root_index] + [i for i in range(len(rp.disks)) if i != root_index]:
                found = next(((index, f) for f in attach(index)
                              if _matches(f, index, wanted)), None)
                if found is not None:
                    break
            if found is None:
                raise NotFound(f"{path}: the guest mounts {entry.mount_point} from "
                               f"{entry.source}, found on none of the restore point's "
                               f"{len(rp.disks)} disk(s)")
            index, fs = found
            target = files.resolve_inside(root_fs.root, entry.mount_point)
            if not target.is_dir():
                raise NotFound(f"{path}: mount point {entry.mount_point} is not a directory "
                               "in the image's root file system")
            _bind(stack, fs.root, target)
            tree.used.append(f"{entry.mount_point} = {_where(index, fs, entry.source)}")
        yield tree


def _bind(stack: ExitStack, source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True,
                   capture_output=True)
    stack.callback(subprocess.run, ["umount", str(target)], capture_output=True, check=False)
    subprocess.run(["mount", "-o", "remount,bind,ro,nodev,nosuid,noexec", str(target)],
                   check=True, capture_output=True)
