"""Fault-injecting backend wrapper (kopia's `faulty` storage, restic's test backends).

Wraps any backend and, by counters, makes it misbehave:

    fail_store=N      the N-th store (1-based) raises BackendTransient and stores nothing
    truncate_store=N  the N-th store keeps only the first half of its data (a torn write
                      on storage that breaks the atomic-store contract) and succeeds
    enospc_after=N    every store after the first N raises StorageFull
    crash_after=N     after N operations (any verb) the "process dies": that operation and
                      every later one raise SimulatedCrash and never reach the inner backend

`ops` counts operations, so a test can first run cleanly to learn how many a workload
takes, then crash it after each N in turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from appliance.errors import StorageFull
from appliance.repository.backend import Backend, BackendTransient, ObjectInfo


class SimulatedCrash(Exception):
    """The fault-injecting backend simulated a crash of the process."""


class FaultyBackend:
    def __init__(self, inner: Backend, *, fail_store: int | None = None,
                 truncate_store: int | None = None, enospc_after: int | None = None,
                 crash_after: int | None = None) -> None:
        self.inner = inner
        self.fail_store = fail_store
        self.truncate_store = truncate_store
        self.enospc_after = enospc_after
        self.crash_after = crash_after
        self.ops = 0
        self.stores = 0
        self.crashed = False
        self._lock = threading.Lock()

    def _op(self, verb: str) -> None:
        with self._lock:
            if self.crash_after is not None and self.ops >= self.crash_after:
                self.crashed = True
                raise SimulatedCrash(f"simulated crash before operation {self.ops + 1} ({verb})")
            self.ops += 1

    def create(self) -> None:
        self._op("create")
        self.inner.create()

    def open(self) -> None:
        self._op("open")
        self.inner.open()

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._op("load")
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes | memoryview) -> None:
        self._op("store")
        with self._lock:
            self.stores += 1
            n = self.stores
        if self.fail_store == n:
            raise BackendTransient(f"{name}: injected transient failure (store #{n})")
        if self.enospc_after is not None and n > self.enospc_after:
            raise StorageFull(f"{name}: no space left on the repository storage (injected)")
        if self.truncate_store == n:
            data = memoryview(data)[: len(data) // 2]
        self.inner.store(name, data)

    def delete(self, name: str) -> None:
        self._op("delete")
        self.inner.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._op("list")
        return self.inner.list(prefix)

    def info(self, name: str) -> ObjectInfo:
        self._op("info")
        return self.inner.info(name)
