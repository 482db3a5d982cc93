"""The JSON-lines protocol loop: read a request, answer it, until EOF or `uninstall`.

EOF on stdin means the appliance (or its SSH connection) is gone: any attempt in progress
is aborted at once, which thaws everything. SIGTERM and SIGHUP do the same.
"""

import os
import platform
import signal
import socket
import sys
import time
import traceback

from . import AGENT_VERSION, PROTOCOL_VERSIONS, lifecycle
from .protocol import (BAD_REQUEST, INTERNAL, OPS, UNKNOWN_OP, UNSUPPORTED_VERSION,
                       AgentError, decode_request, encode)
from .session import BackupSession


def host_facts():
    facts = {"hostname": socket.gethostname(), "kernel": platform.release(),
             "machine": platform.machine(), "python": platform.python_version(),
             "euid": os.geteuid(), "pid": os.getpid(), "os": None}
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    facts["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return facts


def _bool_arg(args, name, default=None):
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise AgentError(BAD_REQUEST, "'%s' must be true or false" % name)
    return value


class Server(object):
    def __init__(self, cfg, install_dir, state_dir):
        self.install_dir = install_dir
        self.session = BackupSession(cfg, state_dir)
        self.done = False

    def handle(self, op, args):
        s = self.session
        if op == "hello":
            offered = args.get("versions", [1])
            common = [v for v in PROTOCOL_VERSIONS if v in offered]
            if not common:
                raise AgentError(UNSUPPORTED_VERSION, "agent speaks versions %s, client offers %s"
                                 % (list(PROTOCOL_VERSIONS), offered))
            if args.get("config") is not None:
                s.configure(args["config"])
            return {"protocol_version": max(common), "agent_version": AGENT_VERSION,
                    "capabilities": {"ops": list(OPS), "max_freeze_s": 60,
                                     "writers": ["filesystem", "postgresql", "mariadb", "hooks"]},
                    "host": host_facts(), "install_dir": self.install_dir}
        if op == "gather-metadata":
            return s.gather_metadata()
        if op == "prepare":
            if args.get("config") is not None:
                s.configure(args["config"])
            return s.prepare()
        if op == "freeze":
            timeout = args.get("timeout_s")
            if timeout is not None and not isinstance(timeout, (int, float)):
                raise AgentError(BAD_REQUEST, "'timeout_s' must be a number")
            return s.freeze(timeout)
        if op == "thaw":
            return s.thaw()
        if op == "status":
            return s.status()
        if op == "backup-complete":
            attempt = args.get("attempt")
            if attempt is not None and not isinstance(attempt, str):
                raise AgentError(BAD_REQUEST, "'attempt' must be a string")
            return s.backup_complete(_bool_arg(args, "success"), args.get("restore_point"),
                                     _bool_arg(args, "truncate", False), attempt)
        if op == "install-boot-hook":
            return lifecycle.install_boot_hooks(s.cfg, self.install_dir)
        if op == "remove-boot-hook":
            return lifecycle.remove_boot_hooks(s.cfg)
        if op == "uninstall":
            s.abort("uninstall requested")
            self.done = True
            return lifecycle.uninstall(s.cfg, self.install_dir, s.state_dir)
        raise AgentError(UNKNOWN_OP, "unknown operation %r" % op)

    def respond(self, line):
        start = time.monotonic()
        req_id = None
        try:
            req = decode_request(line)
            req_id = req.get("id")
            if req.get("v", 1) not in PROTOCOL_VERSIONS:
                raise AgentError(UNSUPPORTED_VERSION, "protocol version %r is not supported"
                                 % req.get("v"))
            result = self.handle(req["op"], req.get("args", {}))
            resp = {"ok": True, "result": result}
        except AgentError as err:
            resp = {"ok": False, "error": err.to_json()}
        except Exception as err:  # noqa: BLE001 - a bug must still answer, not kill the loop
            traceback.print_exc(file=sys.stderr)
            resp = {"ok": False, "error": {"code": INTERNAL, "message": "%s: %s"
                                           % (type(err).__name__, err)}}
        resp.update(v=PROTOCOL_VERSIONS[-1], id=req_id,
                    duration_ms=int(round((time.monotonic() - start) * 1000)))
        return encode(resp)

    def serve(self, stdin, stdout):
        def on_signal(signum, _frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        try:
            while not self.done:
                line = stdin.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                stdout.write(self.respond(line))
                stdout.flush()
        finally:
            self.session.abort("client disconnected")
