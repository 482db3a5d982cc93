"""How many VM backups `serve` runs at once: in total, per ESXi host, per datastore.

A snapshot and its copy load the VM's host (snapshot, NFC/HTTP reads) and every datastore
the VM's disks are on; these limits keep a nightly run from saturating either. `Limits` is
shared by every job the service runs, so two jobs firing together share the budget.

`RepositoryGate` serializes the sections that take the repository's exclusive lock (one
restore point writer, forget, prune) between the service's threads: VMs still overlap in
everything else (stale-snapshot cleanup, CBT, agent, freeze, snapshot), and wait for the
gate only to copy and commit.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LimitSettings:
    max_vms: int = 2
    per_host: int = 2
    per_datastore: int = 2

    def __post_init__(self) -> None:
        if min(self.max_vms, self.per_host, self.per_datastore) < 1:
            raise ValueError("every limit is at least 1")


class Limits:
    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._total = 0
        self._hosts: Counter[str] = Counter()
        self._datastores: Counter[str] = Counter()
        self.peak = 0  # the most VMs that ran at once (for tests and the log)

    def _fits(self, host: str, datastores: tuple[str, ...]) -> bool:
        s = self.settings
        return (self._total < s.max_vms
                and (not host or self._hosts[host] < s.per_host)
                and all(self._datastores[d] < s.per_datastore for d in datastores))

    @contextmanager
    def slot(self, host: str, datastores: tuple[str, ...],
             stop: threading.Event) -> Iterator[bool]:
        """Wait for room for a VM on `host` and `datastores`; yields False (and takes
        nothing) if `stop` is set while waiting."""
        acquired = False
        with self._cond:
            while not stop.is_set():
                if self._fits(host, datastores):
                    self._total += 1
                    self._hosts[host] += 1
                    self._datastores.update(set(datastores))
                    self.peak = max(self.peak, self._total)
                    acquired = True
                    break
                self._cond.wait(0.5)
        if not acquired:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._total -= 1
                self._hosts[host] -= 1
                self._datastores.subtract(set(datastores))
                self._cond.notify_all()


_gates: dict[str, threading.Lock] = {}
_gates_lock = threading.Lock()


def repository_gate(path: Path) -> threading.Lock:
    """The process-wide lock for the repository at `path`."""
    key = str(path.resolve())
    with _gates_lock:
        return _gates.setdefault(key, threading.Lock())


class GatedRepository:
    """A Repository whose writer() waits for the process-wide gate (behaviour by wrapping)."""

    def __init__(self, inner: Any, gate: threading.Lock) -> None:
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def writer(self, *args: Any, **kwargs: Any) -> Any:
        self._gate.acquire()
        try:
            return _GatedWriter(self._inner.writer(*args, **kwargs), self._gate)
        except BaseException:
            self._gate.release()
            raise


class _GatedWriter:
    def __init__(self, inner: Any, gate: threading.Lock) -> None:
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> Any:
        try:
            return self._inner.__enter__()
        except BaseException:
            self._gate.release()
            raise

    def __exit__(self, *exc: object) -> Any:
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._gate.release()
