"""`LocalChannel`: the GuestChannel for this machine (tests, and lab guests in a namespace
when given a `prefix` such as ["ip", "netns", "exec", "sp0-lab-vm1"])."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import GuestError
from appliance.guest.channel import RunResult


class LocalStream:
    def __init__(self, argv: list[str]) -> None:
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
        except OSError as err:
            raise GuestError(f"cannot start {argv[0]}: {err}") from err
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stderr = bytearray()
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self._proc.stdout
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_err(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        for chunk in iter(lambda: os.read(stderr.fileno(), 4096), b""):
            self._stderr.extend(chunk)

    def write_line(self, line: str) -> None:
        try:
            assert self._proc.stdin
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as err:
            raise GuestError(f"agent stdin closed: {err}") from err

    def read_line(self, timeout: float) -> str | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty as err:
            raise GuestError(f"no answer from the agent within {timeout:.0f} s") from err
        if line is None:
            self._lines.put(None)   # stay at EOF for later reads
            return None
        return line.decode("utf-8", "replace").rstrip("\n")

    def stderr_text(self) -> str:
        return bytes(self._stderr).decode("utf-8", "replace")

    def close(self) -> int | None:
        try:
            if self._proc.stdin:
                self._proc.stdin.close()
        except OSError:
            pass
        try:
            return self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


class LocalChannel:
    """Runs as the current user (root in the lab); `sudo` is accepted and ignored."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        self.prefix = list(prefix)

    def put_file(self, source: Path | bytes, remote: str, mode: int = 0o600) -> None:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        tmp = f"{remote}.tmp{os.getpid()}.{time.monotonic_ns()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, remote)
        except OSError as err:
            raise GuestError(f"cannot write {remote}: {err}") from err

    def run(self, argv: Sequence[str], stdin: bytes | None = None, sudo: bool | None = None,
            timeout: float = 60.0) -> RunResult:
        full = self.prefix + list(argv)
        try:
            proc = subprocess.run(full, check=False, input=stdin, capture_output=True, timeout=timeout,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise GuestError(f"{argv[0]} did not run: {err}") from err
        return RunResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)

    def open_process(self, argv: Sequence[str], sudo: bool | None = None) -> LocalStream:
        return LocalStream(self.prefix + list(argv))

    def close(self) -> None:
        pass
