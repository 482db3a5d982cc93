"""Protocol constants and the error type every operation raises.

Grammar (one JSON object per line, UTF-8):
    request  = {"v": 1, "id": <int|str>, "op": <name>, "args": {...}}
    response = {"v": 1, "id": <same>, "ok": true,  "result": {...}, "duration_ms": <int>}
             | {"v": 1, "id": <same>, "ok": false, "error": {"code", "message", "writer"?},
                "duration_ms": <int>}
"""

import json

OPS = (
    "hello", "gather-metadata", "prepare", "freeze", "thaw", "status", "backup-complete",
    "uninstall", "install-boot-hook", "remove-boot-hook",
)

# Error codes (stable strings; the appliance maps them to its own errors).
BAD_REQUEST = "bad-request"              # not JSON, missing fields, bad argument types
UNSUPPORTED_VERSION = "unsupported-version"
UNKNOWN_OP = "unknown-op"
BAD_STATE = "bad-state"                  # e.g. freeze before prepare
WRITER_FAILED = "writer-failed"          # a writer failed; `writer` names it
FREEZE_EXPIRED = "freeze-expired"        # the watchdog thawed before the thaw request
ABORTED = "aborted"                      # the attempt was aborted (disconnect, signal)
CONFIG_INVALID = "config-invalid"
INTERNAL = "internal"                    # a bug: the message has the exception


class AgentError(Exception):
    """An error with a protocol code; `writer` names the writer that failed, if any."""

    def __init__(self, code, message, writer=None, detail=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.writer = writer
        self.detail = detail

    def to_json(self):
        err = {"code": self.code, "message": self.message}
        if self.writer:
            err["writer"] = self.writer
        if self.detail is not None:
            err["detail"] = self.detail
        return err


class WriterFailure(Exception):
    """Raised by writers; the session adds the writer's name and maps it to WRITER_FAILED."""


def decode_request(line):
    try:
        req = json.loads(line)
    except ValueError as err:
        raise AgentError(BAD_REQUEST, "request is not JSON: %s" % err)
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise AgentError(BAD_REQUEST, "request must be an object with a string 'op'")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise AgentError(BAD_REQUEST, "'args' must be an object")
    return req


def encode(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
