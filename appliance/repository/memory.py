"""In-memory backend: the reference implementation of the Backend contract, for tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from appliance.repository.backend import (
    BackendPermanent,
    ObjectInfo,
    ObjectNotFound,
    check_name,
)


class MemoryBackend:
    """Objects in a dict; `store` is atomic because it swaps one immutable bytes object."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def create(self) -> None:
        with self._lock:
            if self.objects:
                raise BackendPermanent("storage is not empty")

    def open(self) -> None:
        return None

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            try:
                data = self.objects[check_name(name)]
            except KeyError:
                raise ObjectNotFound(f"{name}: not found") from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def store(self, name: str, data: bytes | memoryview) -> None:
        blob = bytes(data)
        with self._lock:
            self.objects[check_name(name)] = blob

    def delete(self, name: str) -> None:
        with self._lock:
            try:
                del self.objects[check_name(name)]
            except KeyError:
                raise ObjectNotFound(f"{name}: not found") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [ObjectInfo(n, len(d)) for n, d in self.objects.items() if n.startswith(prefix)]
        return iter(items)

    def info(self, name: str) -> ObjectInfo:
        with self._lock:
            try:
                return ObjectInfo(name, len(self.objects[check_name(name)]))
            except KeyError:
                raise ObjectNotFound(f"{name}: not found") from None
