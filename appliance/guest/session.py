"""What the backup job needs of an agent deployed into a guest, whatever carried it there
(deploy.py over SSH for Linux, winrm_deploy.py over WinRM for Windows)."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from appliance.guest.client import AgentClient


class DeployedAgent(Protocol):
    """An agent running in a guest: its protocol client, and leaving removes it."""

    client: AgentClient

    def remove(self) -> None: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
