"""Install and remove the boot hook, and remove the agent itself.

The boot hook is what makes the agent useful at restore time: the agent directory and the
hook are on a backed-up disk, so they are inside the snapshot. On the live guest both are
removed after every backup (`uninstall`). In a restored image, the hook runs
`stillpoint-agent boot` once (restore.py), which removes the hook and the agent after it.

Hook forms: an executable in each of `boot.hook_dirs` (the lab's init runs
/etc/stillpoint/boot.d/* before it starts databases), and a systemd unit when
`boot.systemd_dir` is set (e.g. /etc/systemd/system when that is on the VM's disk), enabled
by a multi-user.target.wants symlink so no systemctl call is needed. `Before=` alone does
not order template instances (Debian runs PostgreSQL as postgresql@15-main.service, and
`Before=postgresql.service` left it starting 15 s before the procedure had finished on a
real Debian guest), so the database units also get a drop-in `After=` the hook unit; the
drop-ins go with the unit.
"""

import os
import shutil

from .protocol import BAD_REQUEST, AgentError

HOOK_NAME = "stillpoint-restore"
UNIT_NAME = "stillpoint-restore.service"

HOOK_SCRIPT = """#!/bin/sh
# Stillpoint post-restore hook (docs/protocol.md "Restore at boot"). Runs the agent once;
# the agent removes this hook and itself. Without the agent, remove this hook and stop.
if [ -x '{agent}' ]; then exec '{agent}' boot; fi
rm -f -- "$0"
exit 0
"""

UNIT = """[Unit]
Description=Stillpoint post-restore (runs once, then removes itself)
DefaultDependencies=no
After=local-fs.target
Before=postgresql.service mariadb.service mysql.service

[Service]
Type=oneshot
ExecStart={agent} boot

[Install]
WantedBy=multi-user.target
"""


# Units whose instances must start after the post-restore procedure (templates included).
ORDERED_UNITS = ("postgresql@.service", "postgresql.service", "mariadb.service",
                 "mysql.service")
DROPIN_NAME = "50-stillpoint-restore.conf"
DROPIN = """[Unit]
# Stillpoint: in a restored VM, start after the post-restore procedure (removed with it).
After=%s
""" % UNIT_NAME


def _dropin_paths(sd):
    return [os.path.join(sd, unit + ".d", DROPIN_NAME) for unit in ORDERED_UNITS]


def agent_path(install_dir):
    return os.path.join(install_dir, "stillpoint-agent")


def _write(path, text, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def hook_paths(cfg):
    paths = [os.path.join(d, HOOK_NAME) for d in cfg["boot"]["hook_dirs"]]
    sd = cfg["boot"]["systemd_dir"]
    if sd:
        paths += [os.path.join(sd, UNIT_NAME),
                  os.path.join(sd, "multi-user.target.wants", UNIT_NAME)]
        paths += _dropin_paths(sd)
    return paths


def install_boot_hooks(cfg, install_dir):
    agent = agent_path(install_dir)
    if "'" in agent:
        raise AgentError(BAD_REQUEST, "install directory must not contain a quote")
    written = []
    for d in cfg["boot"]["hook_dirs"]:
        path = os.path.join(d, HOOK_NAME)
        _write(path, HOOK_SCRIPT.format(agent=agent), 0o755)
        written.append(path)
    sd = cfg["boot"]["systemd_dir"]
    if sd:
        unit = os.path.join(sd, UNIT_NAME)
        _write(unit, UNIT.format(agent=agent), 0o644)
        link = os.path.join(sd, "multi-user.target.wants", UNIT_NAME)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(unit, link)
        written += [unit, link]
        for dropin in _dropin_paths(sd):
            _write(dropin, DROPIN, 0o644)
            written.append(dropin)
    return {"installed": written}


def remove_boot_hooks(cfg):
    removed = []
    for path in hook_paths(cfg):
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(path)
            if path.endswith(".d/" + DROPIN_NAME):
                try:
                    os.rmdir(os.path.dirname(path))   # only if we left it empty
                except OSError:
                    pass
    return {"removed": removed}


def _is_agent_dir(path):
    """Refuse to delete anything that does not look like our install directory."""
    real = os.path.realpath(path)
    return (real.count("/") >= 2 and os.path.isfile(os.path.join(real, "MANIFEST.sha256"))
            and os.path.isdir(os.path.join(real, "stillpoint_agent")))


def uninstall(cfg, install_dir, state_dir=None):
    result = remove_boot_hooks(cfg)
    if not _is_agent_dir(install_dir):
        raise AgentError(BAD_REQUEST, "%s does not look like an agent directory; not removed"
                         % install_dir)
    shutil.rmtree(install_dir)
    result["removed"].append(install_dir)
    result["removed"].extend(_remove_state(state_dir))
    return result


def _remove_state(state_dir):
    """The saved results of the last attempt, and their directory if nothing else is in it."""
    if not state_dir or not os.path.isdir(state_dir):
        return []
    removed = []
    for name in ("last_backup.json", "last_backup.json.tmp"):
        path = os.path.join(state_dir, name)
        if os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    try:
        os.rmdir(state_dir)
        removed.append(state_dir)
    except OSError:
        pass                      # something else lives there: leave it
    return removed
