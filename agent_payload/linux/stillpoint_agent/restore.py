"""`stillpoint-agent boot`: the post-restore procedure, run once by the boot hook.

The restore marker is the JSON in guestinfo.stillpoint.restore (read with
`vmware-rpctool "info-get guestinfo.stillpoint.restore"`, which exits 1 when it is unset),
optionally completed by <install_dir>/restore/marker.json that the appliance wrote into the
restored image. Unset marker: this image was not restored by Stillpoint (e.g. the live VM
rebooted while the agent was installed): remove the hook and the agent, nothing else.

Marker: {"restore_point": id, "writers": {<writer name>: <that writer's thaw result, as
stored with the restore point, plus optional "pitr": {"target_time", "archive_dir"}>}}.
Per writer kind:
  postgresql: backup_label and tablespace_map put in the data directory, so recovery starts
    from the backup's checkpoint. Recovery must reach the backup's end (stop_wal_file, the
    segment pg_backup_stop wrote its end record to, after the snapshot): with a WAL archive
    that has it, recovery.signal + restore_command (+ recovery_target_time, promote);
    without one, the label is NOT placed (PostgreSQL would refuse to start) and the cluster
    does plain crash recovery of the atomic snapshot, which is consistent too. Why not
    always: the snapshot's pg_wal ends before pg_backup_stop ran.
  mariadb: crash recovery only; the binary-log position of the snapshot is reported.
Everything done goes to boot.log_path and a JSON result to boot.result_path.
"""

import json
import os
import pwd
import time

from . import lifecycle
from .proc import processes, run


def read_marker(cfg, install_dir):
    code, out = run(list(cfg["boot"]["marker_command"]), timeout=30)
    marker = None
    if code == 0 and out.strip():
        marker = json.loads(out)
    extra = os.path.join(install_dir, "restore", "marker.json")
    if marker is not None and os.path.isfile(extra):
        with open(extra) as fh:
            stored = json.load(fh)
        for name, entry in stored.get("writers", {}).items():
            marker.setdefault("writers", {}).setdefault(name, {})
            for key, value in entry.items():
                marker["writers"][name].setdefault(key, value)
    return marker


def _write_owned(path, text, uid, gid):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chown(path, uid, gid)


def _pg_running(data_dir):
    for pid, exe, _, _ in processes():
        if exe in ("postgres", "postmaster"):
            try:
                if os.readlink("/proc/%d/cwd" % pid) == data_dir:
                    return True
            except OSError:
                continue
    return False


def restore_postgresql(name, entry, log):
    data_dir = entry["data_dir"]
    st = os.stat(data_dir)
    done = {"writer": name, "data_dir": data_dir, "backup_label_placed": False}
    if _pg_running(data_dir):
        raise RuntimeError("%s is running; the restore hook must run before PostgreSQL" % data_dir)
    pitr = entry.get("pitr") or {}
    archive = pitr.get("archive_dir") or entry.get("archive_dir")
    stop = entry.get("stop_wal_file")
    in_pg_wal = bool(stop) and os.path.exists(os.path.join(data_dir, "pg_wal", stop))
    in_archive = bool(stop and archive) and os.path.exists(os.path.join(archive, stop))
    pid_file = os.path.join(data_dir, "postmaster.pid")
    if os.path.exists(pid_file):
        os.unlink(pid_file)   # stale from the snapshot of a running cluster
        log("removed stale %s" % pid_file)
    if not entry.get("backup_label") or not (in_pg_wal or in_archive):
        done["reason"] = ("WAL segment %s (backup end) is in neither pg_wal nor the archive: "
                          "crash recovery of the snapshot instead" % stop)
        log("%s: %s" % (name, done["reason"]))
        return done
    _write_owned(os.path.join(data_dir, "backup_label"), entry["backup_label"],
                 st.st_uid, st.st_gid)
    if entry.get("tablespace_map"):
        _write_owned(os.path.join(data_dir, "tablespace_map"), entry["tablespace_map"],
                     st.st_uid, st.st_gid)
    done["backup_label_placed"] = True
    log("%s: placed backup_label%s" % (name, " and tablespace_map"
                                         if entry.get("tablespace_map") else ""))
    if in_archive:
        settings = ["restore_command = 'cp \"%s/%%f\" \"%%p\"'" % archive.replace("'", "''")]
        if pitr.get("target_time"):
            settings += ["recovery_target_time = '%s'" % pitr["target_time"].replace("'", "''"),
                         "recovery_target_action = 'promote'"]
            done["target_time"] = pitr["target_time"]
        with open(os.path.join(data_dir, "postgresql.auto.conf"), "a") as fh:
            fh.write("# added by the Stillpoint restore\n" + "\n".join(settings) + "\n")
        _write_owned(os.path.join(data_dir, "recovery.signal"), "", st.st_uid, st.st_gid)
        done["archive_recovery"] = archive
        log("%s: archive recovery from %s%s" % (
            name, archive, " to %s" % pitr["target_time"] if pitr.get("target_time") else ""))
    return done


def restore_mariadb(name, entry, log):
    position = {k: entry.get(k) for k in ("binlog_file", "binlog_pos", "gtid")}
    log("%s: crash recovery at start; snapshot binlog position %s" % (name, position))
    return dict(position, writer=name)


HANDLERS = {"postgresql": restore_postgresql, "mariadb": restore_mariadb}


def _append(path, line):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(line + "\n")


def run_boot(cfg, install_dir):
    """Returns the process exit code; always removes the hook and the agent at the end."""
    try:
        marker = read_marker(cfg, install_dir)
        if marker is None:
            return 0
        log_path = cfg["boot"]["log_path"]

        def log(msg):
            _append(log_path, "%s %s" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), msg))

        log("restore point %s: post-restore starts" % marker.get("restore_point"))
        result = {"restore_point": marker.get("restore_point"), "ok": True, "writers": {}}
        for name, entry in sorted(marker.get("writers", {}).items()):
            handler = HANDLERS.get(entry.get("kind"))
            if handler is None:
                continue
            try:
                result["writers"][name] = dict(handler(name, entry, log), ok=True)
            except Exception as err:  # noqa: BLE001 - one writer must not stop the others
                result["ok"] = False
                result["writers"][name] = {"ok": False, "error": str(err)}
                log("%s: FAILED: %s" % (name, err))
        fd = os.open(cfg["boot"]["result_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
        log("post-restore done (ok=%s)" % result["ok"])
        return 0 if result["ok"] else 1
    finally:
        lifecycle.remove_boot_hooks(cfg)
        if lifecycle._is_agent_dir(install_dir):
            lifecycle.uninstall(cfg, install_dir)
