"""The content-addressed chunk store: the in-memory index, verified reads, and the write
session that seals chunks into packs (thread safe, called from the writer's pool).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from appliance.errors import IntegrityError
from appliance.repository import format as F
from appliance.repository.backend import Backend, ObjectNotFound
from appliance.repository.crypto import Keys
from appliance.repository.packfile import (
    Entry,
    PackBuilder,
    PackInfo,
    decode_index,
    encode_index,
)


@dataclass
class ChunkIndex:
    """All index files merged: chunk id -> (pack id, entry)."""

    chunks: dict[bytes, tuple[bytes, Entry]] = field(default_factory=dict)
    packs: dict[bytes, PackInfo] = field(default_factory=dict)
    files: dict[str, list[PackInfo]] = field(default_factory=dict)

    def add(self, name: str, packs: list[PackInfo]) -> None:
        self.files[name] = packs
        for p in packs:
            self.packs[p.pack_id] = p
            for e in p.entries:
                self.chunks[e.id] = (p.pack_id, e)


def read_index_file(backend: Backend, keys: Keys, name: str) -> list[PackInfo]:
    return decode_index(keys.open(F.AAD_INDEX, backend.load(name), name), name)


def load_index(backend: Backend, keys: Keys) -> ChunkIndex:
    idx = ChunkIndex()
    for info in sorted(backend.list(F.INDEX_PREFIX), key=lambda i: i.name):
        try:
            idx.add(info.name, read_index_file(backend, keys, info.name))
        except ObjectNotFound:
            continue  # deleted by a concurrent prune after list(): its packs are indexed anew
    return idx


def write_index_file(backend: Backend, keys: Keys, packs: list[PackInfo]) -> str:
    name = F.INDEX_PREFIX + secrets.token_hex(16)
    backend.store(name, keys.seal(F.AAD_INDEX, encode_index(packs)))
    return name


class ChunkStore:
    """Reads chunks by id, verifying the AEAD tag (or checksum) and the id."""

    def __init__(self, backend: Backend, keys: Keys) -> None:
        self.backend = backend
        self.keys = keys
        self.index = load_index(backend, keys)

    def reload(self) -> None:
        self.index = load_index(self.backend, self.keys)

    def verify(self, chunk_id: bytes, sealed: bytes, what: str) -> bytes:
        data = self.keys.open(F.AAD_CHUNK + chunk_id, sealed, what)
        if self.keys.chunk_id(data) != chunk_id:
            raise IntegrityError(f"{what}: content does not match chunk id {chunk_id.hex()[:16]}")
        return data

    def read(self, chunk_id: bytes, what: str) -> bytes:
        for attempt in (0, 1):
            loc = self.index.chunks.get(chunk_id)
            try:
                if loc is None:
                    raise ObjectNotFound(chunk_id.hex())
                pack_id, e = loc
                sealed = self.backend.load(F.pack_name(pack_id), e.offset, e.length)
                break
            except ObjectNotFound:
                # A prune may have moved the chunk since we loaded the index: look again once.
                if attempt:
                    raise IntegrityError(
                        f"{what}: chunk {chunk_id.hex()[:16]} is missing from the repository"
                    ) from None
                self.reload()
        if len(sealed) != e.length:
            raise IntegrityError(f"{what}: chunk {chunk_id.hex()[:16]} is truncated in its pack")
        return self.verify(chunk_id, sealed, what)


@dataclass
class SessionStats:
    chunks_new: int = 0
    chunks_dedup: int = 0
    bytes_new_raw: int = 0      # plaintext bytes of chunks this session stored
    bytes_written_new: int = 0  # sealed (compressed, encrypted) bytes of those chunks
    packs_written: int = 0


class WriteSession:
    """Adds chunks to packs, uploads full packs, and at the end writes one index file.

    `put` is called from many threads. Chunks are visible to `read` from the moment
    they are in a pack buffer, so read-modify-write of a block written earlier in the same
    session works before its pack is uploaded.
    """

    def __init__(self, store: ChunkStore, pack_size: int) -> None:
        self.store = store
        self.pack_size = pack_size
        self.stats = SessionStats()
        self.packs: list[PackInfo] = []
        self._lock = threading.Lock()
        self._pending: dict[bytes, threading.Event] = {}
        self._builder = PackBuilder()
        self._uploading: dict[bytes, PackBuilder] = {}
        self._chunks: dict[bytes, tuple[bytes, Entry]] = {}

    def _known(self, chunk_id: bytes) -> bool:
        return (chunk_id in self.store.index.chunks or chunk_id in self._chunks
                or chunk_id in self._builder.blobs or chunk_id in self._uploading)

    def put(self, chunk_id: bytes, data: bytes | memoryview) -> int:
        """Store a chunk unless it exists; returns its sealed size, 0 when it existed."""
        while True:
            with self._lock:
                if self._known(chunk_id):
                    self.stats.chunks_dedup += 1
                    return 0
                ev = self._pending.get(chunk_id)
                if ev is None:
                    ev = self._pending[chunk_id] = threading.Event()
                    break
            ev.wait()  # another thread is sealing the same content; then it is known
        full = None
        try:
            sealed = self.store.keys.seal(F.AAD_CHUNK + chunk_id, data)
            with self._lock:
                self._builder.add(chunk_id, sealed, len(data))
                self.stats.chunks_new += 1
                self.stats.bytes_new_raw += len(data)
                self.stats.bytes_written_new += len(sealed)
                if len(self._builder) >= self.pack_size:
                    full, self._builder = self._builder, PackBuilder()
                    for cid in full.blobs:
                        self._uploading[cid] = full
        finally:
            with self._lock:
                self._pending.pop(chunk_id).set()
        if full is not None:
            self._upload(full)
        return len(sealed)

    def _upload(self, builder: PackBuilder) -> None:
        info, data = builder.finish(self.store.keys)
        self.store.backend.store(F.pack_name(info.pack_id), data)
        with self._lock:
            self.packs.append(info)
            self.stats.packs_written += 1
            for e in info.entries:
                self._chunks[e.id] = (info.pack_id, e)
                self._uploading.pop(e.id, None)

    def read(self, chunk_id: bytes, what: str) -> bytes:
        with self._lock:
            builder = self._uploading.get(chunk_id)
            if builder is None and chunk_id in self._builder.blobs:
                builder = self._builder
            sealed = builder.blob(chunk_id) if builder is not None else None
            loc = self._chunks.get(chunk_id)
        if sealed is not None:
            return self.store.verify(chunk_id, sealed, what)
        if loc is not None:
            pack_id, e = loc
            sealed = self.store.backend.load(F.pack_name(pack_id), e.offset, e.length)
            return self.store.verify(chunk_id, sealed, what)
        return self.store.read(chunk_id, what)

    def finish(self) -> str | None:
        """Upload the last pack and write the session's index file (durable) and merge it."""
        with self._lock:
            last = self._builder if self._builder.entries else None
            self._builder = PackBuilder()
            if last is not None:
                for cid in last.blobs:
                    self._uploading[cid] = last
        if last is not None:
            self._upload(last)
        if not self.packs:
            return None
        name = write_index_file(self.store.backend, self.store.keys, self.packs)
        self.store.index.add(name, self.packs)
        return name
