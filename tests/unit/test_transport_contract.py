"""One contract suite for every DiskReader: datastore HTTP, NBD and nbdkit-per-disk, all real.

HTTP: a local HTTPS server (self-signed certificate, pinned by thumbprint) that serves a
datastore directory under /folder/<path>?dcPath=&dsName= with Range support, checks the
session cookie and can inject faults. NBD: nbdkit's file plugin serving the same flat file
read-only over a Unix socket, and NbdkitReader starting its own nbdkit per disk from the
descriptor. Also the HTTP-only behaviour (retries, re-login, descriptor).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from stillpoint_lab.certs import make_self_signed

from appliance.errors import TransportError, TrustError, UsageError
from appliance.transport import DatastoreHTTPReader, DiskStream, NBDReader
from appliance.transport.nbdkit import NbdkitConfig, NbdkitReader
from appliance.transport.vmdk import flat_extent, parse_descriptor
from appliance.datastore import SnapshotDisk

pytestmark = pytest.mark.unit

CAPACITY = 5 * 1024 * 1024 + 3 * 512  # not a multiple of any piece size
PIECE = 256 * 1024
DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW {sectors} VMFS "vm1-000001-flat.vmdk"

ddb.adapterType = "lsilogic"
"""


# --- a self-signed certificate -----------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path, str]:
    """(cert.pem, key.pem, sha256 hex thumbprint) for 127.0.0.1."""
    made = make_self_signed(directory / "cert.pem", directory / "key.pem",
                            common_name="stillpoint-test", days=1)
    return made.cert_pem, made.key_pem, made.sha256_hex


# --- a datastore HTTP server -------------------------------------------------------------


class Faults:
    """Knobs the handler consults (and counts down) on each data GET."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status_503 = 0
        self.truncate = 0  # send half the body, then close
        self.clamp = 0  # answer a shorter range than asked (valid headers)
        self.always_503 = False
        self.reject_cookie: str | None = None  # answer 401 to this cookie
        self.ignore_range = False

    def take(self, name: str) -> bool:
        with self.lock:
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return True
            return False


class DatastoreServer:
    def __init__(self, root: Path, cert: Path, key: Path, cookie: str) -> None:
        self.root = root
        self.cookie = cookie
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []  # (path, range)
        self.clients: set[int] = set()  # client ports: one per connection
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.clients.add(self.client_address[1])
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                rng = self.headers.get("Range", "")
                server.requests.append((url.path, rng))
                cookie = self.headers.get("Cookie", "")
                if cookie != server.cookie or cookie == server.faults.reject_cookie:
                    return self._send(401, b"")
                if not url.path.startswith("/folder/") or q.get("dcPath") != ["DC0"]:
                    return self._send(404, b"")
                file = server.root / q.get("dsName", [""])[0] / unquote(url.path[8:])
                if not file.is_file():
                    return self._send(404, b"")
                if server.faults.always_503 or server.faults.take("status_503"):
                    return self._send(503, b"busy")
                data = file.read_bytes()
                m = re.match(r"bytes=(\d+)-(\d+)$", rng)
                if not m or server.faults.ignore_range:
                    return self._send(200, data)
                first, last = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
                if first >= len(data):
                    return self._send(416, b"")
                if server.faults.take("clamp") and last > first:
                    last = first + (last - first) // 2
                body = data[first : last + 1]
                headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
                if server.faults.take("truncate"):
                    self.send_response(206)
                    self.send_header("Content-Range", headers["Content-Range"])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return None
                return self._send(206, body, headers)

            def _send(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeSessionAccess:
    """The DatastoreAccess side of a VSphereSession: host, port, cookie, TLS, re-login."""

    def __init__(self, port: int, thumbprint: str, cookie: str) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.thumbprint = thumbprint
        self.cookie = cookie
        self.relogins = 0
        self.next_cookie: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        from appliance.vsphere.tls import trust_context

        return trust_context(self.thumbprint, None)

    def ensure_logged_in(self) -> None:
        self.relogins += 1
        if self.next_cookie:
            self.cookie, self.next_cookie = self.next_cookie, None


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    vmdir = root / "LocalDS_0" / "vm1"
    vmdir.mkdir(parents=True)
    (vmdir / "vm1-000001-flat.vmdk").write_bytes(os.urandom(CAPACITY))
    (vmdir / "vm1-000001.vmdk").write_text(DESCRIPTOR.format(sectors=CAPACITY // 512))
    return root


@pytest.fixture(scope="module")
def flat_bytes(datastore: Path) -> bytes:
    return (datastore / "LocalDS_0" / "vm1" / "vm1-000001-flat.vmdk").read_bytes()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(datastore: Path, tls_files: tuple[Path, Path, str]) -> Iterator[DatastoreServer]:
    cert, key, _ = tls_files
    srv = DatastoreServer(datastore, cert, key, cookie="vmware_soap_session=abc")
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def access(server: DatastoreServer, tls_files: tuple[Path, Path, str]) -> FakeSessionAccess:
    return FakeSessionAccess(server.port, tls_files[2], server.cookie)


def disk(file_name: str = "[LocalDS_0] vm1/vm1-000001.vmdk") -> SnapshotDisk:
    return SnapshotDisk(
        key=2000,
        label="Hard disk 1",
        capacity=CAPACITY,
        file_name=file_name,
        change_id=None,
        datastore="LocalDS_0",
        datacenter="DC0",
    )


@pytest.fixture
def nbd_socket(datastore: Path, tmp_path: Path) -> Iterator[str]:
    if shutil.which("nbdkit") is None:
        pytest.fail("nbdkit is not installed (Debian package nbdkit)")
    sock = tmp_path / "nbd.sock"
    flat = datastore / "LocalDS_0" / "vm1" / "vm1-000001-flat.vmdk"
    proc = subprocess.Popen(
        # -P: nbdkit writes its pid file only once it accepts connections.
        [
            "nbdkit",
            "--exit-with-parent",
            "-f",
            "-r",
            "-P",
            f"{sock}.pid",
            "-U",
            str(sock),
            "file",
            str(flat),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"{sock}.pid").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdkit did not start (exit {proc.returncode})")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(params=["http", "nbd", "nbdkit-file"])
def stream(request: pytest.FixtureRequest, datastore: Path) -> Iterator[DiskStream]:
    if request.param == "nbdkit-file":
        cfg = NbdkitConfig(mode="file", datastores={"LocalDS_0": str(datastore / "LocalDS_0")})
        reader: Any = NbdkitReader(cfg, connections=4, piece_size=PIECE)
    elif request.param == "http":
        reader = DatastoreHTTPReader(
            request.getfixturevalue("access"), workers=4, piece_size=PIECE, backoff=0.01
        )
    else:
        reader = NBDReader(request.getfixturevalue("nbd_socket"), connections=4, piece_size=PIECE)
    s = reader.open(disk())
    try:
        yield s
    finally:
        s.close()


# --- the contract --------------------------------------------------------------------------


def test_size_is_the_capacity(stream: DiskStream) -> None:
    assert stream.size == CAPACITY


def test_read_whole_disk(stream: DiskStream, flat_bytes: bytes) -> None:
    assert stream.read(0, CAPACITY) == flat_bytes
    assert stream.bytes_read == CAPACITY


def test_read_unaligned(stream: DiskStream, flat_bytes: bytes) -> None:
    assert stream.read(12345, 777777) == flat_bytes[12345 : 12345 + 777777]
    assert stream.read(CAPACITY - 1, 1) == flat_bytes[-1:]
    assert stream.read(0, 0) == b""


def test_read_into_a_buffer(stream: DiskStream, flat_bytes: bytes) -> None:
    buf = bytearray(3 * PIECE + 7)
    assert stream.read_into(1000, memoryview(buf)) == len(buf)
    assert bytes(buf) == flat_bytes[1000 : 1000 + len(buf)]


def test_read_extents_in_order_in_pieces(stream: DiskStream, flat_bytes: bytes) -> None:
    extents = [(0, 4096), (65536, 3 * PIECE + 100), (2 * 1024 * 1024, 512), (CAPACITY - 1000, 1000)]
    got = list(stream.read_extents(extents))
    offsets = [off for off, _ in got]
    assert offsets == sorted(offsets)
    assert all(len(data) <= PIECE for _, data in got)
    assert len(got) == 1 + 4 + 1 + 1  # the second extent spans four pieces
    for off, data in got:
        assert data == flat_bytes[off : off + len(data)]
    assert sum(len(d) for _, d in got) == sum(n for _, n in extents) == stream.bytes_read


def test_read_extents_consumer_may_stop_early(stream: DiskStream, flat_bytes: bytes) -> None:
    it = stream.read_extents([(0, CAPACITY)])
    off, data = next(it)
    assert (off, data) == (0, flat_bytes[:PIECE])
    it.close()  # in-flight pieces are cancelled or dropped
    assert stream.read(PIECE, 10) == flat_bytes[PIECE : PIECE + 10]


def test_bad_extents_are_refused(stream: DiskStream) -> None:
    with pytest.raises(UsageError):
        list(stream.read_extents([(4096, 10), (0, 10)]))
    with pytest.raises(UsageError):
        list(stream.read_extents([(0, 4096), (4000, 10)]))
    with pytest.raises(UsageError):
        stream.read(CAPACITY - 10, 11)
    with pytest.raises(UsageError):
        list(stream.read_extents([(0, 0)]))


def test_closed_stream_refuses_reads(stream: DiskStream) -> None:
    stream.close()
    with pytest.raises(TransportError):
        stream.read(0, 10)


# --- datastore HTTP only ------------------------------------------------------------------


def test_http_reads_the_flat_extent_named_by_the_descriptor(
    access: FakeSessionAccess, server: DatastoreServer
) -> None:
    with DatastoreHTTPReader(access).open(disk()) as s:
        assert s.flat_path == "vm1/vm1-000001-flat.vmdk"
        s.read(0, 10)
    paths = {p for p, _ in server.requests}
    assert paths == {"/folder/vm1/vm1-000001.vmdk", "/folder/vm1/vm1-000001-flat.vmdk"}


def test_http_reads_a_raw_flat_backing_directly(
    access: FakeSessionAccess, flat_bytes: bytes
) -> None:
    with DatastoreHTTPReader(access).open(disk("[LocalDS_0] vm1/vm1-000001-flat.vmdk")) as s:
        assert s.flat_path == "vm1/vm1-000001-flat.vmdk"
        assert s.read(100, 1000) == flat_bytes[100:1100]


def test_http_uses_parallel_keepalive_connections(
    access: FakeSessionAccess, server: DatastoreServer
) -> None:
    with DatastoreHTTPReader(access, workers=4, piece_size=64 * 1024).open(disk()) as s:
        s.read(0, CAPACITY)
    data_gets = sum(1 for p, _ in server.requests if p.endswith("-flat.vmdk"))
    assert data_gets == -(-CAPACITY // (64 * 1024))
    assert 2 <= len(server.clients) <= 5  # per-thread connections (+ the opening one), reused


def test_http_retries_transient_errors(
    access: FakeSessionAccess, server: DatastoreServer, flat_bytes: bytes
) -> None:
    with DatastoreHTTPReader(access, workers=2, piece_size=PIECE, backoff=0.01).open(disk()) as s:
        server.faults.status_503 = 2
        server.faults.truncate = 2
        server.faults.clamp = 2
        assert s.read(0, CAPACITY) == flat_bytes
    assert (server.faults.status_503, server.faults.truncate, server.faults.clamp) == (0, 0, 0)


def test_http_gives_up_with_transport_error(
    access: FakeSessionAccess, server: DatastoreServer
) -> None:
    with DatastoreHTTPReader(access, attempts=3, backoff=0.01).open(disk()) as s:
        server.faults.always_503 = True
        with pytest.raises(TransportError, match="after 3 attempts.*503"):
            s.read(0, 4096)


def test_http_logs_in_again_on_401(
    access: FakeSessionAccess, server: DatastoreServer, flat_bytes: bytes
) -> None:
    with DatastoreHTTPReader(access, backoff=0.01).open(disk()) as s:
        server.cookie = "vmware_soap_session=new"  # the old session expired
        access.next_cookie = "vmware_soap_session=new"
        assert s.read(0, 4096) == flat_bytes[:4096]
    assert access.relogins == 1


def test_http_missing_file_is_a_transport_error(access: FakeSessionAccess) -> None:
    with pytest.raises(TransportError, match="not found"):
        DatastoreHTTPReader(access).open(disk("[LocalDS_0] vm1/nope.vmdk"))


def test_http_server_ignoring_range_is_refused(
    access: FakeSessionAccess, server: DatastoreServer
) -> None:
    with DatastoreHTTPReader(access).open(disk()) as s:
        server.faults.ignore_range = True
        with pytest.raises(TransportError, match="ignored the Range"):
            s.read(4096, 10)


def test_http_wrong_pin_is_a_trust_error(
    access: FakeSessionAccess, server: DatastoreServer
) -> None:
    access.thumbprint = "ab" * 32
    with pytest.raises(TrustError, match="mismatch"):
        DatastoreHTTPReader(access).open(disk())
    assert server.requests == []  # nothing, not even the cookie, was sent


def test_http_capacity_larger_than_the_file_is_refused(access: FakeSessionAccess) -> None:
    big = SnapshotDisk(
        2000, "d", CAPACITY + 512, "[LocalDS_0] vm1/vm1-000001.vmdk", None, "LocalDS_0", "DC0"
    )
    with pytest.raises(TransportError, match="less than the disk's capacity"):
        DatastoreHTTPReader(access).open(big)


# --- NBD only -----------------------------------------------------------------------------


def test_nbd_uses_multi_conn_when_offered(nbd_socket: str) -> None:
    with NBDReader(nbd_socket, connections=3).open(disk()) as s:
        assert s.workers == (3 if s.multi_conn else 1)


def test_nbd_server_gone_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        NBDReader(f"nbd+unix:///?socket={tmp_path}/none.sock").open(disk())


# --- descriptor parsing -------------------------------------------------------------------


def test_descriptor_extents() -> None:
    text = DESCRIPTOR.format(sectors=2048) + 'RW 10 FLAT "other file-flat.vmdk" 7\n'
    exts = parse_descriptor(text)
    assert [(e.kind, e.sectors, e.file, e.offset_sectors) for e in exts] == [
        ("VMFS", 2048, "vm1-000001-flat.vmdk", 0),
        ("FLAT", 10, "other file-flat.vmdk", 7),
    ]
    with pytest.raises(TransportError, match="2 extents"):
        flat_extent("vm1/vm1.vmdk", text)
    assert flat_extent("vm1/x.vmdk", 'RW 8 FLAT "x-flat.vmdk" 2\n') == (
        "vm1/x-flat.vmdk",
        1024,
        4096,
    )
    with pytest.raises(TransportError, match="SESPARSE"):
        flat_extent("vm1/x.vmdk", 'RW 8 SESPARSE "x-sesparse.vmdk"\n')
