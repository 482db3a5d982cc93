"""Pack files and index files: building, parsing, byte layouts from format.py.

A pack holds many sealed chunks plus a sealed directory of them (its trailer), so a pack
describes itself and an index can be checked against (or rebuilt from) the packs.
An index file maps chunk id -> (pack, offset, length) for many packs; all index files are
loaded into memory when a repository is opened.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from appliance.errors import IntegrityError
from appliance.repository import format as F
from appliance.repository.crypto import Keys


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one sealed chunk lives inside its pack."""

    id: bytes
    offset: int
    length: int
    raw_length: int


@dataclass
class PackInfo:
    pack_id: bytes
    size: int
    entries: list[Entry] = field(default_factory=list)


class PackBuilder:
    """Accumulates sealed chunks in memory until the pack is big enough to upload.

    The chunks are kept as they came and joined once, at `finish`: appending each one to a
    growing bytearray re-copied the whole pack on every reallocation, under the GIL."""

    def __init__(self) -> None:
        head = F.PACK_HEADER.pack(F.PACK_MAGIC, F.PACK_VERSION)
        self._parts: list[bytes] = [head]
        self._size = len(head)
        self._part_of: dict[bytes, int] = {}
        self.entries: list[Entry] = []
        self.blobs: dict[bytes, Entry] = {}

    def add(self, chunk_id: bytes, sealed: bytes | memoryview, raw_length: int) -> None:
        e = Entry(chunk_id, self._size, len(sealed), raw_length)
        self._parts.append(sealed if isinstance(sealed, bytes) else bytes(sealed))
        self._part_of[chunk_id] = len(self._parts) - 1
        self._size += len(sealed)
        self.entries.append(e)
        self.blobs[chunk_id] = e

    def __len__(self) -> int:
        return self._size

    def blob(self, chunk_id: bytes) -> bytes | None:
        i = self._part_of.get(chunk_id)
        return None if i is None else self._parts[i]

    def finish(self, keys: Keys) -> tuple[PackInfo, bytes]:
        directory = encode_entries(self.entries)
        sealed = keys.seal(F.AAD_PACKDIR, directory)
        data = b"".join([*self._parts, sealed,
                         F.PACK_TRAILER_TAIL.pack(len(sealed), F.PACK_END_MAGIC)])
        pack_id = hashlib.sha256(data).digest()
        return PackInfo(pack_id, len(data), list(self.entries)), data


def encode_entries(entries: list[Entry]) -> bytes:
    out = bytearray(F.COUNT.pack(len(entries)))
    for e in entries:
        out += F.ENTRY.pack(e.id, e.offset, e.length, e.raw_length)
    return bytes(out)


def _decode_entries(buf: memoryview, pos: int, count: int, what: str) -> tuple[list[Entry], int]:
    end = pos + count * F.ENTRY.size
    if end > len(buf):
        raise IntegrityError(f"{what}: truncated entry table")
    entries = [Entry(*F.ENTRY.unpack_from(buf, pos + i * F.ENTRY.size)) for i in range(count)]
    return entries, end


def parse_pack(keys: Keys, data: bytes, what: str) -> list[Entry]:
    """Check a whole pack's header and trailer; return its directory."""
    if len(data) < F.PACK_HEADER.size + F.PACK_TRAILER_TAIL.size:
        raise IntegrityError(f"{what}: truncated pack")
    magic, version = F.PACK_HEADER.unpack_from(data, 0)
    if magic != F.PACK_MAGIC or version != F.PACK_VERSION:
        raise IntegrityError(f"{what}: bad pack header")
    dlen, end_magic = F.PACK_TRAILER_TAIL.unpack_from(data, len(data) - F.PACK_TRAILER_TAIL.size)
    if end_magic != F.PACK_END_MAGIC or dlen > len(data):
        raise IntegrityError(f"{what}: bad pack trailer")
    start = len(data) - F.PACK_TRAILER_TAIL.size - dlen
    directory = memoryview(keys.open(F.AAD_PACKDIR, memoryview(data)[start:start + dlen], what))
    (count,) = F.COUNT.unpack_from(directory, 0)
    entries, end = _decode_entries(directory, F.COUNT.size, count, what)
    if end != len(directory):
        raise IntegrityError(f"{what}: bad pack directory length")
    for e in entries:
        if e.offset < F.PACK_HEADER.size or e.offset + e.length > start:
            raise IntegrityError(f"{what}: directory entry outside the pack data")
    return entries


def encode_index(packs: list[PackInfo]) -> bytes:
    out = bytearray(F.INDEX_HEADER.pack(F.INDEX_MAGIC, F.INDEX_VERSION, len(packs)))
    for p in packs:
        out += F.INDEX_PACK.pack(p.pack_id, p.size, len(p.entries))
        for e in p.entries:
            out += F.ENTRY.pack(e.id, e.offset, e.length, e.raw_length)
    return bytes(out)


def decode_index(body: bytes, what: str) -> list[PackInfo]:
    buf = memoryview(body)
    if len(buf) < F.INDEX_HEADER.size:
        raise IntegrityError(f"{what}: truncated index")
    magic, version, npacks = F.INDEX_HEADER.unpack_from(buf, 0)
    if magic != F.INDEX_MAGIC or version != F.INDEX_VERSION:
        raise IntegrityError(f"{what}: bad index header")
    pos = F.INDEX_HEADER.size
    packs = []
    for _ in range(npacks):
        if pos + F.INDEX_PACK.size > len(buf):
            raise IntegrityError(f"{what}: truncated index")
        pack_id, size, count = F.INDEX_PACK.unpack_from(buf, pos)
        entries, pos = _decode_entries(buf, pos + F.INDEX_PACK.size, count, what)
        packs.append(PackInfo(pack_id, size, entries))
    if pos != len(buf):
        raise IntegrityError(f"{what}: trailing bytes in index")
    return packs
