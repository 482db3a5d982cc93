"""Read snapshot disks with HTTP Range GETs of their flat file under vCenter's /folder/.

    GET https://<vc>/folder/<dir>/<name>-flat.vmdk?dcPath=<dc>&dsName=<ds>
    Cookie: vmware_soap_session=...       Range: bytes=<first>-<last>

Opening a disk GETs the head of the snapshot's backing file: a descriptor is parsed for
its flat extent (name and offset), anything else is read as the raw flat file itself.
Each worker thread keeps its own keep-alive HTTPS connection, made with exactly the
session's TLS trust (CA-verified or thumbprint-pinned). Every answer is checked (206,
Content-Range, body length); short or failed reads are retried with backoff (tenacity),
after a 401/403 the session logs in again first; then TransportError.
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import threading
from typing import Protocol

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from appliance.errors import StillpointError, TransportError, TrustError
from appliance.transport.base import DEFAULT_PIECE, ParallelStream
from appliance.transport.vmdk import flat_extent, is_descriptor
from appliance.datastore import SnapshotDisk, folder_url

__all__ = ["DatastoreAccess", "DatastoreHTTPReader", "HTTPDiskStream", "folder_url"]

log = logging.getLogger(__name__)

_PROBE = 64 * 1024  # a descriptor is a few hundred bytes; this covers any real one
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SPARSE_MAGIC = (b"KDMV", b"COWD")


class DatastoreAccess(Protocol):
    """What the reader needs from a vCenter session (VSphereSession provides it)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def cookie(self) -> str: ...

    def ssl_context(self) -> ssl.SSLContext: ...

    def ensure_logged_in(self) -> None: ...


class _Transient(Exception):
    """A failure worth retrying (connection trouble, 5xx, short read, expired session)."""



class HTTPDiskStream(ParallelStream):
    """One snapshot disk, read over datastore HTTP."""

    def __init__(self, reader: DatastoreHTTPReader, disk: SnapshotDisk) -> None:
        self._reader = reader
        self._access = reader.access
        self._ctx = self._access.ssl_context()
        self._local = threading.local()
        self._conns: list[http.client.HTTPSConnection] = []
        self._conns_lock = threading.Lock()
        self.disk = disk
        try:
            self.flat_path, self._base, found_size = self._locate(disk)
        except BaseException:
            self._close_connections()
            raise
        if found_size < disk.capacity:
            raise TransportError(
                f"{disk.file_name}: the flat file holds {found_size} bytes, less than the "
                f"disk's capacity {disk.capacity}"
            )
        self._target = folder_url(self.flat_path, disk.datacenter, disk.datastore)
        super().__init__(
            disk.capacity,
            reader.workers,
            reader.piece_size,
            reader.max_in_flight,
            name=f"dshttp-{disk.key}",
        )

    # --- connections -------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self._access.host,
                self._access.port,
                context=self._ctx,
                timeout=self._reader.timeout,
            )
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _close_connections(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # --- one GET -----------------------------------------------------------------------
    def _get(self, target: str, offset: int, length: int, allow_short: bool) -> bytes:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Cookie": self._access.cookie}
        try:
            conn = self._conn()
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except TrustError:
            self._drop_conn()
            raise
        except (OSError, http.client.HTTPException) as err:
            self._drop_conn()
            raise _Transient(f"{type(err).__name__}: {err}") from err
        if resp.getheader("Connection", "").lower() == "close":
            self._drop_conn()
        status = resp.status
        if status in (401, 403):
            self._access.ensure_logged_in()  # a new cookie for the retry
            raise _Transient(f"HTTP {status} (session expired?)")
        if status == 404:
            raise TransportError(f"datastore file not found: {target}")
        if status == 416:
            raise TransportError(f"range {offset}+{length} not satisfiable for {target}")
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status} {resp.reason}")
        if status == 200:
            # The server ignored Range: only acceptable for a whole small file at offset 0.
            if offset == 0 and (len(body) == length or (allow_short and len(body) < length)):
                return body
            raise TransportError(f"{target}: server ignored the Range header (HTTP 200)")
        if status != 206:
            raise TransportError(f"{target}: unexpected HTTP {status} {resp.reason}")
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise _Transient(f"bad Content-Range {resp.getheader('Content-Range')!r}")
        last = int(m.group(2))
        expected = last - offset + 1
        if last != offset + length - 1 and not allow_short:
            raise _Transient(f"short range: asked {length} bytes at {offset}, got {expected}")
        if len(body) != expected:
            raise _Transient(f"short read: {len(body)} of {expected} bytes at {offset}")
        return body

    def _get_retrying(
        self, target: str, offset: int, length: int, allow_short: bool = False
    ) -> bytes:
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self._reader.attempts),
                wait=wait_exponential(multiplier=self._reader.backoff, max=10),
                retry=retry_if_exception_type(_Transient),
                reraise=False,
            ):
                with attempt:
                    return self._get(target, offset, length, allow_short)
        except RetryError as err:
            cause = err.last_attempt.exception()
            raise TransportError(
                f"reading {length} bytes at {offset} of {target} failed after "
                f"{self._reader.attempts} attempts: {cause}"
            ) from cause
        except StillpointError:
            raise
        raise TransportError("unreachable")  # for type checkers: Retrying always returns

    def _read_piece(self, offset: int, length: int) -> bytes:
        return self._get_retrying(self._target, self._base + offset, length)

    # --- where the bytes are --------------------------------------------------------------
    def _locate(self, disk: SnapshotDisk) -> tuple[str, int, int]:
        """(flat path, base offset, usable size) of the disk's data."""
        target = folder_url(disk.path, disk.datacenter, disk.datastore)
        head = self._get_retrying(target, 0, _PROBE, allow_short=True)
        if head.startswith(_SPARSE_MAGIC):
            raise TransportError(f"{disk.file_name} is a sparse VMDK; read it over NBD/VDDK")
        if is_descriptor(head):
            path, base, size = flat_extent(disk.path, head.decode("utf-8", "replace"))
            return path, base, size
        # Not a descriptor: the backing is itself the raw flat file; its size from a probe
        # of its last byte range (Content-Range total).
        return disk.path, 0, self._total_size(target)

    def _total_size(self, target: str) -> int:
        conn = self._conn()
        try:
            conn.request(
                "GET", target, headers={"Range": "bytes=0-0", "Cookie": self._access.cookie}
            )
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as err:
            self._drop_conn()
            raise TransportError(f"{target}: {err}") from err
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
        if resp.status != 206 or not m or m.group(3) == "*":
            raise TransportError(f"{target}: cannot learn the file size (HTTP {resp.status})")
        return int(m.group(3))


class DatastoreHTTPReader:
    """DiskReader over vCenter's datastore HTTP interface."""

    def __init__(
        self,
        access: DatastoreAccess,
        workers: int = 4,
        piece_size: int = DEFAULT_PIECE,
        max_in_flight: int | None = None,
        timeout: float = 120.0,
        attempts: int = 5,
        backoff: float = 0.5,
    ) -> None:
        self.access = access
        self.workers = workers
        self.piece_size = piece_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff

    def open(self, disk: SnapshotDisk) -> HTTPDiskStream:
        return HTTPDiskStream(self, disk)
