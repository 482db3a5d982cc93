"""Reading restore points back: block maps, verified block streams, raw and VMDK restore."""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterator
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


def _write_sparse(store: ChunkStore, rp: RestorePoint, disk: DiskRecord, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, 0)
        for offset, data in read_disk(store, rp, disk):
            if data is None:
                continue  # a hole stays a hole: the final truncate makes it read as zeros
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
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
    monolithicFlat descriptor at `path` plus `<stem>-flat.vmdk` beside it."""
    target = Path(path)
    try:
        if format == "raw":
            _write_sparse(store, rp, disk, target)
            return [target]
        if format == "vmdk":
            if disk.capacity % 512:
                raise UsageError(f"disk {disk.key}: capacity is not a multiple of 512 bytes")
            flat = target.with_name(target.stem + "-flat.vmdk")
            _write_sparse(store, rp, disk, flat)
            target.write_text(_vmdk_descriptor(flat.name, disk.capacity))
            return [target, flat]
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"restore to {target}: no space left") from err
        raise StillpointError(f"restore to {target} failed: {err}") from err
    raise UsageError(f"unknown disk format {format!r} (raw or vmdk)")
