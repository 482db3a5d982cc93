"""The DiskReader/DiskStream interface and the ordered, bounded parallel read engine.

`ParallelStream` implements read() and read_extents() on top of one primitive,
`_read_piece(offset, length) -> bytes`, which implementations provide and which must be
safe to call from several threads. Extents are cut into pieces of at most `piece_size`;
at most `max_in_flight` pieces are requested or held at a time (memory is bounded by
max_in_flight * piece_size) and results are yielded strictly in offset order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, Self, runtime_checkable

from appliance.errors import TransportError, UsageError
from appliance.datastore import SnapshotDisk

__all__ = ["DEFAULT_PIECE", "DiskReader", "DiskStream", "Extent", "ParallelStream", "pieces"]

Extent = tuple[int, int]  # (offset, length) in bytes
DEFAULT_PIECE = 4 * 1024 * 1024


@runtime_checkable
class DiskStream(Protocol):
    """An open snapshot disk."""

    @property
    def size(self) -> int: ...

    @property
    def bytes_read(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, buf: memoryview) -> int: ...

    def read_extents(self, extents: Iterable[Extent]) -> Iterator[tuple[int, bytes]]: ...

    def close(self) -> None: ...


class DiskReader(Protocol):
    """A way to read snapshot disks (datastore HTTP, NBD, ...)."""

    def open(self, disk: SnapshotDisk) -> DiskStream: ...


def pieces(extents: Iterable[Extent], piece_size: int, size: int) -> Iterator[Extent]:
    """Cut sorted, non-overlapping extents inside [0, size) into pieces <= piece_size."""
    cursor = 0
    for off, length in extents:
        if length <= 0 or off < 0:
            raise UsageError(f"bad extent ({off}, {length})")
        if off < cursor:
            raise UsageError(f"extents must be sorted and must not overlap (at {off})")
        if off + length > size:
            raise UsageError(f"extent [{off}, {off + length}) lies beyond the disk's {size} bytes")
        end = off + length
        while off < end:
            n = min(piece_size, end - off)
            yield off, n
            off += n
        cursor = end


class ParallelStream:
    """Base of the DiskStream implementations: parallel, ordered, bounded."""

    def __init__(
        self, size: int, workers: int, piece_size: int, max_in_flight: int | None, name: str
    ) -> None:
        if workers < 1 or piece_size < 512:
            raise UsageError("workers must be >= 1 and piece_size >= 512")
        self._size = size
        self.workers = workers
        self.piece_size = piece_size
        self.max_in_flight = max_in_flight or 2 * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._count_lock = threading.Lock()
        self._bytes_read = 0
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def _read_piece(self, offset: int, length: int) -> bytes:  # pragma: no cover - abstract
        raise TransportError("no read primitive")

    def _counted(self, offset: int, length: int) -> bytes:
        data = self._read_piece(offset, length)
        if len(data) != length:  # implementations check too; this is the last line of defence
            raise TransportError(f"short read at {offset}: {len(data)} of {length} bytes")
        with self._count_lock:
            self._bytes_read += length
        return data

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        return b"".join(data for _, data in self.read_extents([(offset, length)]))

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` with the disk's bytes from `offset`; returns len(buf)."""
        length = len(buf)
        if length:
            for off, data in self.read_extents([(offset, length)]):
                buf[off - offset : off - offset + len(data)] = data
        return length

    def read_extents(self, extents: Iterable[Extent]) -> Iterator[tuple[int, bytes]]:
        if self._closed:
            raise TransportError("read from a closed disk stream")
        inflight: deque[tuple[int, Future[bytes]]] = deque()
        try:
            for off, length in pieces(extents, self.piece_size, self._size):
                inflight.append((off, self._pool.submit(self._counted, off, length)))
                if len(inflight) >= self.max_in_flight:
                    first_off, fut = inflight.popleft()
                    yield first_off, fut.result()
            while inflight:
                first_off, fut = inflight.popleft()
                yield first_off, fut.result()
        finally:
            for _, fut in inflight:  # consumer stopped early or a piece failed
                fut.cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._close_connections()

    def _close_connections(self) -> None:
        """Implementations release their connections here."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
