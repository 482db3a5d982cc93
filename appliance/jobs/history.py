"""The job history: an embedded SQLite database on the appliance (one file, 0600).

Two tables:

    runs     one row per firing of a job: (task, fired_at) is UNIQUE, and a run is
             *claimed* by inserting that row before any work starts. So a firing is run at
             most once, also across restarts, reconnects and catch-up: whoever fails to
             insert the row does not run the job.
    vm_runs  one row per VM of a run: outcome, seconds, bytes read/new, consistency,
             restore point, error, start and end.

A run's status: running -> ok | warning | failed | partial | interrupted | skipped. A row left
`running` by a process that died (its pid is gone) is marked `interrupted` by the next
`stillpoint serve` (`mark_interrupted`); its VMs' stale snapshots are removed by the next
backup of each VM. Times are ISO 8601 UTC strings.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import StillpointError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL,
    task        TEXT NOT NULL,          -- scheduled task moref, or "manual"
    fired_at    TEXT NOT NULL,          -- the firing's time as vCenter reports it
    job_id      TEXT NOT NULL,          -- the backup job id (snapshot names, events)
    trigger     TEXT NOT NULL,          -- watch | catch-up | manual
    status      TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    started     TEXT NOT NULL,
    finished    TEXT,
    message     TEXT NOT NULL DEFAULT '',
    retention   TEXT,                   -- JSON: what forget/prune did
    UNIQUE (task, fired_at)
);
CREATE TABLE IF NOT EXISTS vm_runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    vm            TEXT NOT NULL,
    outcome       TEXT NOT NULL,        -- ok | warning | failed | skipped
    started       TEXT NOT NULL,
    finished      TEXT NOT NULL,
    seconds       REAL NOT NULL,
    bytes_read    INTEGER NOT NULL DEFAULT 0,
    bytes_new     INTEGER NOT NULL DEFAULT 0,
    consistency   TEXT,
    restore_point TEXT,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id);
CREATE INDEX IF NOT EXISTS vm_runs_run ON vm_runs (run_id);
"""

FINAL = ("ok", "warning", "failed", "partial", "interrupted", "skipped")


class HistoryError(StillpointError):
    """The job history database cannot be used."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def firing_key(t: datetime) -> str:
    """The canonical text of a firing time (UTC, microseconds) used in the UNIQUE key."""
    t = t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    return t.isoformat(timespec="microseconds")


@dataclass
class VMRecord:
    vm: str
    outcome: str
    started: str
    finished: str
    seconds: float
    bytes_read: int = 0
    bytes_new: int = 0
    consistency: str | None = None
    restore_point: str | None = None
    error: str | None = None


@dataclass
class RunRecord:
    id: int
    job: str
    task: str
    fired_at: str
    job_id: str
    trigger: str
    status: str
    pid: int
    started: str
    finished: str | None
    message: str
    retention: dict[str, Any] | None
    vms: list[VMRecord] = field(default_factory=list)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class History:
    """The history database. Thread-safe: one connection guarded by a lock (writes are
    tiny; SQLite's own locking protects against a second process such as `job show`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise HistoryError(f"job history {path} has schema {row[0]}, this Stillpoint "
                                   f"knows {SCHEMA_VERSION}")
        except sqlite3.Error as err:
            raise HistoryError(f"job history {path}: {err}") from err

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                raise HistoryError(f"job history {self.path}: {err}") from err

    # --- writing ------------------------------------------------------------------------
    def claim(self, job: str, task: str, fired_at: str, job_id: str, trigger: str,
              status: str = "running", message: str = "") -> int | None:
        """Record a firing before running it; None if it was claimed already (never run a
        firing twice). A non-running status records a firing that is not run (skipped)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO runs (job, task, fired_at, job_id, trigger, status, pid,"
                " started, finished, message) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job, task, fired_at, job_id, trigger, status, os.getpid(), now_iso(),
                 None if status == "running" else now_iso(), message))
            return cur.lastrowid if cur.rowcount == 1 else None

    def seen(self, task: str, fired_at: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM runs WHERE task=? AND fired_at=?",
                                   (task, fired_at)).fetchone()
        return row is not None

    def add_vm(self, run_id: int, rec: VMRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO vm_runs (run_id, vm, outcome, started, finished, seconds,"
                " bytes_read, bytes_new, consistency, restore_point, error)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, rec.vm, rec.outcome, rec.started, rec.finished, rec.seconds,
                 rec.bytes_read, rec.bytes_new, rec.consistency, rec.restore_point, rec.error))

    def finish(self, run_id: int, status: str, message: str = "",
               retention: dict[str, Any] | None = None) -> None:
        if status not in FINAL:
            raise ValueError(f"not a final status: {status}")
        with self._tx() as db:
            db.execute("UPDATE runs SET status=?, finished=?, message=?, retention=? WHERE id=?",
                       (status, now_iso(), message,
                        json.dumps(retention) if retention is not None else None, run_id))

    def mark_interrupted(self) -> list[int]:
        """Runs left `running` by a process that is gone: mark them interrupted."""
        with self._tx() as db:
            rows = db.execute("SELECT id, pid FROM runs WHERE status='running'").fetchall()
            dead = [rid for rid, pid in rows if pid == os.getpid() or not _pid_alive(pid)]
            for rid in dead:
                db.execute("UPDATE runs SET status='interrupted', finished=?, message="
                           "'the service stopped during the run; stale snapshots are removed "
                           "by the next run' WHERE id=?", (now_iso(), rid))
        return dead

    # --- reading ------------------------------------------------------------------------
    def runs(self, job: str | None = None, limit: int = 20) -> list[RunRecord]:
        """The newest `limit` runs (of one job, or all), newest first, with their VMs."""
        with self._lock:
            if job is None:
                rows = self._db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?",
                                        (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM runs WHERE job=? ORDER BY id DESC "
                                        "LIMIT ?", (job, limit)).fetchall()
            out = []
            for r in rows:
                rec = RunRecord(id=r[0], job=r[1], task=r[2], fired_at=r[3], job_id=r[4],
                                trigger=r[5], status=r[6], pid=r[7], started=r[8],
                                finished=r[9], message=r[10],
                                retention=json.loads(r[11]) if r[11] else None)
                vms = self._db.execute(
                    "SELECT vm, outcome, started, finished, seconds, bytes_read, bytes_new,"
                    " consistency, restore_point, error FROM vm_runs WHERE run_id=? ORDER BY id",
                    (rec.id,)).fetchall()
                rec.vms = [VMRecord(*v) for v in vms]
                out.append(rec)
        return out


def default_history_path() -> Path:
    """$STILLPOINT_HISTORY, else /var/lib/stillpoint/history.sqlite for root (the
    appliance), else ~/.local/share/stillpoint/history.sqlite."""
    raw = os.environ.get("STILLPOINT_HISTORY")
    if raw:
        return Path(raw).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/stillpoint/history.sqlite")
    return Path("~/.local/share/stillpoint/history.sqlite").expanduser()
