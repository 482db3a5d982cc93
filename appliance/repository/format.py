"""Every constant of the Stillpoint repository format, in one place (format version 1).

docs/format.md explains the why; this docstring is the grammar. All integers are little
endian; `id` is 32 bytes; `||` is concatenation.

Objects in the backend (names are '/'-separated, lowercase hex):

    config                       JSON, plaintext (holds the KDF parameters; optional
                                 "retention_lock_days": restore points younger than that
                                 are never forgotten)
    lock                         JSON {pid, host, time, nonce}
    data/<hh>/<packid>           pack file; packid = hex(sha256(pack bytes)), hh = packid[:2]
    index/<hex16>                envelope("index", index-body)
    restorepoints/<rpid>         envelope("restorepoint:" rpid, JSON)

Envelope (every stored object except config and lock, and every chunk inside a pack):

    envelope   := 0x01 || nonce[12] || AES-256-GCM(enc_key, nonce, inner, aad)   (encrypted)
               |  0x00 || sha256(inner)[32] || inner                           (unencrypted)
    inner      := ctype[1] || payload          ctype 0x00 = raw, 0x01 = zstd frame
    aad        := b"chunk:" || id  |  b"index"  |  b"packdir"  |  b"restorepoint:" || rpid

Chunk id:  HMAC-SHA256(id_key, plaintext) when encrypted; SHA-256(plaintext) when not.

Pack file:

    pack       := PACK_MAGIC[4] || version[1] || 0x000000 || blob* || trailer
    blob       := envelope(b"chunk:" || id, block data)
    trailer    := envelope(b"packdir", packdir) || packdir_len:u32 || PACK_END_MAGIC[4]
    packdir    := count:u32 || entry*
    entry      := id[32] || offset:u64 || length:u32 || raw_length:u32

Index file body:

    index-body := INDEX_MAGIC[4] || version[1] || npacks:u32 || pack*
    pack       := packid[32] || pack_size:u64 || count:u32 || entry*     (entry as above)

Block map of one disk (the payload of its map chunks, concatenated, MAP_ENTRY bytes per
block; a block whose entry is 32 zero bytes is a hole that reads as zeros):

    blockmap   := id[32] * ceil(capacity / chunk_size)
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

# Object names.
CONFIG = "config"
LOCK = "lock"
DATA_PREFIX = "data/"
INDEX_PREFIX = "index/"
RESTOREPOINT_PREFIX = "restorepoints/"

# Sizes.
ID_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
WRITE_ALIGN = 512                       # writes are sector aligned (CBT areas are 64 KiB or more)
CHUNK_ALIGN = 64 * 1024                 # the block size is a multiple of this
DEFAULT_CHUNK_SIZE = 1024 * 1024        # fixed block size, aligned to disk offsets
MIN_CHUNK_SIZE = CHUNK_ALIGN
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_PACK_SIZE = 32 * 1024 * 1024    # target; a pack closes once it reaches this
MIN_PACK_SIZE = 64 * 1024               # small packs only make sense in tests
MAP_ENTRY = ID_SIZE
HOLE_ID = bytes(ID_SIZE)

# Envelope.
ENVELOPE_PLAIN = 0x00
ENVELOPE_AESGCM = 0x01
CTYPE_RAW = 0x00
CTYPE_ZSTD = 0x01
ZSTD_LEVEL = 3
AAD_CHUNK = b"chunk:"
AAD_INDEX = b"index"
AAD_PACKDIR = b"packdir"
AAD_RESTOREPOINT = b"restorepoint:"

# Pack file.
PACK_MAGIC = b"SPPK"
PACK_END_MAGIC = b"KPPS"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<4sB3x")
PACK_TRAILER_TAIL = struct.Struct("<I4s")
ENTRY = struct.Struct("<32sQII")        # id, offset, length, raw_length
COUNT = struct.Struct("<I")

# Index file.
INDEX_MAGIC = b"SPIX"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<4sBI")
INDEX_PACK = struct.Struct("<32sQI")    # packid, pack_size, count

# Key derivation (passphrase -> key-encryption key) and key hierarchy.
KDF_ARGON2ID = "argon2id"
KDF_SCRYPT = "scrypt"
KDF_DEFAULTS = {
    KDF_ARGON2ID: {"iterations": 3, "lanes": 4, "memory_kib": 64 * 1024},
    KDF_SCRYPT: {"n": 2**17, "r": 8, "p": 1},
}
SALT_SIZE = 16
MASTER_KEY_SIZE = 32
HKDF_INFO_ENC = b"stillpoint v1 chunk encryption"
HKDF_INFO_ID = b"stillpoint v1 chunk id"
AAD_WRAPPED_KEY = b"stillpoint v1 wrapped master key:"
ENCRYPTION_AESGCM = "aes-256-gcm"
ENCRYPTION_NONE = "none"

# Retention lock (immutability): config key, set at init, bound into the key wrap's AAD.
RETENTION_LOCK_DAYS = "retention_lock_days"
MAX_RETENTION_LOCK_DAYS = 36500

# Restore points.
CONSISTENCY_LEVELS = ("crash", "filesystem", "application")


def pack_name(pack_id: bytes) -> str:
    """Backend name of a pack from its 32-byte id."""
    h = pack_id.hex()
    return f"{DATA_PREFIX}{h[:2]}/{h}"


def pack_id_from_name(name: str) -> bytes:
    """Inverse of pack_name; ValueError when the name is not a pack name."""
    if not name.startswith(DATA_PREFIX):
        raise ValueError(name)
    h = name.rsplit("/", 1)[-1]
    raw = bytes.fromhex(h)
    if len(raw) != ID_SIZE or pack_name(raw) != name:
        raise ValueError(name)
    return raw
