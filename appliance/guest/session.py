"""What the backup job needs of an agent deployed into a guest, whatever carried it there
(deploy.py over SSH for Linux, winrm_deploy.py over WinRM for Windows), and the skeleton both
deploys share: undo a half-done deploy, start the agent and greet it, remove it exactly once."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, Self

from appliance.errors import GuestError
from appliance.guest.channel import AgentStream
from appliance.guest.client import AgentClient

log = logging.getLogger(__name__)


class DeployedAgent(Protocol):
    """An agent running in a guest: its protocol client, and leaving removes it."""

    client: AgentClient

    def remove(self) -> None: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def check(res: Any, what: str) -> None:
    """A guest command's failure as one GuestError with the end of its output."""
    if not res.ok:
        raise GuestError(f"{what} failed (exit {res.exit_code}): {res.text()[-2000:]}")


@contextmanager
def removed_on_failure(remove: Callable[[], None]) -> Iterator[None]:
    """A deploy that fails part-way leaves nothing in the guest."""
    try:
        yield
    except BaseException:
        remove()
        raise


def start_agent(process: AgentStream,
                then: Callable[[AgentClient], object] | None = None,
                ) -> tuple[AgentClient, dict[str, Any]]:
    """The agent's client over its started process, greeted (and `then` run); closed again
    if either fails."""
    client = AgentClient(process)
    try:
        hello = client.hello()
        if then is not None:
            then(client)
    except GuestError:
        client.close()
        raise
    return client, hello


class RemovedOnExit(ABC):
    """Leaving the context removes the agent (once, by `_uninstall`); a failure to remove it
    is raised unless another error is already on its way out, which it must not hide."""

    removed: bool

    @abstractmethod
    def _uninstall(self) -> None:
        """Remove the agent from the guest (each deploy's own way)."""

    def remove(self) -> None:
        if not self.removed:
            self._uninstall()
            self.removed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.remove()
        except GuestError:
            if exc is None:
                raise
            log.exception("removing the agent after a failure also failed")
