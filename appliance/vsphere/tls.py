"""TLS trust for vCenter and ESXi connections: verified by a CA, or pinned by thumbprint.

A pinned context checks the SHA-256 thumbprint of the peer's DER certificate inside the
handshake of *every* connection it makes (SOAP, datastore HTTP, reconnects), before any
byte of HTTP -- and so before any credential -- is sent. There is no "unverified" mode.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from typing import Self

from appliance.errors import TrustError

__all__ = [
    "PinnedSSLContext",
    "fetch_peer_certificate",
    "normalize_thumbprint",
    "sha1_thumbprint_colon",
    "sha256_thumbprint",
    "verified_peer_certificate",
    "trust_context",
]


def normalize_thumbprint(value: str) -> str:
    """'AA:bb:..' or 'aabb..' -> 64 lowercase hex digits; anything else is refused."""
    hexdigits = value.replace(":", "").replace(" ", "").lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise TrustError(f"not a SHA-256 thumbprint (64 hex digits): {value!r}")
    return hexdigits


def sha256_thumbprint(der: bytes) -> str:
    """The SHA-256 thumbprint of a DER certificate, as 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def sha1_thumbprint_colon(der: bytes) -> str:
    """The SHA-1 thumbprint in VMware's colon form ('AB:CD:...'), what VDDK and nbdkit's
    vddk plugin take. Only ever derived from a certificate already verified another way."""
    digest = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - VDDK's format, not trust
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def verified_peer_certificate(host: str, port: int, ctx: ssl.SSLContext,
                              timeout: float = 10.0) -> bytes:
    """The DER certificate a server presents, over a connection `ctx` verified (by its CA or
    its pin): the certificate whose other thumbprints may then be handed on."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        raise TrustError(f"{host}:{port}: certificate not trusted: {err.verify_message}") from err
    except (OSError, ssl.SSLError) as err:
        if isinstance(err, TrustError):
            raise
        raise TrustError(f"{host}:{port}: cannot read its certificate: {err}") from err
    if not der:
        raise TrustError(f"{host}:{port} presented no certificate")
    return der


def fetch_peer_certificate(host: str, port: int, timeout: float = 10.0) -> bytes:
    """The DER certificate a server presents, fetched without trusting it.

    Used only to *report* a thumbprint (e.g. in a TrustError); nothing is sent over this
    connection.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise TrustError(f"{host}:{port} presented no certificate")
    return der


class _PinnedSSLSocket(ssl.SSLSocket):
    """An SSLSocket that refuses the peer unless its thumbprint is the pinned one."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        expected: str = self.context.pinned_sha256  # type: ignore[attr-defined]
        der = self.getpeercert(binary_form=True) or b""
        actual = sha256_thumbprint(der)
        # Constant-time comparison: the pin is not secret, but there is no reason to leak.
        if not hmac.compare_digest(actual.encode(), expected.encode()):
            self.close()
            raise TrustError(
                f"TLS certificate thumbprint mismatch for {self.server_hostname}: "
                f"expected sha256 {expected}, server presented sha256 {actual}"
            )


class PinnedSSLContext(ssl.SSLContext):
    """A client context whose every socket checks the pinned SHA-256 thumbprint.

    The CA chain and host name are not checked (the pin replaces them: a self-signed
    vCenter certificate is the common case), the thumbprint always is.
    """

    sslsocket_class = _PinnedSSLSocket
    pinned_sha256: str

    def __new__(cls, thumbprint_sha256: str) -> Self:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, thumbprint_sha256: str) -> None:
        super().__init__()
        self.pinned_sha256 = normalize_thumbprint(thumbprint_sha256)
        self.check_hostname = False
        self.verify_mode = ssl.CERT_NONE
        self.minimum_version = ssl.TLSVersion.TLSv1_2


def trust_context(thumbprint_sha256: str | None, ca_file: str | None) -> ssl.SSLContext:
    """The client SSL context for an endpoint: pinned if a thumbprint is given, else verified
    against ca_file (when given) or the system CA store, with host name checking."""
    if thumbprint_sha256:
        return PinnedSSLContext(thumbprint_sha256)
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise TrustError(f"cannot load CA file {ca_file}: {err}") from err
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def explain_verify_failure(host: str, port: int, err: BaseException) -> TrustError:
    """A TrustError for a failed CA verification, naming the thumbprint the server showed
    so that the user can decide to pin it."""
    try:
        seen = sha256_thumbprint(fetch_peer_certificate(host, port))
    except (OSError, TrustError):
        seen = "unknown"
    return TrustError(
        f"TLS certificate of {host}:{port} is not trusted ({err}); "
        f"server presented sha256 thumbprint {seen}: pin it or give a CA file"
    )
