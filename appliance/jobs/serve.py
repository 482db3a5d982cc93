"""`stillpoint serve`: the appliance's service. vCenter's scheduler fires, Stillpoint backs up.

    connect to vCenter; mark runs a dead process left `running` as interrupted
    loop:
        read every scheduled task (one PropertyCollector round trip)
        for each Stillpoint job whose task has a prevRunTime not in the history:
            claim (task, prevRunTime) in the history       <- before any work: never twice
            start the job in its own thread (serve_run.run_firing)
        wait for a change of any task's info (WaitForUpdatesEx, at most `poll_s`)
    on a lost session / vCenter restart: reconnect with backoff; the first read after
    (re)connecting is the catch-up: a firing missed meanwhile shows as a prevRunTime that
    the history does not have, and runs if it is younger than `catch_up_s` (older ones are
    recorded as skipped, so nobody wonders). vCenter keeps one prevRunTime per task, so
    several firings missed while disconnected are one catch-up run.
    on SIGTERM/SIGINT: stop watching, start nothing new, let running VM backups finish
    (serve_run), then return.

A firing of a job that is still running from an earlier firing is recorded as skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.errors import StillpointError
from appliance.jobs import environment
from appliance.jobs.backup import new_job_id
from appliance.jobs.history import History, firing_key
from appliance.jobs.schedule import Job, job_of
from appliance.jobs.serve_limits import Limits, LimitSettings
from appliance.jobs.serve_run import RunContext, run_firing
from appliance.profile import Profile
from appliance.progress import Progress
from appliance.vsphere.scheduled_tasks import TaskWatcher, list_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    limits: LimitSettings = field(default_factory=LimitSettings)
    catch_up_s: float = 6 * 3600.0   # run a missed firing if it is at most this old
    poll_s: int = 5                  # longest WaitForUpdatesEx; also the stop latency
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


class Service:
    def __init__(self, opts: ServeOptions, profile: Profile, history: History,
                 progress: Progress) -> None:
        self.opts = opts
        self.profile = profile
        self.history = history
        self.progress = progress
        self.stop_event = threading.Event()
        self.limits = Limits(opts.limits)
        self._running: dict[str, threading.Thread] = {}  # job name -> its run
        self._lock = threading.Lock()
        self.connected = threading.Event()

    def stop(self) -> None:
        """Ask the service to stop (signal handlers call this)."""
        self.stop_event.set()

    # --- the main loop ------------------------------------------------------------------
    def run(self) -> None:
        for rid in self.history.mark_interrupted():
            self.progress.event(f"run {rid} was interrupted by an earlier stop of the service")
        delay = self.opts.reconnect_min_s
        while not self.stop_event.is_set():
            try:
                self._watch()
                continue
            except StillpointError as err:
                why = str(err)
            except Exception as err:  # the service must outlive any one error
                # e.g. a pooled connection that vCenter's restart broke (ssl.SSLEOFError).
                log.warning("watch loop failed", exc_info=True)
                why = f"unexpected {type(err).__name__}: {err}"
            if self.connected.is_set():  # it had worked: start the backoff afresh
                delay = self.opts.reconnect_min_s
            self.connected.clear()
            self.progress.event(f"vCenter: {why}; reconnecting in {delay:.0f} s")
            self.stop_event.wait(delay)
            delay = min(delay * 2, self.opts.reconnect_max_s)
        self.progress.event("stopping: waiting for running jobs to reach a safe point")
        self._join_all()
        self.progress.event("stopped")

    def _watch(self) -> None:
        session = environment.open_vcenter(self.profile)
        watcher = None
        try:
            watcher = TaskWatcher(session)
            self.connected.set()
            self.progress.event(f"watching vCenter {session.endpoint.address} for scheduled "
                                "tasks")
            trigger = "catch-up"
            while not self.stop_event.is_set():
                self._dispatch([j for j in map(job_of, list_tasks(session)) if j], trigger)
                trigger = "watch"
                watcher.wait(self.opts.poll_s)
        finally:
            if watcher is not None:
                watcher.close()
            session.close()

    # --- firings ------------------------------------------------------------------------
    def _dispatch(self, jobs: list[Job], trigger: str) -> None:
        now = datetime.now(UTC)
        for job in jobs:
            fired = job.task.prev_run
            if fired is None:
                continue
            key = firing_key(fired)
            if self.history.seen(job.task.moref, key):
                continue
            self._reap()
            if job.definition is None:
                self.history.claim(job.name, job.task.moref, key, "", trigger, "skipped",
                                   job.problem or "unreadable definition")
                self.progress.event(f"job {job.name} fired but cannot run: {job.problem}")
                continue
            if trigger == "catch-up" and (now - fired).total_seconds() > self.opts.catch_up_s:
                self.history.claim(job.name, job.task.moref, key, "", trigger, "skipped",
                                   f"fired at {key} while the service was not watching; older "
                                   "than the catch-up window")
                continue
            if job.name in self._running:
                self.history.claim(job.name, job.task.moref, key, "", trigger, "skipped",
                                   "the previous run of this job was still running")
                self.progress.event(f"job {job.name} fired again while still running: skipped")
                continue
            job_id = f"{job.name}-{new_job_id()}"
            run_id = self.history.claim(job.name, job.task.moref, key, job_id, trigger)
            if run_id is None:
                continue  # another process claimed it between seen() and claim()
            self.progress.event(f"job {job.name}: task fired at {key} ({trigger}); "
                                f"starting run {run_id}", job=job.name, run=run_id)
            self._start(job, run_id, job_id)

    def _start(self, job: Job, run_id: int, job_id: str) -> None:
        assert job.definition is not None
        ctx = RunContext(self.profile, self.history, self.limits, self.stop_event,
                         self.progress)
        defn = job.definition

        def target() -> None:
            try:
                run_firing(ctx, defn, run_id, job_id)
            except Exception as err:
                log.exception("job %s crashed", defn.name)
                self.history.finish(run_id, "failed", f"internal error: {err}")

        thread = threading.Thread(target=target, name=f"job-{job.name}", daemon=True)
        with self._lock:
            self._running[job.name] = thread
        thread.start()

    def _reap(self) -> None:
        with self._lock:
            for name, thread in list(self._running.items()):
                if not thread.is_alive():
                    del self._running[name]

    def _join_all(self) -> None:
        while True:
            with self._lock:
                threads = list(self._running.values())
            if not any(t.is_alive() for t in threads):
                return
            for t in threads:
                t.join(timeout=1.0)

    def wait_idle(self, timeout: float) -> bool:
        """True once no job is running (tests, `job run --wait`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap()
            with self._lock:
                if not self._running:
                    return True
            time.sleep(0.1)
        return False
