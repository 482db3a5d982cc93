"""The MariaDB/MySQL writer: commits blocked in a live client session across the snapshot.

MariaDB (10.4+): prepare = BACKUP STAGE START, FLUSH; freeze = BACKUP STAGE BLOCK_DDL,
BLOCK_COMMIT, then the binary log position and GTID are read (they are exact while commits
are blocked); thaw = BACKUP STAGE END. MySQL: FLUSH TABLES WITH READ LOCK at freeze,
UNLOCK TABLES at thaw. The client connects as root over the server's unix socket (socket
authentication: no password). complete(success, truncate): PURGE BINARY LOGS TO the
binary log that was current at the snapshot.
"""

import os
import shutil

from ..proc import HeldSession, as_user, processes, run, tail, unix_sockets_of
from ..protocol import WriterFailure
from . import Writer

CLIENT_ERRORS = ("ERROR ",)


def _client():
    return shutil.which("mariadb") or shutil.which("mysql") or "mysql"


def _quote(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MariaDBWriter(Writer):
    kind = "mariadb"
    rank = 30

    def __init__(self, socket, os_user="root", user="root"):
        super(MariaDBWriter, self).__init__("mariadb:%s" % socket)
        self.socket = socket
        self.os_user = os_user
        self.user = user
        self.session = None
        self.is_mariadb = True
        self.position = {}
        self.locked = False
        self.connection_id = None

    def _argv(self):
        return as_user(self.os_user, [
            _client(), "--no-defaults", "--batch", "--skip-column-names", "--raw",
            "--unbuffered", "--force", "--socket=" + self.socket, "--user=" + self.user])

    def _oneshot(self, sql):
        code, out = run(self._argv(), input_text=sql + "\n", timeout=60)
        if code != 0 or any(m in out for m in CLIENT_ERRORS):
            raise WriterFailure("%s: %s" % (self.name, tail(out)))
        return [line for line in out.splitlines() if line.strip()]

    def metadata(self):
        meta = super(MariaDBWriter, self).metadata()
        rows = self._oneshot("SELECT VERSION(), @@datadir, @@log_bin, "
                             "IFNULL(@@log_bin_basename, '');")
        version, datadir, log_bin, basename = rows[0].split("\t")
        meta.update({
            "components": [{"socket": self.socket, "version": version, "datadir": datadir,
                            "log_bin": log_bin == "1", "log_bin_basename": basename or None}],
            "files": [datadir] + ([os.path.dirname(basename)] if basename else []),
            "restore_method": "crash recovery (InnoDB); optional binary-log replay from the "
                              "recorded position up to a point in time",
        })
        return meta

    def prepare(self):
        self.session = HeldSession(self._argv(), self.name, "SELECT '{token}';", CLIENT_ERRORS)
        version, connection = self.session.query("SELECT VERSION(), CONNECTION_ID();")[-1] \
            .split("\t")
        self.is_mariadb = "mariadb" in version.lower()
        self.connection_id = int(connection)
        if self.is_mariadb:
            self.session.query("BACKUP STAGE START;", timeout=60)
            self.locked = True
            self.session.query("BACKUP STAGE FLUSH;", timeout=60)

    def freeze(self):
        def q(sql, cap=20.0):
            return self.session.query(sql, timeout=self.time_left(cap))

        if self.is_mariadb:
            q("BACKUP STAGE BLOCK_DDL;")
            q("BACKUP STAGE BLOCK_COMMIT;")
            gtid = q("SELECT @@gtid_binlog_pos;")
        else:
            q("FLUSH TABLES WITH READ LOCK;")
            self.locked = True
            gtid = q("SELECT @@gtid_executed;")
        status = q("SHOW MASTER STATUS;")
        self.position = {"binlog_file": None, "binlog_pos": None,
                         "gtid": gtid[-1] if gtid else ""}
        if status:
            fields = status[0].split("\t")
            self.position.update(binlog_file=fields[0], binlog_pos=int(fields[1]))

    def _release(self):
        try:
            if self.locked and self.session.alive():
                self.session.query("BACKUP STAGE END;" if self.is_mariadb else "UNLOCK TABLES;")
        finally:
            abandoned = not self.session.alive()
            self.locked = False
            self.session.close()   # the session's end releases any lock anyway
            self.session = None
            if abandoned and self.connection_id is not None:
                # A client killed mid-statement (a stage that outran the freeze limit) leaves
                # its statement waiting in the server: end the connection there.
                self._kill_connection()

    def _kill_connection(self):
        try:
            self._oneshot("KILL CONNECTION %d;" % self.connection_id)
        except WriterFailure as err:
            if "Unknown thread id" not in str(err):
                raise

    def thaw(self):
        self._release()

    def abort(self, reason):
        if self.session is not None:
            try:
                self._release()
            except WriterFailure:
                pass

    def post(self):
        return dict(self.position, socket=self.socket)

    def complete(self, success, truncate, saved):
        if not (success and truncate):
            return {"purged": False}
        if not saved.get("binlog_file"):
            return {"purged": False, "reason": "binary logging is off"}
        self._oneshot("PURGE BINARY LOGS TO %s;" % _quote(saved["binlog_file"]))
        return {"purged": True, "purged_before": saved["binlog_file"]}


def discover(cfg, skipped):
    mcfg = cfg["mariadb"]
    found = {}
    if mcfg["discover"]:
        for pid, exe, _, _ in processes():
            if exe not in ("mariadbd", "mysqld"):
                continue
            sockets = unix_sockets_of(pid)
            if not sockets:
                skipped.append({"writer": "mariadb:pid %d" % pid,
                                "reason": "no unix socket found"})
                continue
            found[sockets[0]] = {"socket": sockets[0]}
    for entry in mcfg["instances"]:
        found[entry["socket"]] = dict(found.get(entry["socket"], {}), **entry)
    return [MariaDBWriter(e["socket"], e.get("os_user", "root"), e.get("user", "root"))
            for _, e in sorted(found.items())]
