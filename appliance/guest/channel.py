"""The seam between the agent lifecycle and a transport (SSH, WinRM, local).

A channel runs commands as the guest's privileged user (root, or via sudo when the channel
was opened with sudo) and can open one long-lived process whose stdin/stdout are a
line-oriented byte stream (`AgentStream`): the agent's JSON-lines session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self) -> str:
        """stdout then stderr, decoded, for error messages."""
        return (self.stdout + self.stderr).decode("utf-8", "replace").strip()


class AgentStream(Protocol):
    def write_line(self, line: str) -> None:
        """Send one line (a newline is added)."""

    def read_line(self, timeout: float) -> str | None:
        """The next line without its newline; None at EOF; GuestError on timeout."""

    def stderr_text(self) -> str:
        """What the process wrote to stderr so far (for diagnostics)."""

    def close(self) -> int | None:
        """Close stdin (the agent aborts any attempt on EOF) and return the exit status."""


class GuestChannel(Protocol):
    def put_file(self, source: Path | bytes, remote: str, mode: int = 0o600) -> None:
        """Write a local file (or bytes) to `remote` atomically with `mode`."""

    def run(self, argv: Sequence[str], stdin: bytes | None = None, sudo: bool | None = None,
            timeout: float = 60.0) -> RunResult:
        """Run argv; a non-zero exit is a result, not an exception (GuestError: no answer)."""

    def open_process(self, argv: Sequence[str], sudo: bool | None = None) -> AgentStream:
        """Start argv with piped stdin/stdout/stderr."""

    def close(self) -> None:
        """Release the connection."""
