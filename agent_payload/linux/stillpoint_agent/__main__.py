"""Command line: `stillpoint-agent serve|install|uninstall|boot [--config FILE]`.

serve: the JSON-lines protocol on stdin/stdout. install: write the boot hook(s).
uninstall: remove the hook(s) and the agent directory. boot: the post-restore procedure.
One-shot commands print one JSON object.
"""

import argparse
import json
import os
import sys

from .config import effective
from .protocol import AgentError


def default_state_dir():
    """Outside the install directory, so that nothing the agent writes is ever part of (or
    mistaken for) its payload."""
    if os.geteuid() == 0:
        return "/var/lib/stillpoint-agent"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "stillpoint-agent")


def main(argv=None):
    install_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(prog="stillpoint-agent")
    parser.add_argument("command", choices=("serve", "install", "uninstall", "boot"))
    parser.add_argument("--config", default=os.path.join(install_dir, "config.json"))
    opts = parser.parse_args(argv)
    try:
        file_cfg = None
        if os.path.exists(opts.config):
            with open(opts.config) as fh:
                file_cfg = json.load(fh)
        cfg = effective(file_cfg)
        if opts.command == "serve":
            from .server import Server
            Server(cfg, install_dir, default_state_dir()).serve(sys.stdin, sys.stdout)
            return 0
        from . import lifecycle
        if opts.command == "install":
            out = lifecycle.install_boot_hooks(cfg, install_dir)
        elif opts.command == "uninstall":
            out = lifecycle.uninstall(cfg, install_dir, cfg["state_dir"] or default_state_dir())
        else:
            from .restore import run_boot
            return run_boot(cfg, install_dir)
        print(json.dumps({"ok": True, "result": out}))
        return 0
    except AgentError as err:
        print(json.dumps({"ok": False, "error": err.to_json()}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
