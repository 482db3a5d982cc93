"""`stillpoint-agent boot`: the post-restore procedure, run once by the boot hook.

The restore marker is the JSON in guestinfo.stillpoint.restore (read with
`vmware-rpctool "info-get guestinfo.stillpoint.restore"`, which exits 1 when it is unset),
optionally completed by <install_dir>/restore/marker.json that the appliance wrote into the
restored image. Unset marker: this image was not restored by Stillpoint (e.g. the live VM
rebooted while the agent was installed): remove the hook and the agent, nothing else.

Marker: {"restore_point": id, "writers": {<writer name>: <that writer's thaw result, as
stored with the restore point, plus optional "pitr": {"archive_dir", "target_time" | "target_lsn"} (postgresql) or
{"binlog_dir", "stop_datetime"} (mariadb)>}}.
Per writer kind:
  postgresql: backup_label and tablespace_map put in the data directory, so recovery starts
    from the backup's checkpoint. Recovery must reach the backup's end (stop_wal_file, the
    segment pg_backup_stop wrote its end record to, after the snapshot): with a WAL archive
    that has it (e.g. one the appliance copied from a later restore point), recovery.signal +
    restore_command (+ recovery_target_time, promote); without one, the label is NOT placed
    (PostgreSQL would refuse to start: "WAL ends before end of online backup") and the
    cluster does plain crash recovery of the atomic snapshot, which is consistent too. The
    snapshot's own pg_wal never suffices: it ends before pg_backup_stop ran.
  mariadb: crash recovery at start; the binary-log position of the snapshot is reported.
    With "pitr": {"stop_datetime" (UTC, "YYYY-MM-DD HH:MM:SS"), "binlog_dir"}: a private
    server (no networking, own socket) replays the binary logs in binlog_dir from the recorded position
    up to stop_datetime with mariadb-binlog, then stops, all before the real server starts.
Everything done goes to boot.log_path and a JSON result to boot.result_path.
"""

import json
import os
import pwd
import subprocess
import time

from . import lifecycle
from .proc import processes, run, tail


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
    # Same directory by device and inode, not by name: a process in another mount
    # namespace (a container, a lab guest) may have a cwd of the same name elsewhere.
    want = os.stat(data_dir)
    for pid, exe, _, _ in processes():
        if exe in ("postgres", "postmaster"):
            try:
                st = os.stat("/proc/%d/cwd" % pid)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return True
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
    # Only an archive can end the backup: pg_backup_stop writes the end record after the
    # snapshot, so the snapshot's own pg_wal never holds it (its segment file may exist).
    in_archive = bool(stop and archive) and os.path.exists(os.path.join(archive, stop))
    pid_file = os.path.join(data_dir, "postmaster.pid")
    if os.path.exists(pid_file):
        os.unlink(pid_file)   # stale from the snapshot of a running cluster
        log("removed stale %s" % pid_file)
    if not entry.get("backup_label") or not in_archive:
        done["reason"] = ("WAL segment %s (backup end) is not in the archive: "
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
        for key in ("target_time", "target_lsn"):
            if pitr.get(key):
                settings += ["recovery_%s = '%s'" % (key, pitr[key].replace("'", "''")),
                             "recovery_target_action = 'promote'"]
                done[key] = pitr[key]
                break
        with open(os.path.join(data_dir, "postgresql.auto.conf"), "a") as fh:
            fh.write("# added by the Stillpoint restore\n" + "\n".join(settings) + "\n")
        _write_owned(os.path.join(data_dir, "recovery.signal"), "", st.st_uid, st.st_gid)
        done["archive_recovery"] = archive
        log("%s: archive recovery from %s%s" % (
            name, archive, " to %s" % (pitr.get("target_time") or pitr.get("target_lsn"))
            if pitr.get("target_time") or pitr.get("target_lsn") else ""))
    return done


def restore_mariadb(name, entry, log):
    position = {k: entry.get(k) for k in ("binlog_file", "binlog_pos", "gtid")}
    pitr = entry.get("pitr") or {}
    if not pitr.get("stop_datetime"):
        log("%s: crash recovery at start; snapshot binlog position %s" % (name, position))
        return dict(position, writer=name)
    return dict(_mariadb_replay(name, entry, pitr, log), writer=name, **position)


def _mariadb_replay(name, entry, pitr, log):
    """Binary logs from the snapshot's position up to stop_datetime (UTC, whole seconds:
    binlog event times have one-second resolution), replayed into a private server
    (no networking, own socket) that does the crash recovery first, then shut down.
    Its binary log stays on: crash recovery decides transactions that were prepared at
    the snapshot from it (rolled back, as they are not in it; the replay re-applies them)."""
    binlog_dir, first = pitr["binlog_dir"], entry.get("binlog_file")
    if not first:
        raise RuntimeError("no binary-log position was recorded: binary logging was off")
    base = first.rsplit(".", 1)[0]
    files = sorted(f for f in os.listdir(binlog_dir) if f.startswith(base + ".")
                   and f.rsplit(".", 1)[1].isdigit() and f >= first)
    if not files or files[0] != first:
        raise RuntimeError("%s is not in %s: cannot replay from the snapshot's position"
                           % (first, binlog_dir))
    # Before mariadb.service: /run (a tmpfs) has no /run/mysqld yet, which the service's
    # RuntimeDirectory would make; without it the server cannot open its socket or log.
    run_dir = "/run/mysqld"
    owner = os.stat(binlog_dir)            # the server's user owns its binary logs
    if not os.path.isdir(run_dir):
        os.mkdir(run_dir, 0o755)
        os.chown(run_dir, owner.st_uid, owner.st_gid)
    sock = run_dir + "/stillpoint-restore.sock"
    pid_file = run_dir + "/stillpoint-restore.pid"
    err_log = run_dir + "/stillpoint-restore.err"
    # As that user: mariadbd refuses to run as root, and Debian names the user only in
    # mariadb.service (User=mysql), not in my.cnf. What it says before its error log is
    # open (that refusal, a bad option) goes to stderr: kept for the error message.
    stderr_path = run_dir + "/stillpoint-restore.stderr"
    with open(stderr_path, "w") as stderr_file:
        server = subprocess.Popen(["mariadbd", "--user=" + pwd.getpwuid(owner.st_uid).pw_name,
                                   "--skip-networking", "--socket=" + sock,
                                   "--pid-file=" + pid_file, "--log-error=" + err_log],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=stderr_file, cwd="/", start_new_session=True)
    client = ["mariadb", "--no-defaults", "--socket=" + sock, "--user=root"]
    try:
        deadline = time.time() + 180
        while run(["mariadb-admin", "--no-defaults", "--socket=" + sock, "--user=root",
                   "--connect-timeout=2", "ping"], timeout=10)[0] != 0:
            if server.poll() is not None or time.time() > deadline:
                why = _tails(err_log, stderr_path) or "(no error log, no output)"
                raise RuntimeError("the private MariaDB server for the replay did not start: "
                                   + why)
            time.sleep(0.3)
        log("%s: replaying %s from position %s to %s UTC" % (
            name, ", ".join(files), entry.get("binlog_pos"), pitr["stop_datetime"]))
        dump = subprocess.Popen(
            ["mariadb-binlog", "--start-position=%d" % int(entry["binlog_pos"]),
             "--stop-datetime=" + pitr["stop_datetime"]]
            + [os.path.join(binlog_dir, f) for f in files],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
            env=dict(os.environ, TZ="UTC"))
        load = subprocess.run(client, stdin=dump.stdout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=1800)
        dump.stdout.close()
        dump_err = dump.stderr.read().decode("utf-8", "replace")
        if dump.wait() != 0 or load.returncode != 0:
            raise RuntimeError("binlog replay failed: %s %s" % (tail(dump_err), tail(load.stdout)))
    finally:
        run(["mariadb-admin", "--no-defaults", "--socket=" + sock, "--user=root", "shutdown"],
            timeout=120)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log("%s: binlog replay done" % name)
    return {"replayed": files, "stop_datetime": pitr["stop_datetime"]}


def _tails(*paths):
    out = []
    for path in paths:
        try:
            with open(path) as fh:
                text = tail(fh.read(), 1500)
        except OSError:
            continue
        if text:
            out.append(text)
    return " | ".join(out)


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
