"""Run one command and measure it: wall time, CPU seconds and peak RSS of that child.

`os.wait4` gives the rusage of exactly the child we started (RUSAGE_CHILDREN would mix in
every earlier child's maximum RSS). Commands get secrets through files or the environment,
never argv.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CommandFailed(RuntimeError):
    """A measured command exited non-zero."""


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float
    maxrss_kib: int
    stdout: str = field(repr=False, default="")
    # (seconds since start, line) of every stdout line, when asked for: phases of a run
    lines: tuple[tuple[float, str], ...] = field(repr=False, default=())


def run(argv: list[str], *, stdin: Path | None = None, stdout: Path | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 3600, timestamps: bool = False) -> Sample:
    """Run argv to completion; stdin/stdout may be files (no shell pipes in the timing).
    With timestamps=True stdout is read line by line as it comes, each line timed."""
    full_env = {**os.environ, **(env or {})}
    with contextlib.ExitStack() as stack:
        # Files are closed by the ExitStack.
        fin = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        fout: Any = subprocess.PIPE if timestamps else stack.enter_context(
            open(stdout, "wb") if stdout else tempfile.TemporaryFile())  # noqa: SIM115
        ferr = stack.enter_context(tempfile.TemporaryFile())
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=full_env, cwd=cwd)
        timed: list[tuple[float, str]] = []
        reader = None
        if timestamps:
            reader = threading.Thread(target=_read_lines, args=(proc.stdout, started, timed),
                                      daemon=True)
            reader.start()
        try:
            status, usage = _wait4(proc.pid, timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - started
        if reader is not None:
            reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
        ferr.seek(0)
        err = ferr.read().decode(errors="replace")
        out = ""
        if timestamps:
            out = "\n".join(line for _, line in timed)
        elif not stdout:
            fout.seek(0)
            out = fout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {proc.returncode}: {err[-2000:]}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, out, tuple(timed))


def _read_lines(stream: Any, started: float, into: list[tuple[float, str]]) -> None:
    with stream:
        for raw in stream:
            into.append((time.monotonic() - started, raw.decode(errors="replace").rstrip("\n")))


def _wait4(pid: int, timeout: float) -> tuple[int, Any]:
    """wait4 with a deadline: the rusage of exactly this child."""
    deadline = time.monotonic() + timeout
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return status, usage
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still running after {timeout} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Stat:
    """Median and range of several samples of one figure."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            raise ValueError("no samples")
        return cls(statistics.median(values), min(values), max(values), len(values))
