"""Keys, key derivation and the envelope that seals every object and chunk.

Key hierarchy (encrypted repositories):

    passphrase --Argon2id/scrypt(salt, params)--> KEK (32 bytes, never stored)
    KEK --AES-256-GCM unwrap (aad binds the config)--> master key (32 random bytes)
    master --HKDF-SHA256(info)--> enc_key (AES-256-GCM of every envelope)
                                  id_key  (HMAC-SHA256 chunk ids: ids leak nothing)

The passphrase and the KEK are never stored. An unencrypted repository ("none") seals with
SHA-256 only: it detects corruption, not tampering.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from appliance.errors import IntegrityError, RepositoryError, UsageError, WrongPassphrase
from appliance.repository import format as F

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread safe: one per thread.
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=F.ZSTD_LEVEL)
    return c


_SAMPLE = 4 * 1024
_SAMPLES = 8


def _compressible(data: bytes | memoryview) -> bool:
    """False when samples at eight places of the data all fail to compress.

    Random-looking data (already compressed or encrypted files) costs zstd as much time as
    text does and gains nothing; borg's "auto" compression tests with lz4 the same way.
    Sampling eight places keeps a block that is only partly random (a file's tail, then
    free space) compressed."""
    n = len(data)
    if n < 4 * _SAMPLE * _SAMPLES:
        return True
    view = memoryview(data)
    zc = _compressor()
    for i in range(_SAMPLES):
        at = i * n // _SAMPLES
        if len(zc.compress(view[at:at + _SAMPLE])) < _SAMPLE * 0.97:
            return True
    return False


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# Two Argon2id derivations at once in one process never return (seen with cryptography's
# OpenSSL-backed Argon2id and the default lanes): derive one at a time.
_KDF_LOCK = threading.Lock()


def derive_kek(passphrase: str, kdf: dict[str, Any]) -> bytes:
    """Passphrase -> key-encryption key, with the parameters recorded in the config."""
    salt = unb64(kdf["salt"])
    secret = passphrase.encode("utf-8")
    if kdf["name"] == F.KDF_ARGON2ID:
        with _KDF_LOCK:
            return Argon2id(salt=salt, length=32, iterations=int(kdf["iterations"]),
                            lanes=int(kdf["lanes"]),
                            memory_cost=int(kdf["memory_kib"])).derive(secret)
    if kdf["name"] == F.KDF_SCRYPT:
        return Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]),
                      p=int(kdf["p"])).derive(secret)
    raise RepositoryError(f"unknown key derivation function {kdf['name']!r}")


def _wrap_aad(config: dict[str, Any]) -> bytes:
    # Everything in the config except the wrapped key itself is authenticated by the key
    # unwrap, so a tampered chunk size or KDF parameter fails like a wrong passphrase.
    stripped = json.loads(json.dumps(config))
    stripped["encryption"].pop("wrapped_key", None)
    return F.AAD_WRAPPED_KEY + json.dumps(stripped, sort_keys=True).encode()


@dataclass(frozen=True)
class Keys:
    """The working keys of an open repository (None/None when unencrypted)."""

    enc_key: bytes | None
    id_key: bytes | None

    @property
    def encrypted(self) -> bool:
        return self.enc_key is not None

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        def hkdf(info: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)
        return cls(hkdf(F.HKDF_INFO_ENC), hkdf(F.HKDF_INFO_ID))

    @classmethod
    def create(cls, config: dict[str, Any], passphrase: str | None, encryption: bool,
               kdf: dict[str, Any] | None) -> Keys:
        """Fill config["encryption"] for a new repository and return its keys."""
        if not encryption:
            config["encryption"] = {"mode": F.ENCRYPTION_NONE}
            return cls(None, None)
        if not passphrase:
            raise UsageError("an encrypted repository needs a passphrase "
                             "(pass encryption=False to create an unencrypted one)")
        params = dict(kdf or {"name": F.KDF_ARGON2ID, **F.KDF_DEFAULTS[F.KDF_ARGON2ID]})
        params["salt"] = b64(os.urandom(F.SALT_SIZE))
        config["encryption"] = {"mode": F.ENCRYPTION_AESGCM, "kdf": params}
        master = os.urandom(F.MASTER_KEY_SIZE)
        nonce = os.urandom(F.NONCE_SIZE)
        wrapped = nonce + AESGCM(derive_kek(passphrase, params)).encrypt(
            nonce, master, _wrap_aad(config))
        config["encryption"]["wrapped_key"] = b64(wrapped)
        return cls.from_master(master)

    @classmethod
    def unlock(cls, config: dict[str, Any], passphrase: str | None) -> Keys:
        enc = config.get("encryption") or {}
        mode = enc.get("mode")
        if mode == F.ENCRYPTION_NONE:
            return cls(None, None)
        if mode != F.ENCRYPTION_AESGCM:
            raise RepositoryError(f"unknown encryption mode {mode!r}")
        if not passphrase:
            raise WrongPassphrase("this repository is encrypted: a passphrase is required")
        wrapped = unb64(enc["wrapped_key"])
        try:
            master = AESGCM(derive_kek(passphrase, enc["kdf"])).decrypt(
                wrapped[: F.NONCE_SIZE], wrapped[F.NONCE_SIZE:], _wrap_aad(config))
        except InvalidTag:
            raise WrongPassphrase("wrong repository passphrase (or a tampered config)") from None
        return cls.from_master(master)

    # -- ids and envelopes ------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        if self.id_key is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self.id_key, data, "sha256")

    def seal(self, aad: bytes, data: bytes | memoryview, compress: bool = True) -> bytes:
        """data -> envelope (see format.py)."""
        inner_type, payload = F.CTYPE_RAW, data
        if compress and _compressible(data):
            z = _compressor().compress(data)
            if len(z) < len(data):
                inner_type, payload = F.CTYPE_ZSTD, z
        inner = bytes((inner_type,)) + payload
        if self.enc_key is None:
            return bytes((F.ENVELOPE_PLAIN,)) + hashlib.sha256(inner).digest() + inner
        nonce = os.urandom(F.NONCE_SIZE)
        aead = _aead(self.enc_key)
        return bytes((F.ENVELOPE_AESGCM,)) + nonce + aead.encrypt(nonce, inner, aad)

    def open(self, aad: bytes, blob: bytes | memoryview, what: str) -> bytes:
        """envelope -> data; IntegrityError(what) when it does not authenticate."""
        mv = memoryview(blob)
        if len(mv) < 2:
            raise IntegrityError(f"{what}: truncated")
        kind = mv[0]
        if kind == F.ENVELOPE_AESGCM and self.enc_key is not None:
            try:
                inner = _aead(self.enc_key).decrypt(
                    mv[1: 1 + F.NONCE_SIZE], mv[1 + F.NONCE_SIZE:], aad)
            except InvalidTag:
                raise IntegrityError(f"{what}: authentication failed (corrupt or tampered)") from None
        elif kind == F.ENVELOPE_PLAIN and self.enc_key is None:
            digest, inner = bytes(mv[1:33]), bytes(mv[33:])
            if hashlib.sha256(inner).digest() != digest:
                raise IntegrityError(f"{what}: checksum mismatch (corrupt)")
        else:
            raise IntegrityError(f"{what}: unexpected envelope type {kind}")
        if not inner:
            raise IntegrityError(f"{what}: empty envelope")
        if inner[0] == F.CTYPE_RAW:
            return inner[1:]
        if inner[0] == F.CTYPE_ZSTD:
            try:
                return _decompressor().decompress(memoryview(inner)[1:])
            except zstandard.ZstdError as err:
                raise IntegrityError(f"{what}: bad compressed data") from err
        raise IntegrityError(f"{what}: unknown compression type {inner[0]}")


def _aead(key: bytes) -> AESGCM:
    cache = getattr(_local, "aead", None)
    if cache is None or cache[0] != key:
        cache = _local.aead = (key, AESGCM(key))
    return cache[1]
