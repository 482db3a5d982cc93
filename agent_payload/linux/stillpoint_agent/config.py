"""The per-VM agent configuration: defaults, and merging what the appliance sends.

The appliance sends a JSON object (in `hello` or `prepare` args as "config", or as the
installed config.json). Unknown keys are rejected so that typos do not silently drop a
writer. See docs/protocol.md "Configuration".
"""

import copy

from .protocol import CONFIG_INVALID, AgentError

MAX_FREEZE_S = 60.0

DEFAULTS = {
    "freeze_timeout_s": MAX_FREEZE_S,
    "writers": {"include": None, "exclude": []},
    "filesystems": {"include": None, "exclude": [], "allow_root": False},
    "postgresql": {"discover": True, "clusters": [], "checkpoint": True},
    "mariadb": {"discover": True, "instances": []},
    "hooks": {
        "dirs": ["/etc/stillpoint/hooks.d", "/etc/vmware-tools/backupScripts.d"],
        "pre_freeze_script": "/usr/sbin/pre-freeze-script",
        "post_thaw_script": "/usr/sbin/post-thaw-script",
        "timeout_s": 30.0,
    },
    "boot": {
        "hook_dirs": ["/etc/stillpoint/boot.d"],
        "systemd_dir": None,
        "marker_command": ["vmware-rpctool", "info-get guestinfo.stillpoint.restore"],
        "log_path": "/var/log/stillpoint-restore.log",
        "result_path": "/var/log/stillpoint-restore.json",
    },
    "state_dir": None,
}


def merge(base, update, path="config"):
    """Deep-merge `update` into a copy of `base`; unknown keys are a CONFIG_INVALID error."""
    if not isinstance(update, dict):
        raise AgentError(CONFIG_INVALID, "%s must be an object" % path)
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise AgentError(CONFIG_INVALID, "unknown setting %s.%s" % (path, key))
        if isinstance(base[key], dict) and value is not None:
            out[key] = merge(base[key], value, "%s.%s" % (path, key))
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective(*updates):
    cfg = copy.deepcopy(DEFAULTS)
    for upd in updates:
        if upd:
            cfg = merge(cfg, upd)
    timeout = cfg["freeze_timeout_s"]
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_FREEZE_S:
        raise AgentError(CONFIG_INVALID, "freeze_timeout_s must be in (0, %d]" % MAX_FREEZE_S)
    return cfg


def writer_selected(cfg, kind, name):
    sel = cfg["writers"]
    if kind in sel["exclude"] or name in sel["exclude"]:
        return False
    inc = sel["include"]
    return inc is None or kind in inc or name in inc
