"""The storage seam: a small `Backend` protocol (borgstore-like verbs) and its error classes.

A backend stores opaque named objects. `store` is atomic: a reader sees the old object,
the new one, or none, never a torn one. Backends classify their own failures so that the
layers above (a retry wrapper, the job) know what to do:

    ObjectNotFound    the name does not exist                      (never retried)
    BackendPermanent  retrying will not help (permissions, EROFS)  (never retried)
    BackendTransient  may succeed when retried (EIO, timeouts)
    StorageFull       ENOSPC / EDQUOT (appliance.errors.StorageFull, exit code 10)
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from appliance.errors import NotFound, RepositoryError, StorageFull

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")


class ObjectNotFound(NotFound):
    """Repository object not found."""


class BackendPermanent(RepositoryError):
    """Repository storage failed (permanent)."""


class BackendTransient(RepositoryError):
    """Repository storage failed (transient; may succeed when retried)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


@runtime_checkable
class Backend(Protocol):
    """What the repository needs from storage; nothing more."""

    def create(self) -> None:
        """Prepare empty storage; BackendPermanent if it already holds objects."""

    def open(self) -> None:
        """Check the storage is there; ObjectNotFound if it is not."""

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of an object (shorter only at its end)."""

    def store(self, name: str, data: bytes | memoryview) -> None:
        """Write an object atomically and durably, replacing any old one."""

    def delete(self, name: str) -> None:
        """Remove an object; ObjectNotFound if it does not exist."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose name starts with `prefix`, in no particular order."""

    def info(self, name: str) -> ObjectInfo:
        """Size of one object; ObjectNotFound if it does not exist."""


def check_name(name: str) -> str:
    """Reject names that could escape a directory or are not ours."""
    if not _NAME.match(name) or ".." in name:
        raise BackendPermanent(f"invalid object name {name!r}")
    return name


_TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY,
              errno.ECONNRESET, errno.ENETDOWN, errno.ENETUNREACH, errno.ESTALE}


def classify_oserror(err: OSError, what: str) -> Exception:
    """Map an OSError to our classes (the caller raises it `from err`)."""
    if isinstance(err, FileNotFoundError) or err.errno == errno.ENOENT:
        return ObjectNotFound(f"{what}: not found")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: no space left on the repository storage")
    if err.errno in _TRANSIENT:
        return BackendTransient(f"{what}: {err.strerror or err}")
    return BackendPermanent(f"{what}: {err.strerror or err}")
