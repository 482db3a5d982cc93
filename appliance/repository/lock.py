"""The exclusive repository lock (writers, forget, prune).

The lock is one object, `lock`, holding {pid, host, time, nonce}. Taking it: if a lock
exists and its holder is a live process (or on another host, where we cannot tell), raise
RepositoryLocked; if the holder was on this host and its pid is gone, break it with a
warning. Then store ours and read it back: if another taker raced us, the nonce differs
and we back off. Readers (list, restore, check) do not lock: restore points are immutable
and prune deletes a pack only after no index names it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from datetime import UTC, datetime
from typing import Any, Self

from appliance.errors import RepositoryLocked
from appliance.repository import format as F
from appliance.repository.backend import Backend, ObjectNotFound

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(backend: Backend) -> dict[str, Any] | None:
    try:
        raw = backend.load(F.LOCK)
    except ObjectNotFound:
        return None
    try:
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}  # a torn or foreign lock file counts as held by nobody we can identify


class Lock:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.nonce = secrets.token_hex(16)
        self.held = False

    def acquire(self) -> None:
        host = socket.gethostname()
        current = read_lock(self.backend)
        if current is not None:
            same_host = current.get("host") == host
            pid = current.get("pid")
            if same_host and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("breaking stale repository lock of dead process %s on %s (since %s)",
                            pid, host, current.get("time"))
            else:
                # Say what to do: wait for it, or (a holder on another host that is gone
                # for good) remove the lock object by hand.
                raise RepositoryLocked(
                    f"repository is locked by pid {pid} on {current.get('host')} "
                    f"since {current.get('time')} (a backup, forget or prune): run again when "
                    "it has finished; if that process is gone for good, delete the "
                    "repository's 'lock' file")
        doc = {"pid": os.getpid(), "host": host, "nonce": self.nonce,
               "time": datetime.now(UTC).isoformat()}
        self.backend.store(F.LOCK, json.dumps(doc).encode())
        if (read_lock(self.backend) or {}).get("nonce") != self.nonce:
            raise RepositoryLocked("repository lock taken concurrently by another process")
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if (read_lock(self.backend) or {}).get("nonce") == self.nonce:
            self.backend.delete(F.LOCK)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def break_lock(backend: Backend) -> dict[str, Any] | None:
    """Remove whatever lock exists (the operator's `break-lock`); returns what it held."""
    current = read_lock(backend)
    if current is not None:
        try:
            backend.delete(F.LOCK)
        except ObjectNotFound:
            pass  # someone released it meanwhile: the goal is reached
    return current
