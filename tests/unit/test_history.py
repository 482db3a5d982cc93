"""The job history (appliance/jobs/history.py): claiming a firing exactly once, across
threads and processes; interrupted runs; per-VM records; schema and file mode."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.jobs.history import History, HistoryError, VMRecord, firing_key, now_iso

pytestmark = pytest.mark.unit


def test_a_firing_is_claimed_once(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    key = firing_key(dt.datetime(2026, 1, 1, 2, 30, tzinfo=dt.UTC))
    first = h.claim("nightly", "scheduledtask-1", key, "job-1", "watch")
    assert first is not None
    assert h.claim("nightly", "scheduledtask-1", key, "job-2", "catch-up") is None
    assert h.seen("scheduledtask-1", key)
    # Another task firing at the same moment is another firing.
    assert h.claim("other", "scheduledtask-2", key, "job-3", "watch") is not None
    [run] = h.runs("nightly")
    assert (run.id, run.job_id, run.status, run.trigger) == (first, "job-1", "running", "watch")


def test_firing_key_is_canonical_utc() -> None:
    naive = dt.datetime(2026, 5, 1, 12, 0, 0, 5)
    cet = dt.datetime(2026, 5, 1, 14, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert firing_key(naive) == firing_key(cet) == "2026-05-01T12:00:00.000005+00:00"


def test_concurrent_claims_in_threads_yield_one_winner(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        rid = h.claim("j", "t", "2026-01-01T00:00:00.000000+00:00", "x", "watch")
        if rid is not None:
            wins.append(rid)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def _claim_in_process(path: str, queue: multiprocessing.Queue[bool]) -> None:
    h = History(Path(path))
    queue.put(h.claim("j", "t", "2026-01-01T00:00:00.000000+00:00", "x", "watch") is not None)


def test_concurrent_claims_in_processes_yield_one_winner(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sqlite")
    History(Path(path)).close()
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[bool] = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(path, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [queue.get(timeout=10) for _ in procs]
    assert results.count(True) == 1


def test_runs_of_dead_processes_are_marked_interrupted(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    rid = h.claim("j", "t", "k1", "x", "watch")
    assert rid is not None
    # A run claimed by a process that has exited since.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    h._db.execute("UPDATE runs SET pid=? WHERE id=?", (int(dead.stdout), rid))
    live = h.claim("j", "t", "k2", "y", "watch")
    assert live is not None
    h._db.execute("UPDATE runs SET pid=1 WHERE id=?", (live,))  # pid 1 is alive
    assert h.mark_interrupted() == [rid]
    statuses = {r.id: r.status for r in h.runs("j")}
    assert statuses == {rid: "interrupted", live: "running"}


def test_vm_records_and_finish(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    rid = h.claim("j", "t", "k", "x", "manual")
    assert rid is not None
    h.add_vm(rid, VMRecord("web1", "ok", now_iso(), now_iso(), 12.5, 1 << 20, 4096,
                           "application", "rp1"))
    h.add_vm(rid, VMRecord("db1", "failed", now_iso(), now_iso(), 3.0,
                           error="snapshot failed"))
    h.finish(rid, "partial", "some VMs failed", {"forgot": ["a"], "prune": "ok"})
    with pytest.raises(ValueError):
        h.finish(rid, "running")
    h.close()
    [run] = History(tmp_path / "h.sqlite").runs()
    assert run.status == "partial" and run.finished and run.retention == {"forgot": ["a"],
                                                                          "prune": "ok"}
    assert [(v.vm, v.outcome, v.bytes_read, v.consistency, v.error) for v in run.vms] == [
        ("web1", "ok", 1 << 20, "application", None),
        ("db1", "failed", 0, None, "snapshot failed")]


def test_skipped_claims_are_final_and_newest_first(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    h.claim("j", "t", "k1", "", "catch-up", "skipped", "too old")
    h.claim("j", "t", "k2", "x", "watch")
    newest, oldest = h.runs("j")
    assert (newest.fired_at, newest.status) == ("k2", "running")
    assert (oldest.status, oldest.message, oldest.finished is not None) == ("skipped",
                                                                            "too old", True)


def test_file_is_private_and_schema_checked(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "h.sqlite"
    History(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    h = History(path)
    h._db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    h.close()
    with pytest.raises(HistoryError, match="schema 99"):
        History(path)
