"""Read snapshot disks from an NBD server with libnbd (`import nbd`, python3-libnbd).

In production the server is nbdkit's VDDK plugin exporting the snapshot's disk; in tests
nbdkit's file plugin serving a flat file read-only. When the server advertises multi-conn
(safe to use several connections), one connection per worker is opened; otherwise a
single connection is shared, serialized. libnbd releases the GIL while it waits.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import nbd
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from appliance.errors import TransportError
from appliance.transport.base import DEFAULT_PIECE, ParallelStream
from appliance.datastore import SnapshotDisk

__all__ = ["NBDDiskStream", "NBDReader"]


def _release(h: nbd.NBD) -> None:
    """Disconnect politely; libnbd frees the handle (and socket) with its last reference."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def _connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as err:
        raise TransportError(f"cannot connect to NBD server {uri}: {err.string}") from err
    return h


class NBDDiskStream(ParallelStream):
    """One snapshot disk, read over NBD."""

    def __init__(self, reader: NBDReader, disk: SnapshotDisk, uri: str) -> None:
        self.uri = uri
        self._reader = reader
        first = _connect(uri)
        try:
            size = first.get_size()
            multi = first.can_multi_conn()
        except nbd.Error as err:
            _release(first)
            raise TransportError(f"NBD server {uri}: {err.string}") from err
        if size < disk.capacity:
            _release(first)
            raise TransportError(
                f"NBD export {uri} holds {size} bytes, less than the disk's "
                f"capacity {disk.capacity}"
            )
        self.multi_conn = bool(multi)
        count = reader.connections if self.multi_conn else 1
        self._handles: queue.Queue[nbd.NBD] = queue.Queue()
        self._all = [first]
        self._handles.put(first)
        try:
            for _ in range(count - 1):
                h = _connect(uri)
                self._all.append(h)
                self._handles.put(h)
        except TransportError:
            self._close_connections()
            raise
        # More workers than connections would only queue on the handles.
        super().__init__(
            disk.capacity, count, reader.piece_size, reader.max_in_flight, name=f"nbd-{disk.key}"
        )

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            h = self._handles.get(timeout=self._reader.timeout)
        except queue.Empty as err:
            raise TransportError(f"no usable NBD connection to {self.uri}") from err
        try:
            data = bytes(h.pread(length, offset))
        except nbd.Error as err:
            self._replace(h)
            raise _NBDTransient(err.string) from err
        self._handles.put(h)
        return data

    def _replace(self, dead: nbd.NBD) -> None:
        """Close a handle that failed and put a fresh connection in its place (if one can
        be made: otherwise the pool shrinks, and an empty pool fails reads)."""
        _release(dead)
        self._all.remove(dead)
        try:
            fresh = _connect(self.uri)
        except TransportError:
            return
        self._all.append(fresh)
        self._handles.put(fresh)

    def _read_piece(self, offset: int, length: int) -> bytes:
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self._reader.attempts),
                wait=wait_exponential(multiplier=self._reader.backoff, max=10),
                retry=retry_if_exception_type(_NBDTransient),
            ):
                with attempt:
                    data = self._pread(offset, length)
                    if len(data) != length:
                        raise _NBDTransient(f"short read: {len(data)} of {length}")
                    return data
        except RetryError as err:
            raise TransportError(
                f"NBD read of {length} bytes at {offset} from {self.uri} failed after "
                f"{self._reader.attempts} attempts: {err.last_attempt.exception()}"
            ) from err
        raise TransportError("unreachable")

    def _close_connections(self) -> None:
        for h in self._all:
            _release(h)
        self._all.clear()
        while not self._handles.empty():
            self._handles.get_nowait()


class _NBDTransient(Exception):
    pass


class NBDReader:
    """DiskReader over NBD; `uri_for(disk)` names the export serving that disk, e.g.
    'nbd+unix:///?socket=/run/x.sock' (a plain string serves every disk)."""

    def __init__(
        self,
        uri_for: Callable[[SnapshotDisk], str] | str,
        connections: int = 4,
        piece_size: int = DEFAULT_PIECE,
        max_in_flight: int | None = None,
        attempts: int = 3,
        backoff: float = 0.2,
        timeout: float = 120.0,
    ) -> None:
        self._uri_for = uri_for
        self.timeout = timeout
        self.connections = connections
        self.piece_size = piece_size
        self.max_in_flight = max_in_flight
        self.attempts = attempts
        self.backoff = backoff

    def open(self, disk: SnapshotDisk) -> NBDDiskStream:
        uri = self._uri_for if isinstance(self._uri_for, str) else self._uri_for(disk)
        return NBDDiskStream(self, disk, uri)
