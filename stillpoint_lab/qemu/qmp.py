"""A QMP client (QEMU Machine Protocol) over a unix socket.

One `QMP` object is one connection: the greeting is read and `qmp_capabilities` sent on
connect; `execute(cmd, **args)` sends a command and waits for its reply (with a timeout);
asynchronous events that arrive meanwhile are kept in a queue that `wait_event` searches.
An error reply becomes `QMPError(cls, desc)`. Thread-safe: one lock per connection
serialises commands; a second lock guards the event queue.

QEMU's QMP argument names use dashes; `execute` takes them with underscores as well
(`execute("block-commit", job_id="c0")` sends `"job-id"`), or as a dict via `arguments=`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

DEFAULT_TIMEOUT_S = 30.0
MAX_EVENTS = 1000


class QMPError(Exception):
    """QEMU answered a command with an error (`cls` is QMP's error class)."""

    def __init__(self, cls: str, desc: str, command: str = "") -> None:
        self.cls = cls
        self.desc = desc
        self.command = command
        super().__init__(f"{command + ': ' if command else ''}{cls}: {desc}")


class QMPConnectionError(QMPError):
    """The socket could not be opened, closed under us, or a reply did not come in time."""

    def __init__(self, desc: str, command: str = "") -> None:
        super().__init__("ConnectionError", desc, command)


class QMP:
    """One QMP connection (see the module docstring)."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._lock = threading.RLock()            # one command at a time
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._events_lock = threading.Lock()
        self._next_id = 0
        self.greeting: dict[str, Any] = {}

    # --- connection -----------------------------------------------------------------
    def connect(self, *, wait_s: float = 0.0) -> QMP:
        """Connect (retrying up to `wait_s` while the socket does not accept yet)."""
        deadline = time.monotonic() + wait_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                break
            except OSError as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QMPConnectionError(f"cannot connect to {self.path}: {err}") from err
                time.sleep(0.05)
        with self._lock:
            self._sock = sock
            self._buf = b""
            try:
                self.greeting = self._read_message(time.monotonic() + self.timeout)
                if "QMP" not in self.greeting:
                    raise QMPConnectionError(f"not a QMP greeting: {self.greeting!r}")
                self._command("qmp_capabilities", {}, self.timeout)
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands -------------------------------------------------------------------
    def execute(self, cmd: str, *, arguments: dict[str, Any] | None = None,
                timeout: float | None = None, **kwargs: Any) -> Any:
        """Run `cmd`, return its `return` value; errors raise QMPError."""
        args = dict(arguments or {})
        args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        with self._lock:
            return self._command(cmd, args, self.timeout if timeout is None else timeout)

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """An HMP command through `human-monitor-command` (its text output)."""
        out = self.execute("human-monitor-command", arguments={"command-line": command_line},
                           timeout=timeout)
        return str(out)

    def _command(self, cmd: str, args: dict[str, Any], timeout: float) -> Any:
        if self._sock is None:
            raise QMPConnectionError("not connected", cmd)
        self._next_id += 1
        msg_id = f"sp-{self._next_id}"
        msg: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args:
            msg["arguments"] = args
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as err:
            self.close()
            raise QMPConnectionError(f"send failed: {err}", cmd) from err
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline, cmd)
            if "event" in reply:
                self._push_event(reply)
                continue
            if reply.get("id") != msg_id:
                continue  # a late reply to a command that timed out earlier
            if "error" in reply:
                error = reply["error"]
                raise QMPError(str(error.get("class", "GenericError")),
                               str(error.get("desc", "")), cmd)
            return reply.get("return")

    def _read_message(self, deadline: float, cmd: str = "") -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPConnectionError(f"no reply within the timeout ({self.path})", cmd)
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                self.close()
                raise QMPConnectionError(f"receive failed: {err}", cmd) from err
            if not chunk:
                self.close()
                raise QMPConnectionError("QEMU closed the monitor connection", cmd)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return dict(json.loads(line))
        except ValueError as err:
            raise QMPConnectionError(f"bad JSON from QEMU: {line[:200]!r}", cmd) from err

    # --- events ---------------------------------------------------------------------
    def _push_event(self, event: dict[str, Any]) -> None:
        with self._events_lock:
            self._events.append(event)

    def events(self, *, clear: bool = False) -> list[dict[str, Any]]:
        """The events received so far (and not yet taken by `wait_event`)."""
        with self._events_lock:
            out = list(self._events)
            if clear:
                self._events.clear()
            return out

    def clear_events(self) -> None:
        with self._events_lock:
            self._events.clear()

    def _take_event(self, name: str | tuple[str, ...],
                    match: Callable[[dict[str, Any]], bool] | None) -> dict[str, Any] | None:
        names = (name,) if isinstance(name, str) else name
        with self._events_lock:
            for i, ev in enumerate(self._events):
                if ev.get("event") in names and (match is None or match(ev)):
                    del self._events[i]
                    return ev
        return None

    def wait_event(self, name: str | tuple[str, ...], *, timeout: float = DEFAULT_TIMEOUT_S,
                   match: Callable[[dict[str, Any]], bool] | dict[str, Any] | None = None,
                   ) -> dict[str, Any]:
        """The first queued or arriving event called `name` (or one of several names) for
        which `match(event)` holds (a dict matches when each item equals the event's
        `data`). Removes it from the queue; QMPConnectionError after `timeout`."""
        if isinstance(match, dict):
            match = _data_matcher(match)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._take_event(name, match)
            if ev is not None:
                return ev
            with self._lock:
                ev = self._take_event(name, match)  # arrived while we waited for the lock
                if ev is not None:
                    return ev
                if self._sock is None:
                    raise QMPConnectionError(f"closed while waiting for {name}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPConnectionError(f"no {name} event within {timeout:.0f} s")
                try:
                    msg = self._read_message(time.monotonic() + min(left, 0.5))
                except QMPConnectionError:
                    if self._sock is None:
                        raise
                    continue
                if "event" in msg:
                    self._push_event(msg)


def _data_matcher(want: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """An event predicate: each item of `want` equals the event's `data` item."""
    def matches(ev: dict[str, Any]) -> bool:
        return all(ev.get("data", {}).get(k) == v for k, v in want.items())
    return matches
