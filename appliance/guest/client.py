"""`AgentClient`: the appliance's side of the agent protocol (docs/protocol.md, version 1).

One typed method per operation. An `ok: false` answer becomes `AgentFailed` (a GuestError
carrying the agent's error code and the failing writer); no answer within the operation's
timeout closes the stream (the agent aborts the attempt and thaws on EOF) and raises
GuestError.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from appliance.errors import GuestError
from appliance.guest.channel import AgentStream

PROTOCOL_VERSION = 1

# Seconds to wait for each answer. thaw includes pg_backup_stop waiting for WAL archiving.
TIMEOUTS = {
    "hello": 30.0, "gather-metadata": 120.0, "prepare": 300.0, "freeze": 75.0,
    "thaw": 360.0, "status": 30.0, "backup-complete": 300.0, "uninstall": 60.0,
    "install-boot-hook": 60.0, "remove-boot-hook": 60.0,
}


class AgentFailed(GuestError):
    """The guest agent reported a failure."""

    def __init__(self, op: str, code: str, message: str, writer: str | None = None,
                 detail: Any = None) -> None:
        where = f"{writer}: " if writer and not message.startswith(writer) else ""
        super().__init__(f"agent {op} failed ({code}): {where}{message}")
        self.op, self.code, self.writer, self.detail = op, code, writer, detail


class AgentClient:
    def __init__(self, stream: AgentStream, timeouts: dict[str, float] | None = None) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._timeouts = dict(TIMEOUTS, **(timeouts or {}))
        self._closed = False
        self.protocol_version: int | None = None

    def request(self, op: str, args: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        if self._closed:
            raise GuestError("the agent session is closed")
        req_id = next(self._ids)
        self._stream.write_line(json.dumps(
            {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": args or {}}))
        wait = timeout if timeout is not None else self._timeouts.get(op, 60.0)
        try:
            line = self._stream.read_line(wait)
        except GuestError:
            self.close()   # the agent aborts on EOF: nothing stays frozen
            raise
        if line is None:
            self._closed = True
            raise GuestError(f"the agent exited during {op}: {self._stream.stderr_text()[-2000:]}")
        try:
            resp = json.loads(line)
        except ValueError as err:
            self.close()
            raise GuestError(f"the agent answered {op} with non-JSON: {line[:200]!r}") from err
        if resp.get("id") != req_id:
            self.close()
            raise GuestError(f"the agent answered request {resp.get('id')}, expected {req_id}")
        if not resp.get("ok"):
            error = resp.get("error") or {}
            raise AgentFailed(op, error.get("code", "unknown"),
                              error.get("message", "no message"), error.get("writer"),
                              error.get("detail"))
        result = resp.get("result") or {}
        result.setdefault("duration_ms", resp.get("duration_ms"))
        return result

    # --- operations ----------------------------------------------------------------------
    def hello(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"versions": [PROTOCOL_VERSION]}
        if config is not None:
            args["config"] = config
        result = self.request("hello", args)
        self.protocol_version = result["protocol_version"]
        return result

    def gather_metadata(self) -> dict[str, Any]:
        return self.request("gather-metadata")

    def prepare(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request("prepare", {"config": config} if config is not None else {})

    def freeze(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request("freeze", {"timeout_s": timeout_s} if timeout_s else {})

    def thaw(self) -> dict[str, Any]:
        return self.request("thaw")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def backup_complete(self, success: bool, restore_point: str | None,
                        truncate: bool = False) -> dict[str, Any]:
        return self.request("backup-complete", {"success": success, "restore_point": restore_point,
                                                "truncate": truncate})

    def install_boot_hook(self) -> dict[str, Any]:
        return self.request("install-boot-hook")

    def remove_boot_hook(self) -> dict[str, Any]:
        return self.request("remove-boot-hook")

    def uninstall(self) -> dict[str, Any]:
        result = self.request("uninstall")
        self.close()
        return result

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> int | None:
        if self._closed:
            return None
        self._closed = True
        return self._stream.close()
