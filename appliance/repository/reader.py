"""Reading restore points back: block maps, verified block streams, raw and VMDK restore."""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from appliance.errors import IntegrityError, StillpointError, StorageFull, UsageError
from appliance.repository import format as F
from appliance.repository.chunkstore import ChunkStore
from appliance.repository.restorepoint import DiskRecord, RestorePoint

PREFETCH = 16


def load_map(store: ChunkStore, rp: RestorePoint, disk: DiskRecord) -> bytes:
    parts = [store.read(cid, f"restore point {rp.id} disk {disk.key} block map")
             for cid in disk.map_chunks]
    blockmap = b"".join(parts)
    need = disk.blocks * F.MAP_ENTRY
    if len(blockmap) < need:
        raise IntegrityError(f"restore point {rp.id} disk {disk.key}: block map too short")
    return blockmap[:need]


def block_reader(store: ChunkStore, rp: RestorePoint,
                 disk: DiskRecord) -> Callable[[int], bytes]:
    """A function giving the (verified) bytes of one block by index, zeros for a hole; the
    block map is read once."""
    blockmap = load_map(store, rp, disk)
    bs = disk.block_size

    def block(index: int) -> bytes:
        if not 0 <= index < disk.blocks:
            raise IndexError(f"disk {disk.key} has {disk.blocks} blocks, not {index + 1}")
        offset = index * bs
        want = min(bs, disk.capacity - offset)
        cid = blockmap[index * F.MAP_ENTRY:(index + 1) * F.MAP_ENTRY]
        if cid == F.HOLE_ID:
            return bytes(want)
        data = store.read(cid, f"restore point {rp.id} disk {disk.key} offset {offset}")
        if len(data) != want:
            raise IntegrityError(f"restore point {rp.id} disk {disk.key} offset {offset}: "
                                 f"block is {len(data)} bytes, expected {want}")
        return data

    return block


def read_disk(store: ChunkStore, rp: RestorePoint, disk: DiskRecord,
              workers: int = 4) -> Iterator[tuple[int, bytes | None]]:
    """(offset, data) for every block in order; data is None for a hole. Each chunk is
    verified; a bad one raises IntegrityError naming restore point, disk and offset."""
    blockmap = load_map(store, rp, disk)
    bs = disk.block_size

    def fetch(blk: int, cid: bytes) -> bytes:
        offset = blk * bs
        data = store.read(cid, f"restore point {rp.id} disk {disk.key} offset {offset}")
        want = min(bs, disk.capacity - offset)
        if len(data) != want:
            raise IntegrityError(f"restore point {rp.id} disk {disk.key} offset {offset}: "
                                 f"block is {len(data)} bytes, expected {want}")
        return data

    pool = ThreadPoolExecutor(workers, thread_name_prefix="stillpoint-read")
    window: deque[tuple[int, Future[bytes] | None]] = deque()
    try:
        for blk in range(disk.blocks):
            cid = blockmap[blk * F.MAP_ENTRY:(blk + 1) * F.MAP_ENTRY]
            window.append((blk, None if cid == F.HOLE_ID else pool.submit(fetch, blk, cid)))
            if len(window) >= PREFETCH:
                b, fut = window.popleft()
                yield b * bs, None if fut is None else fut.result()
        while window:
            b, fut = window.popleft()
            yield b * bs, None if fut is None else fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_sparse(store: ChunkStore, rp: RestorePoint, disk: DiskRecord, path: Path,
                  truncate: bool = True) -> None:
    """Write the disk's data to `path`; a new file stays sparse where the disk has holes, a
    device (truncate=False) gets zeros written there."""
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if truncate else 0), 0o600)
    try:
        for offset, data in read_disk(store, rp, disk):
            if data is None:
                if truncate:
                    continue  # a hole stays a hole: the final truncate reads it as zeros
                data = bytes(min(disk.block_size, disk.capacity - offset))
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        if truncate:
            os.ftruncate(fd, disk.capacity)
        os.fsync(fd)
    finally:
        os.close(fd)


def _vmdk_descriptor(flat_name: str, capacity: int) -> str:
    sectors = capacity // 512
    heads, spt = 255, 63
    cylinders = max(1, min(65535, sectors // (heads * spt)))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "encoding=\"UTF-8\"\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        "createType=\"monolithicFlat\"\n\n"
        "# Extent description\n"
        f"RW {sectors} FLAT \"{flat_name}\" 0\n\n"
        "# The Disk Data Base\n"
        "#DDB\n\n"
        "ddb.adapterType = \"lsilogic\"\n"
        f"ddb.geometry.cylinders = \"{cylinders}\"\n"
        f"ddb.geometry.heads = \"{heads}\"\n"
        f"ddb.geometry.sectors = \"{spt}\"\n"
        "ddb.virtualHWVersion = \"14\"\n"
    )


def restore_disk_to(store: ChunkStore, rp: RestorePoint, disk: DiskRecord,
                    path: str | os.PathLike[str], format: str = "raw") -> list[Path]:
    """Write the disk to `path`: a sparse raw image, or with format="vmdk" a
    monolithicFlat descriptor at `path` plus `<stem>-flat.vmdk` beside it.

    Files are written under temporary names and renamed only once complete, so a failed or
    interrupted restore leaves nothing at `path` (and a rerun is not refused); an existing
    block device is written in place."""
    if format not in ("raw", "vmdk"):
        raise UsageError(f"unknown disk format {format!r} (raw or vmdk)")
    target = Path(path)
    if format == "vmdk" and disk.capacity % 512:
        raise UsageError(f"disk {disk.key}: capacity is not a multiple of 512 bytes")
    if format == "raw" and target.exists() and not target.is_file():
        _write_in_place(store, rp, disk, target)
        return [target]
    finals = [target] if format == "raw" else [target.with_name(target.stem + "-flat.vmdk"),
                                               target]
    partials = [_partial_name(f) for f in finals]
    try:
        _write_sparse(store, rp, disk, partials[0])
        if format == "vmdk":
            _write_small(partials[1], _vmdk_descriptor(finals[0].name, disk.capacity))
        for partial, final in zip(partials, finals):
            os.replace(partial, final)
        _fsync_dir(target.parent)
        return [target] if format == "raw" else [target, finals[0]]
    except OSError as err:
        _remove(partials)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"restore to {target}: no space left") from err
        raise StillpointError(f"restore to {target} failed: {err}") from err
    except BaseException:
        _remove(partials)
        raise


def _write_in_place(store: ChunkStore, rp: RestorePoint, disk: DiskRecord,
                    target: Path) -> None:
    try:
        _write_sparse(store, rp, disk, target, truncate=False)
    except OSError as err:
        raise StillpointError(f"restore to {target} failed: {err}") from err


def _partial_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def _write_small(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


