"""The PostgreSQL writer: backup mode held in a live psql session across the snapshot.

prepare: CHECKPOINT, then pg_backup_start('stillpoint', fast => true) (PG >= 15; older:
pg_start_backup(label, true, false), the non-exclusive form) in a psql process that stays
open, because a non-exclusive backup ends when its session ends. post (after thaw):
pg_backup_stop(wait_for_archive => true) in that same session; its backup_label and
tablespace_map go back to the appliance, which stores them with the restore point.
complete(success, truncate): pg_archivecleanup on the WAL archive, keeping the backup's
start segment and everything after it.

Clusters are found from running postmasters: a postmaster's cwd is its data directory, and
its postmaster.pid names the port and the first socket directory. psql runs as the data
directory's owner over the unix socket (peer authentication: no password anywhere).
"""

import glob
import json
import os
import pwd
import shlex
import shutil

from ..proc import HeldSession, as_user, processes, run, tail
from ..protocol import WriterFailure
from . import Writer

# Version, archiving and tablespaces as one JSON row (json_build_object: PostgreSQL 9.4+;
# strings with newlines, an archive_command say, stay on the row's one line).
METADATA_SQL = (
    "SELECT json_build_object("
    "'version', current_setting('server_version_num')::int, "
    "'archive_mode', current_setting('archive_mode'), "
    "'archive_command', current_setting('archive_command'), "
    "'tablespaces', (SELECT coalesce(json_agg(json_build_object("
    "'name', spcname, 'location', pg_tablespace_location(oid))), '[]'::json) "
    "FROM pg_tablespace WHERE pg_tablespace_location(oid) <> ''));")
PSQL_ERRORS = ("ERROR:", "FATAL:", "PANIC:", "psql: error")


def _pg_binary(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name))
    return candidates[-1] if candidates else name


def archive_dir_from_command(command):
    """The directory an archive_command copies %f into (cp/test/rsync style), or None."""
    try:
        tokens = shlex.split(command or "")
    except ValueError:
        return None
    for tok in tokens:
        if tok.endswith("/%f") and tok.startswith("/"):
            return os.path.dirname(tok)
    return None


class PostgresWriter(Writer):
    kind = "postgresql"
    rank = 40

    def __init__(self, data_dir, socket_dir, port, os_user, archive_dir=None,
                 checkpoint=True, stop_timeout=300.0):
        super(PostgresWriter, self).__init__("postgresql:%s" % data_dir)
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.port = int(port)
        self.os_user = os_user
        self.archive_dir = archive_dir
        self.checkpoint = checkpoint
        self.stop_timeout = stop_timeout
        self.session = None
        self.version = None
        self.start = {}

    def _psql_argv(self):
        return as_user(self.os_user, [
            _pg_binary("psql"), "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=0",
            "-h", self.socket_dir, "-p", str(self.port), "-d", "postgres"])

    def _oneshot(self, sql):
        code, out = run(self._psql_argv() + ["-c", sql], timeout=30)
        if code != 0 or any(m in out for m in PSQL_ERRORS):
            raise WriterFailure("%s: %s" % (self.name, tail(out)))
        return [line for line in out.splitlines() if line.strip()]

    def _settings(self, query):
        version = int(query("SHOW server_version_num;")[0])
        archive_mode = query("SHOW archive_mode;")[0]
        archive_cmd = "\n".join(query("SHOW archive_command;"))
        return version, archive_mode, archive_cmd

    def metadata(self):
        meta = super(PostgresWriter, self).metadata()
        # One psql for all of it: each is a process start (a second on a TCG guest).
        rows = self._oneshot(METADATA_SQL)
        try:
            found = json.loads(rows[-1])
        except (IndexError, ValueError):
            raise WriterFailure("%s: unexpected answer to the metadata query: %s"
                                % (self.name, tail("\n".join(rows))))
        version, archive_mode = int(found["version"]), found["archive_mode"]
        archive_cmd, tablespaces = found["archive_command"], found["tablespaces"]
        archive_dir = self.archive_dir or archive_dir_from_command(archive_cmd)
        meta.update({
            "components": [{"data_dir": self.data_dir, "version": version, "port": self.port,
                            "socket_dir": self.socket_dir, "os_user": self.os_user,
                            "archive_mode": archive_mode, "archive_dir": archive_dir,
                            "tablespaces": tablespaces}],
            "files": [self.data_dir] + [t["location"] for t in tablespaces],
            "restore_method": "backup_label placement, recovery from pg_wal/WAL archive; "
                              "optional point-in-time (restore_command + recovery_target_time)",
        })
        return meta

    def prepare(self):
        self.session = HeldSession(self._psql_argv(), self.name, "\\echo {token}", PSQL_ERRORS)
        q = self.session.query
        self.version, _, archive_cmd = self._settings(q)
        self.archive_dir = self.archive_dir or archive_dir_from_command(archive_cmd)
        if self.checkpoint:
            q("CHECKPOINT;", timeout=120)
        if self.version >= 150000:
            row = q("SELECT l, pg_walfile_name(l) FROM "
                    "pg_backup_start('stillpoint', fast => true) AS l;", timeout=120)
        else:
            row = q("SELECT l, pg_walfile_name(l) FROM "
                    "pg_start_backup('stillpoint', true, false) AS l;", timeout=120)
        lsn, walfile = row[-1].split("|")
        self.start = {"start_lsn": lsn, "start_wal_file": walfile}

    def freeze(self):
        # Backup mode is already on; the file-system freeze holds the writes. Just make
        # sure the session that holds backup mode is still there.
        if not self.session or not self.session.alive():
            raise WriterFailure("%s: the psql session holding backup mode is gone" % self.name)

    def post(self):
        if self.version >= 150000:
            sql = ("SELECT lsn, pg_walfile_name(lsn), encode(convert_to(labelfile, 'UTF8'), "
                   "'hex'), encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') "
                   "FROM pg_backup_stop(wait_for_archive => true);")
        else:
            sql = ("SELECT lsn, pg_walfile_name(lsn), encode(convert_to(labelfile, 'UTF8'), "
                   "'hex'), encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') "
                   "FROM pg_stop_backup(false, true);")
        try:
            row = self.session.query(sql, timeout=self.stop_timeout)
        finally:
            self.session.close()
            self.session = None
        lsn, walfile, label_hex, map_hex = row[-1].split("|")
        return dict(self.start, **{
            "data_dir": self.data_dir, "version": self.version, "os_user": self.os_user,
            "archive_dir": self.archive_dir, "stop_lsn": lsn, "stop_wal_file": walfile,
            "backup_label": bytes.fromhex(label_hex).decode("utf-8"),
            "tablespace_map": bytes.fromhex(map_hex).decode("utf-8"),
        })

    def abort(self, reason):
        if self.session is None:
            return
        stop = "pg_backup_stop(false)" if (self.version or 0) >= 150000 else "pg_stop_backup(false)"
        try:
            if self.session.alive():
                self.session.query("SELECT 1 FROM %s;" % stop, timeout=30)
        except WriterFailure:
            pass    # ending the session below aborts the backup anyway
        finally:
            self.session.close()
            self.session = None

    def complete(self, success, truncate, saved):
        if not (success and truncate):
            return {"pruned": False}
        archive_dir = saved.get("archive_dir") or self.archive_dir
        if not archive_dir:
            return {"pruned": False, "reason": "no WAL archive directory known"}
        before = set(os.listdir(archive_dir))
        code, out = run(as_user(saved.get("os_user") or self.os_user, [
            _pg_binary("pg_archivecleanup"), archive_dir, saved["start_wal_file"]]), timeout=120)
        if code != 0:
            raise WriterFailure("%s: pg_archivecleanup failed: %s" % (self.name, tail(out)))
        removed = sorted(before - set(os.listdir(archive_dir)))
        return {"pruned": True, "archive_dir": archive_dir, "kept_from": saved["start_wal_file"],
                "removed": removed}


def _read_postmaster_pid(data_dir):
    with open(os.path.join(data_dir, "postmaster.pid")) as fh:
        lines = fh.read().splitlines()
    # 1 pid, 2 data dir, 3 start time, 4 port, 5 first socket dir, 6 listen addr, ...
    return int(lines[3]), (lines[4] if len(lines) > 4 else "") or "/var/run/postgresql"


def discover(cfg, skipped):
    pcfg = cfg["postgresql"]
    found = {}
    if pcfg["discover"]:
        procs = processes()
        pids = {pid: exe for pid, exe, _, _ in procs}
        for pid, exe, _, ppid in procs:
            if exe not in ("postgres", "postmaster") or pids.get(ppid) in ("postgres", "postmaster"):
                continue
            try:
                data_dir = os.readlink("/proc/%d/cwd" % pid)
                port, sock = _read_postmaster_pid(data_dir)
                owner = pwd.getpwuid(os.stat(data_dir).st_uid).pw_name
            except (OSError, ValueError, IndexError, KeyError) as err:
                skipped.append({"writer": "postgresql:pid %d" % pid, "reason": str(err)})
                continue
            found[data_dir] = {"data_dir": data_dir, "socket_dir": sock, "port": port,
                               "os_user": owner}
    for entry in pcfg["clusters"]:
        merged = dict(found.get(entry["data_dir"], {}), **entry)
        found[entry["data_dir"]] = merged
    out = []
    for data_dir, c in sorted(found.items()):
        if "port" not in c or "socket_dir" not in c:
            try:
                c.setdefault("port", _read_postmaster_pid(data_dir)[0])
                c.setdefault("socket_dir", _read_postmaster_pid(data_dir)[1])
            except (OSError, ValueError, IndexError) as err:
                skipped.append({"writer": "postgresql:%s" % data_dir,
                                "reason": "not running: %s" % err})
                continue
        out.append(PostgresWriter(c["data_dir"], c["socket_dir"], c["port"],
                                  c.get("os_user", "postgres"), c.get("archive_dir"),
                                  bool(pcfg["checkpoint"])))
    return out
