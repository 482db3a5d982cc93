"""TLS trust against a real local TLS server: pinned, CA-verified, and refused cases.

The server records every byte it receives, so the tests can assert that nothing (no
credentials) was sent to a server whose identity did not check out.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stillpoint_lab.certs import make_self_signed

from appliance.errors import TrustError, VSphereError
from appliance.vsphere.session import VCenterEndpoint, connect
from appliance.vsphere.tls import (
    PinnedSSLContext,
    fetch_peer_certificate,
    normalize_thumbprint,
    sha256_thumbprint,
    trust_context,
)

pytestmark = pytest.mark.unit


def make_cert(directory: Path) -> tuple[Path, Path, str]:
    """(cert.pem, key.pem, sha256 hex thumbprint) for 127.0.0.1."""
    made = make_self_signed(directory / "cert.pem", directory / "key.pem",
                            common_name="stillpoint-test", days=1)
    return made.cert_pem, made.key_pem, made.sha256_hex


class RecordingTLSServer:
    """Accepts TLS connections, records what clients send, answers HTTP 404 to requests."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return
                    self.received += data
                    if b"\r\n\r\n" in data:
                        tls.sendall(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n"
                        )
                        return
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tls_files: tuple[Path, Path, str]) -> Iterator[RecordingTLSServer]:
    srv = RecordingTLSServer(tls_files[0], tls_files[1])
    try:
        yield srv
    finally:
        srv.close()


def _get(port: int, ctx: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/sdk/vimServiceVersions.xml")
        return conn.getresponse().status
    finally:
        conn.close()


def test_right_pin_connects(server: RecordingTLSServer, tls_files: tuple[Path, Path, str]) -> None:
    assert _get(server.port, PinnedSSLContext(tls_files[2])) == 404
    assert b"GET /sdk/vimServiceVersions.xml" in server.received


def test_pin_accepts_vsphere_colon_notation(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    colons = ":".join(tls_files[2][i : i + 2].upper() for i in range(0, 64, 2))
    assert _get(server.port, trust_context(colons, None)) == 404


def test_wrong_pin_is_refused_before_anything_is_sent(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    with pytest.raises(TrustError) as info:
        _get(server.port, PinnedSSLContext("00" * 32))
    assert "00" * 32 in str(info.value) and tls_files[2] in str(info.value)
    assert server.received == b""


def test_ca_file_verifies(server: RecordingTLSServer, tls_files: tuple[Path, Path, str]) -> None:
    assert _get(server.port, trust_context(None, str(tls_files[0]))) == 404


def test_connect_with_wrong_pin_sends_no_credentials(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    ep = VCenterEndpoint(
        host="127.0.0.1",
        port=server.port,
        user="admin",
        password="hunter2-secret",
        thumbprint_sha256="11" * 32,
    )
    with pytest.raises(
        TrustError, match=f"expected sha256 {'11' * 32}.*presented sha256 {tls_files[2]}"
    ):
        connect(ep, keepalive_seconds=None, timeout=5)
    assert server.received == b""


def test_connect_without_pin_to_self_signed_is_refused(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    ep = VCenterEndpoint(
        host="127.0.0.1", port=server.port, user="admin", password="hunter2-secret"
    )
    with pytest.raises(TrustError) as info:
        connect(ep, keepalive_seconds=None, timeout=5)
    assert tls_files[2] in str(info.value)  # tells the user what to pin
    assert b"hunter2" not in server.received


def test_connect_with_right_pin_to_a_non_vcenter_is_a_vsphere_error(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    ep = VCenterEndpoint(
        host="127.0.0.1",
        port=server.port,
        user="admin",
        password="hunter2-secret",
        thumbprint_sha256=tls_files[2],
    )
    with pytest.raises(VSphereError, match=f"127.0.0.1:{server.port}"):
        connect(ep, keepalive_seconds=None, timeout=5)
    assert b"hunter2" not in server.received


def test_unreachable_names_the_host() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(VSphereError, match=f"cannot reach vCenter at 127.0.0.1:{port}"):
        connect(
            VCenterEndpoint(
                host="127.0.0.1", port=port, user="u", password="p", thumbprint_sha256="00" * 32
            ),
            keepalive_seconds=None,
            timeout=5,
        )


def test_fetch_peer_certificate_and_thumbprint(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    assert sha256_thumbprint(fetch_peer_certificate("127.0.0.1", server.port)) == tls_files[2]


def test_normalize_thumbprint() -> None:
    assert normalize_thumbprint("AB:" * 31 + "AB") == "ab" * 32
    for bad in ("ab" * 20, "zz" * 32, ""):
        with pytest.raises(TrustError):
            normalize_thumbprint(bad)


def test_endpoint_repr_hides_the_password() -> None:
    ep = VCenterEndpoint(host="vc.example", user="admin", password="hunter2-secret")
    assert "hunter2" not in repr(ep) and "hunter2" not in str(ep)


def test_vddk_gets_the_sha1_of_the_certificate_the_session_trusts(
    server: RecordingTLSServer, tls_files: tuple[Path, Path, str]
) -> None:
    import hashlib

    from appliance.vsphere.tls import sha1_thumbprint_colon, verified_peer_certificate

    der = ssl.PEM_cert_to_DER_cert(tls_files[0].read_text())
    want = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
    for ctx in (trust_context(tls_files[2], None),        # pinned by SHA-256
                trust_context(None, str(tls_files[0]))):  # verified by CA
        got = verified_peer_certificate("127.0.0.1", server.port, ctx)
        assert sha1_thumbprint_colon(got) == want
    with pytest.raises(TrustError):
        verified_peer_certificate("127.0.0.1", server.port, trust_context("cd" * 32, None))
    with pytest.raises(TrustError):
        verified_peer_certificate("127.0.0.1", server.port, trust_context(None, None))
