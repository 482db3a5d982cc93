"""Progress of long work: per disk bytes, rate and ETA.

Three renderings of the same events: a live line on a terminal, plain lines (at most one
every few seconds) when the output is a file or a pipe, and JSON lines with `--json` for
machines. Jobs only call `Progress` methods; they do not know how it is shown.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class _Task:
    label: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    last_shown: float = 0.0


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None,
                 plain_interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "tty" if self.stream.isatty() else "plain"
        self.mode = mode
        self.plain_interval = plain_interval
        self._tasks: dict[str, _Task] = {}

    # --- events ---------------------------------------------------------------------
    def event(self, message: str, **fields: Any) -> None:
        """Something happened (a phase began, a snapshot was taken...)."""
        if self.mode == "json":
            self._json({"event": message, **fields})
        else:
            self._clear_line()
            print(message, file=self.stream, flush=True)

    def start(self, key: str, label: str, total: int) -> None:
        self._tasks[key] = _Task(label, total)
        self._show(key, force=True)

    def advance(self, key: str, nbytes: int) -> None:
        task = self._tasks[key]
        task.done += nbytes
        self._show(key)

    def finish(self, key: str) -> None:
        self._show(key, force=True, final=True)
        self._tasks.pop(key, None)

    # --- rendering --------------------------------------------------------------------
    def _show(self, key: str, force: bool = False, final: bool = False) -> None:
        task = self._tasks[key]
        now = time.monotonic()
        interval = {"tty": 0.2, "json": 1.0}.get(self.mode, self.plain_interval)
        if not force and now - task.last_shown < interval:
            return
        task.last_shown = now
        elapsed = max(now - task.started, 1e-6)
        rate = task.done / elapsed
        eta = (task.total - task.done) / rate if rate > 0 and task.total else None
        if self.mode == "json":
            self._json({"progress": task.label, "bytes": task.done, "total": task.total,
                        "rate_bps": round(rate), "eta_s": None if eta is None else round(eta, 1),
                        "done": final})
            return
        pct = 100.0 * task.done / task.total if task.total else 100.0
        line = (f"{task.label}: {human_bytes(task.done)}/{human_bytes(task.total)} "
                f"({pct:5.1f}%) {human_bytes(rate)}/s"
                + (f" ETA {eta:4.0f}s" if eta is not None and not final else "")
                + (" done" if final else ""))
        if self.mode == "tty":
            end = "\n" if final else ""
            print("\r\033[K" + line, end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def _clear_line(self) -> None:
        if self.mode == "tty" and self._tasks:
            print("\r\033[K", end="", file=self.stream)

    def _json(self, doc: dict[str, Any]) -> None:
        print(json.dumps(doc), file=self.stream, flush=True)


class NullProgress(Progress):
    def __init__(self) -> None:
        super().__init__(mode="plain")

    def event(self, message: str, **fields: Any) -> None:
        pass

    def _show(self, key: str, force: bool = False, final: bool = False) -> None:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
