"""A datastore disk of a QEMU-backed VM, and what `qemu-img` does to it offline.

    <ds>/<vm>/<name>-flat.vmdk           raw disk bytes: what /folder/ serves, the guest writes
    <ds>/<vm>/<name>-flat.vmdk.qcow2     metadata-only qcow2 over it (data_file=<flat>,
                                         data_file_raw=on): the persistent dirty bitmaps
    <ds>/<vm>/<name>-000001-delta.qcow2  while a snapshot exists: the writes since it
                                         (backing file: the metadata qcow2)

Pitfall (LAB-QEMU §2): `qemu-img create -o data_file=EXISTING` truncates EXISTING. The
metadata qcow2 is therefore created over a throw-away data file and then pointed at the
flat with `qemu-img amend -o data_file=<absolute path>` (a relative path would resolve
against the cwd of whoever opens it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU_IMG = "qemu-img"
META_SUFFIX = ".qcow2"
_FLAT_SUFFIX = "-flat.vmdk"


class DiskError(Exception):
    """A qemu-img operation or a disk file check failed."""


@dataclass(frozen=True)
class DiskFiles:
    """The files of one virtual disk (`key`: the vSphere device key, e.g. 2000)."""

    key: int
    flat: Path

    @property
    def meta(self) -> Path:
        return meta_path(self.flat)

    def delta(self, n: int = 1) -> Path:
        return delta_path(self.flat, n)


def meta_path(flat: str | Path) -> Path:
    return Path(str(Path(flat).absolute()) + META_SUFFIX)


def delta_path(flat: str | Path, n: int = 1) -> Path:
    """`<dir>/<name>-00000N-delta.qcow2` for `<dir>/<name>-flat.vmdk` (VMware's naming)."""
    flat = Path(flat).absolute()
    name = flat.name
    stem = name[: -len(_FLAT_SUFFIX)] if name.endswith(_FLAT_SUFFIX) else flat.stem
    return flat.with_name(f"{stem}-{n:06d}-delta.qcow2")


def qemu_img(*args: str, timeout: float = 600) -> str:
    argv = [QEMU_IMG, *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DiskError(f"{' '.join(argv)}: {err}") from err
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(argv)} failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def create_flat(flat: str | Path, capacity_bytes: int) -> Path:
    """A sparse raw flat file of `capacity_bytes` (an existing one is left alone)."""
    flat = Path(flat).absolute()
    if not flat.exists():
        flat.parent.mkdir(parents=True, exist_ok=True)
        with open(flat, "xb") as f:
            f.truncate(capacity_bytes)
    return flat


def ensure_meta(flat: str | Path) -> Path:
    """The metadata qcow2 of an existing flat file, created if missing, never touching
    the flat's bytes; an existing one must describe this flat (size, data file)."""
    flat = Path(flat).absolute()
    if not flat.is_file():
        raise DiskError(f"no flat disk file {flat}")
    meta = meta_path(flat)
    size = flat.stat().st_size
    if meta.exists():
        info = image_info(meta)
        spec = info.get("format-specific", {}).get("data", {})
        if info.get("virtual-size") != size or spec.get("data-file") != str(flat):
            raise DiskError(f"{meta} does not describe {flat} "
                            f"(size {info.get('virtual-size')} vs {size}, "
                            f"data file {spec.get('data-file')!r})")
        return meta
    if size % 512:
        raise DiskError(f"{flat}: size {size} is not a multiple of 512")
    tmp = meta.with_name(meta.name + ".tmp")
    dummy = meta.with_name(meta.name + ".dummy-data")
    for p in (tmp, dummy):
        p.unlink(missing_ok=True)
    try:
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"data_file={_opt(dummy)},data_file_raw=on", str(tmp), str(size))
        qemu_img("amend", "-q", "-o", f"data_file={_opt(flat)}", str(tmp))
        os.replace(tmp, meta)
    finally:
        tmp.unlink(missing_ok=True)
        dummy.unlink(missing_ok=True)
    return meta


def _opt(path: Path) -> str:
    """A path as a qemu-img -o value (commas doubled)."""
    return str(path).replace(",", ",,")


def image_info(path: str | Path, *, backing_chain: bool = False) -> dict[str, Any]:
    """`qemu-img info --output=json -U` (also while QEMU has the image open)."""
    args = ["info", "--output=json", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    out = json.loads(qemu_img(*args, str(path)))
    return out[0] if backing_chain and isinstance(out, list) and out else dict(out)


def bitmaps_offline(meta: str | Path) -> list[dict[str, Any]]:
    """The persistent bitmaps of a qcow2 (name, granularity, flags such as "in-use" = not
    closed cleanly, "auto" = enabled), from its header: no QEMU needed."""
    info = image_info(meta)
    return list(info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def remove_bitmaps_offline(meta: str | Path, names: list[str]) -> None:
    for name in names:
        qemu_img("bitmap", "--remove", str(meta), name)


def commit_offline(delta: str | Path) -> None:
    """`qemu-img commit`: the delta's data into its backing image (the metadata qcow2, so
    the flat file), with the VM powered off. The base's enabled bitmaps record it.
    The delta file stays (emptied); the caller deletes it."""
    qemu_img("commit", "-q", "-f", "qcow2", str(delta), timeout=3600)


def create_delta_offline(delta: str | Path, meta: str | Path) -> None:
    """A new, empty delta over the metadata qcow2 (a snapshot of a powered-off disk)."""
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(Path(meta).absolute()),
             str(delta))


def backing_of(delta: str | Path) -> str | None:
    info = image_info(delta)
    return info.get("full-backing-filename") or info.get("backing-filename")


def file_stamp(path: str | Path) -> list[int]:
    """(inode, size, mtime ns) of a file: whether a flat changed while its VM was off."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def valid_node_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", name))
