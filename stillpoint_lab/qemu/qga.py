"""A qemu-guest-agent client over the unix socket QEMU serves for the guest's
`org.qemu.guest_agent.0` virtio-serial port (the lab's VMware Tools channel).

The channel has no framing of its own and survives timeouts badly: a reply that comes too
late is still in the pipe when the next command is sent. So every command is preceded by
`guest-sync-delimited` with a random id: the agent answers with a 0xFF byte and then that
id, and everything before it (stale replies, garbage) is thrown away. A guest without a
running agent never answers: every call then fails with `QGATimeout` after its timeout.

Errors: `QGAError(cls, desc)` for an error reply, `QGATimeout` (a subclass) when the agent
did not answer in time or the socket is not there.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 3.0
EXEC_POLL_S = 0.1


class QGAError(Exception):
    """The guest agent answered with an error."""

    def __init__(self, cls: str, desc: str, command: str = "") -> None:
        self.cls = cls
        self.desc = desc
        self.command = command
        super().__init__(f"{command + ': ' if command else ''}{cls}: {desc}")


class QGATimeout(QGAError):
    """No (timely) answer from the guest agent."""

    def __init__(self, desc: str, command: str = "") -> None:
        super().__init__("Timeout", desc, command)


class QGA:
    """One guest agent channel; thread-safe (one command at a time)."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = b""

    def _ensure(self, cmd: str) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(SYNC_TIMEOUT_S)
                sock.connect(self.path)
            except OSError as err:
                sock.close()
                raise QGATimeout(f"cannot connect to {self.path}: {err}", cmd) from err
            self._sock = sock
            self._buf = b""
        return self._sock

    def _send(self, data: bytes, cmd: str) -> None:
        sock = self._ensure(cmd)
        try:
            sock.sendall(data)
        except OSError as err:
            self._drop()
            raise QGATimeout(f"send failed: {err}", cmd) from err

    def _fill(self, deadline: float, cmd: str) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise QGATimeout("the guest agent did not answer in time", cmd)
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise QGATimeout("the guest agent did not answer in time", cmd) from None
        except OSError as err:
            self._drop()
            raise QGATimeout(f"receive failed: {err}", cmd) from err
        if not chunk:
            self._drop()
            raise QGATimeout("QEMU closed the guest agent socket", cmd)
        self._buf += chunk

    def _read_json(self, deadline: float, cmd: str) -> dict[str, Any]:
        while True:
            while b"\n" not in self._buf:
                self._fill(deadline, cmd)
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.strip().lstrip(b"\xff")
            if not line:
                continue
            try:
                return dict(json.loads(line))
            except ValueError:
                continue  # a fragment from before a resync

    def _sync(self, timeout: float) -> None:
        sync_id = random.randint(1, 2**31 - 1)
        # A 0xFF first resets the agent's JSON parser if it holds half a message.
        self._send(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                         "arguments": {"id": sync_id}}).encode() + b"\n",
                   "guest-sync-delimited")
        deadline = time.monotonic() + timeout
        while True:
            while b"\xff" not in self._buf:
                self._buf = b""
                self._fill(deadline, "guest-sync-delimited")
            self._buf = self._buf[self._buf.index(b"\xff") + 1:]
            reply = self._read_json(deadline, "guest-sync-delimited")
            if reply.get("return") == sync_id:
                return

    def execute(self, cmd: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None, no_reply: bool = False) -> Any:
        """Run one agent command (after a resync); its `return` value."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            # A timeout keeps the connection: the next call's resync skips the late reply.
            self._sync(min(timeout, SYNC_TIMEOUT_S))
            msg: dict[str, Any] = {"execute": cmd}
            if arguments:
                msg["arguments"] = arguments
            self._send(json.dumps(msg).encode() + b"\n", cmd)
            if no_reply:
                return None
            reply = self._read_json(time.monotonic() + timeout, cmd)
            if "error" in reply:
                err = reply["error"]
                raise QGAError(str(err.get("class", "GenericError")),
                               str(err.get("desc", "")), cmd)
            return reply.get("return")

    # --- the commands the lab uses --------------------------------------------------
    def ping(self, *, timeout: float = SYNC_TIMEOUT_S) -> bool:
        """Whether an agent answers (VMware's toolsRunningStatus)."""
        try:
            self.execute("guest-ping", timeout=timeout)
            return True
        except QGAError:
            return False

    def fsfreeze_freeze(self, *, timeout: float = 60.0) -> int:
        """Freeze the guest's file systems (runs the fsfreeze hook); how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))

    def fsfreeze_thaw(self, *, timeout: float = 30.0) -> int:
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    def fsfreeze_status(self, *, timeout: float = SYNC_TIMEOUT_S) -> str:
        """"thawed" or "frozen"."""
        return str(self.execute("guest-fsfreeze-status", timeout=timeout))

    def file_read(self, path: str, *, max_bytes: int = 1 << 20,
                  timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
        handle = self.execute("guest-file-open", {"path": path, "mode": "r"}, timeout=timeout)
        try:
            data = b""
            while len(data) < max_bytes:
                chunk = self.execute("guest-file-read",
                                     {"handle": handle, "count": min(65536, max_bytes - len(data))},
                                     timeout=timeout)
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    break
            return data
        finally:
            self.execute("guest-file-close", {"handle": handle}, timeout=timeout)

    def exec(self, argv: list[str], *, input: bytes | None = None,
             timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run a program in the guest; (exit code, stdout, stderr). QGATimeout if it does
        not finish within `timeout` (it keeps running in the guest)."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = self.execute("guest-exec", args, timeout=min(timeout, DEFAULT_TIMEOUT_S))["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.execute("guest-exec-status", {"pid": pid},
                              timeout=min(timeout, DEFAULT_TIMEOUT_S))
            if st.get("exited"):
                return (int(st.get("exitcode", -1 if "signal" in st else 0)),
                        base64.b64decode(st.get("out-data", "")),
                        base64.b64decode(st.get("err-data", "")))
            if time.monotonic() >= deadline:
                raise QGATimeout(f"{argv[0]} still running after {timeout:.0f} s", "guest-exec")
            time.sleep(EXEC_POLL_S)

    def network_interfaces(self, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
        return list(self.execute("guest-network-get-interfaces", timeout=timeout))

    def host_name(self, *, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        return str(self.execute("guest-get-host-name", timeout=timeout)["host-name"])

    def first_ipv4(self, *, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
        """The first IPv4 address of the first interface that is not the loopback."""
        return first_ipv4(self.network_interfaces(timeout=timeout))


def first_ipv4(interfaces: list[dict[str, Any]]) -> str | None:
    for iface in interfaces:
        if iface.get("name") == "lo":
            continue
        for addr in iface.get("ip-addresses", []):
            ip = addr.get("ip-address", "")
            if addr.get("ip-address-type") == "ipv4" and not ip.startswith("127."):
                return str(ip)
    return None
