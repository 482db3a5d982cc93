"""Retrying backend wrapper (restic's `retry.Backend`): retries only what the inner backend
classified as transient (BackendTransient), with exponential backoff; everything else
(not found, permanent, storage full) passes through at once. `store` is atomic, so
repeating it is safe; so is repeating every other verb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from appliance.repository.backend import Backend, BackendTransient, ObjectInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryBackend:
    def __init__(self, inner: Backend, *, attempts: int = 5, initial_delay: float = 0.5,
                 max_delay: float = 30.0) -> None:
        self.inner = inner
        self._retrying = Retrying(
            retry=retry_if_exception_type(BackendTransient),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=initial_delay, max=max_delay),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    def _call(self, fn: Callable[[], T]) -> T:
        return self._retrying(fn)

    def create(self) -> None:
        self._call(self.inner.create)

    def open(self) -> None:
        self._call(self.inner.open)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.load(name, offset, length))

    def store(self, name: str, data: bytes | memoryview) -> None:
        self._call(lambda: self.inner.store(name, data))

    def delete(self, name: str) -> None:
        self._call(lambda: self.inner.delete(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialise inside the retry so a failure half-way through is retried as a whole.
        return iter(self._call(lambda: list(self.inner.list(prefix))))

    def info(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.inner.info(name))
