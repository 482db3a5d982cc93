"""Writing one restore point: `RestorePointWriter` (holds the lock) and `DiskWriter`.

Data flow: `DiskWriter.write` cuts the caller's extents into fixed blocks aligned to disk
offsets. Whole blocks go straight to a thread pool (zero test, keyed hash, zstd, AES-GCM
all release the GIL) through a bounded semaphore, so memory stays bounded. Partly
written blocks are assembled in a small buffer that starts as the block's current content
(the base restore point's block: read-modify-write) and is flushed once the caller has
moved past it (CBT areas arrive in ascending order), or at `finish`.

Every block's newest submission wins (a sequence number per block), so overlapping
writes behave like writes to a disk.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from appliance.errors import UsageError
from appliance.repository import format as F
from appliance.repository.chunkstore import WriteSession
from appliance.repository.lock import Lock
from appliance.repository.restorepoint import DiskRecord, RestorePoint, VmRef, WriteStats

if TYPE_CHECKING:
    from appliance.repository.repository import Repository

log = logging.getLogger(__name__)

MAX_PENDING_BLOCKS = 16


class DiskWriter:
    """One disk of the restore point being written. Use via `RestorePointWriter.disk`."""

    def __init__(self, rpw: RestorePointWriter, key: int, label: str, capacity: int,
                 base: tuple[RestorePoint, DiskRecord] | None) -> None:
        if capacity <= 0:
            raise UsageError(f"disk {key}: capacity must be positive")
        self.rpw = rpw
        self.key = key
        self.label = label
        self.capacity = capacity
        self.bs = rpw.repo.chunk_size
        self.nblocks = -(-capacity // self.bs)
        self.map = bytearray(self.nblocks * F.MAP_ENTRY)
        self.stats = WriteStats()
        self.record: DiskRecord | None = None
        self._what = f"disk {key} ({label})"
        self._pending: dict[int, bytearray] = {}
        self._latest: dict[int, int] = {}
        self._futures: dict[int, Future[None]] = {}
        self._touched = bytearray(-(-self.nblocks // 8))  # bitmap: blocks written now
        self._has_base = base is not None
        if base is not None:
            base_rp, base_disk = base
            base_map = rpw.repo.block_map(base_rp, base_disk)
            n = min(len(base_map), len(self.map))
            self.map[:n] = base_map[:n]
            # The block at the smaller of the two ends changes length when the disk was
            # grown or shrunk: rewrite it at its new length (zero-padded or cut).
            edge = min(base_disk.capacity, capacity)
            blk = (edge - 1) // self.bs
            if min(base_disk.capacity - blk * self.bs, self.bs) != self._blen(blk):
                self._pending[blk] = self._current(blk)

    def _blen(self, blk: int) -> int:
        return min(self.bs, self.capacity - blk * self.bs)

    def _current(self, blk: int) -> bytearray:
        """The block's content as of now (waits for an in-flight write of it)."""
        with self.rpw._lock:
            fut = self._futures.get(blk)
        if fut is not None:
            fut.result()
        blen = self._blen(blk)
        cid = bytes(self.map[blk * F.MAP_ENTRY:(blk + 1) * F.MAP_ENTRY])
        buf = bytearray(blen)
        if cid != F.HOLE_ID:
            data = self.rpw.session.read(cid, f"{self._what} offset {blk * self.bs}")
            n = min(len(data), blen)
            buf[:n] = memoryview(data)[:n]
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write an extent at a disk offset; offset and length multiples of 512 bytes
        (the length may end at the capacity instead). Any alignment to the block size:
        partly written blocks are completed from the base (read-modify-write)."""
        if self.record is not None:
            raise UsageError(f"{self._what}: write after finish")
        self.rpw._raise_worker_error()
        mv = memoryview(data).cast("B")
        if not mv.readonly:
            mv = memoryview(bytes(mv))  # the caller may reuse its buffer: keep our own copy
        n = len(mv)
        end = offset + n
        if offset < 0 or offset % F.WRITE_ALIGN or end > self.capacity or (
                n % F.WRITE_ALIGN and end != self.capacity):
            raise UsageError(f"{self._what}: write of {n} bytes at {offset} is not "
                             f"{F.WRITE_ALIGN}-aligned or exceeds the capacity {self.capacity}")
        if not n:
            return
        self.stats.bytes_in += n
        first = offset // self.bs
        for blk in sorted(b for b in self._pending if b < first):
            self._flush(blk)
        pos = 0
        while pos < n:
            at = offset + pos
            blk = at // self.bs
            inner = at - blk * self.bs
            blen = self._blen(blk)
            take = min(blen - inner, n - pos)
            piece = mv[pos:pos + take]
            self._touched[blk >> 3] |= 1 << (blk & 7)
            if take == blen:
                self._pending.pop(blk, None)
                self._submit(blk, piece)
            else:
                buf = self._pending.get(blk)
                if buf is None:
                    buf = self._pending[blk] = self._current(blk)
                buf[inner:inner + take] = piece
            pos += take
        while len(self._pending) > MAX_PENDING_BLOCKS:
            self._flush(min(self._pending))

    def _flush(self, blk: int) -> None:
        buf = self._pending.pop(blk)
        self._submit(blk, memoryview(bytes(buf)))

    def _submit(self, blk: int, piece: memoryview) -> None:
        rpw = self.rpw
        rpw._slots.acquire()
        seq = next(rpw._seq)
        with rpw._lock:
            self._latest[blk] = seq
        try:
            fut = rpw._pool.submit(self._work, blk, seq, piece)
        except BaseException:
            rpw._slots.release()
            raise
        with rpw._lock:
            self._futures[blk] = fut
        fut.add_done_callback(rpw._done)
        fut.add_done_callback(lambda f: self._forget(blk, f))

    def _forget(self, blk: int, fut: Future[None]) -> None:
        # Drop bookkeeping of finished blocks: a 2 TiB disk has two million of them.
        with self.rpw._lock:
            if self._futures.get(blk) is fut:
                del self._futures[blk]

    def _work(self, blk: int, seq: int, piece: memoryview) -> None:
        rpw = self.rpw
        # Zero test by id: hashing releases the GIL, comparing memoryviews does not.
        cid = rpw.repo.keys.chunk_id(piece)
        if cid == rpw._zero_id(len(piece)):
            cid, new, hole = F.HOLE_ID, 0, True
        else:
            new, hole = rpw.session.put(cid, piece), False
        with rpw._lock:
            if self._latest.get(blk) == seq:
                self.map[blk * F.MAP_ENTRY:(blk + 1) * F.MAP_ENTRY] = cid
                del self._latest[blk]
            self.stats.blocks_written += 1
            if hole:
                self.stats.blocks_hole += 1
            elif new:
                self.stats.blocks_new += 1
                self.stats.bytes_new_raw += len(piece)
                self.stats.bytes_written_new += new
            else:
                self.stats.blocks_dedup += 1

    def finish(self, change_id: str | None = None) -> DiskRecord:
        """Flush, wait for this disk's blocks, store its block map; returns its record."""
        if self.record is not None:
            return self.record
        for blk in sorted(self._pending):
            self._flush(blk)
        with self.rpw._lock:
            inflight = list(self._futures.values())
        for fut in inflight:
            fut.result()
        self.rpw._raise_worker_error()
        if self._has_base:
            written = int.from_bytes(self._touched, "little").bit_count()
            self.stats.blocks_inherited = self.nblocks - written
        map_chunks = []
        seg = self.bs
        view = memoryview(bytes(self.map))
        for start in range(0, len(view), seg):
            part = view[start:start + seg]
            cid = self.rpw.repo.keys.chunk_id(part)
            self.rpw.session.put(cid, part)
            map_chunks.append(cid)
        self.record = DiskRecord(self.key, self.label, self.capacity, change_id, self.bs,
                                 map_chunks, self.stats)
        return self.record


class RestorePointWriter:
    """Writes one restore point; holds the repository lock from creation to close.

    with repo.writer("vm1", moref="vm-42", uuid="...") as rp:
        d = rp.disk(2000, "Hard disk 1", capacity, base=previous_id)
        d.write(offset, data); ...
        d.finish(change_id="52 de ... /17")
        result = rp.commit(consistency="application", reasons=[...], metadata={...})

    Leaving the block without commit (or with an exception) leaves no restore point; the
    packs already written are unreferenced and removed by the next prune.
    """

    def __init__(self, repo: Repository, vm: VmRef, time: datetime | None,
                 workers: int | None) -> None:
        self.repo = repo
        self.vm = vm
        self.time = time or datetime.now(UTC)
        self.disks: list[DiskWriter] = []
        self.committed: RestorePoint | None = None
        self._lock_obj = Lock(repo.backend)
        self._lock_obj.acquire()
        try:
            repo.store.reload()  # dedup only against chunks that exist now, under the lock
        except BaseException:
            self._lock_obj.release()
            raise
        self.session = WriteSession(repo.store, repo.pack_size)
        nworkers = workers or min(8, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(nworkers, thread_name_prefix="stillpoint-chunk")
        self._slots = threading.BoundedSemaphore(nworkers * 2)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._zero_ids: dict[int, bytes] = {}
        self._closed = False

    def _done(self, fut: Future[None]) -> None:
        self._slots.release()
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            with self._lock:
                self._errors.append(exc)

    def _zero_id(self, length: int) -> bytes:
        zid = self._zero_ids.get(length)
        if zid is None:
            zid = self._zero_ids[length] = self.repo.keys.chunk_id(bytes(length))
        return zid

    def _raise_worker_error(self) -> None:
        with self._lock:
            if self._errors:
                raise self._errors[0]

    def disk(self, key: int, label: str, capacity: int, base: str | None = None) -> DiskWriter:
        """A disk of this restore point; `base` is the previous restore point (id or unique
        prefix) whose disk `key` unwritten blocks inherit from (None: holes)."""
        if any(d.key == key for d in self.disks):
            raise UsageError(f"disk {key} added twice")
        base_pair = None
        if base is not None:
            base_rp = self.repo.get(base)
            base_pair = (base_rp, base_rp.disk(key))
        d = DiskWriter(self, key, label, capacity, base_pair)
        self.disks.append(d)
        return d

    def commit(self, consistency: str, reasons: list[str] | tuple[str, ...] = (),
               metadata: dict[str, Any] | None = None) -> RestorePoint:
        """Make the restore point visible: packs and index durable first, then its object."""
        if self.committed is not None:
            raise UsageError("restore point already committed")
        if consistency not in F.CONSISTENCY_LEVELS:
            raise UsageError(f"consistency must be one of {F.CONSISTENCY_LEVELS}")
        unfinished = [d.key for d in self.disks if d.record is None]
        if unfinished:
            raise UsageError(f"disks not finished: {unfinished}")
        self._raise_worker_error()
        self.session.finish()
        stats = WriteStats()
        for d in self.disks:
            stats.add(d.stats)
        stats.bytes_written_new = self.session.stats.bytes_written_new
        rp = RestorePoint(
            id=secrets.token_hex(16), vm=self.vm, time=self.time, consistency=consistency,
            reasons=list(reasons), metadata=dict(metadata or {}),
            disks=[d.record for d in self.disks if d.record is not None], stats=stats)
        self.repo.store_restore_point(rp)
        self.committed = rp
        log.info("committed restore point %s of %s: %d new bytes stored", rp.id, self.vm.name,
                 stats.bytes_written_new)
        return rp

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self._lock_obj.release()
        if self.committed is None:
            log.warning("restore point of %s not committed: nothing was recorded", self.vm.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
