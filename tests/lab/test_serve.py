"""`stillpoint serve` against the lab's vCenter: scheduled firings run backups.

One lab (id 5) for the module with two VMs without guests (their disks get known blocks
written here) so that backups are quick. Every serve runs as a real `stillpoint serve`
process with its own history database, and is stopped (SIGTERM, then SIGKILL) in `finally`.
Firings come from vCenter itself: a task's schedule coming due, or RunScheduledTask.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from job_env import job_env
from backup_helpers import flat_file, scattered, write_blocks
from pyVmomi import vim

from appliance.jobs.history import History, RunRecord
from tests.hold_cli import HOLD_CLI
from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec
from appliance.profile import load_profile, write_private

pytestmark = pytest.mark.lab

LAB_ID = 5
VMS = ("sched-a", "sched-b")
STILLPOINT = [sys.executable, "-m", "appliance.cli"]
UTC = dt.UTC


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, loop devices, mounts)")
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, vms=tuple(
        VMSpec(name, has_guest=False, apps=(), disks=(DiskSpec.mib(64),)) for name in VMS))
    lab_down(cfg)
    handle = lab_up(cfg)
    try:
        for i, name in enumerate(VMS):
            write_blocks(flat_file(handle, name), scattered(1024, 40, seed=i), seed=i)
        yield handle
    finally:
        lab_down(cfg)


@pytest.fixture
def env(lab: Any, tmp_path: Path) -> dict[str, str]:
    return job_env(lab, tmp_path)


@pytest.fixture
def session(env: dict[str, str]) -> Iterator[Any]:
    from appliance.jobs import environment

    s = environment.open_vcenter(load_profile(env["STILLPOINT_PROFILE"]))
    try:
        yield s
    finally:
        _remove_all_tasks(s)
        s.close()


def _remove_all_tasks(s: Any) -> None:
    for task in s.content.scheduledTaskManager.scheduledTask:
        try:
            task.RemoveScheduledTask()
        except vim.fault.InvalidState:
            time.sleep(1)
            task.RemoveScheduledTask()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


class Serve:
    """A `stillpoint serve` process; its log is kept for assertions and failures."""

    def __init__(self, env: dict[str, str], log: Path, *args: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        command = HOLD_CLI if "STILLPOINT_HOLD_AT" in (extra_env or {}) else STILLPOINT
        self.proc = subprocess.Popen([*command, "serve", "--poll", "1", *args],
                                     env={**env, **(extra_env or {})}, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "watching vCenter" in self.text(), 30, "serve to start watching")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runs(env: dict[str, str], job: str) -> list[RunRecord]:
    h = History(Path(env["STILLPOINT_HISTORY"]))
    try:
        return h.runs(job, limit=100)
    finally:
        h.close()


def finished_runs(env: dict[str, str], job: str, count: int) -> list[RunRecord]:
    done = [r for r in runs(env, job) if r.status != "running"]
    return done if len(done) >= count else []


def task_of(s: Any, job: str) -> Any:
    for task in s.content.scheduledTaskManager.scheduledTask:
        if task.info.name == f"stillpoint: {job}":
            return task
    raise AssertionError(f"no task for job {job}")


def vm(s: Any, name: str) -> Any:
    from appliance.vsphere.inventory import find_vm

    return find_vm(s, name)


def stillpoint_snapshots(s: Any, name: str) -> list[str]:
    from appliance.vsphere.snapshots import find_snapshots

    return [snap.name for snap in find_snapshots(s, vm(s, name))]


def create(env: dict[str, str], job: str, *args: str) -> None:
    done = cli(env, "job", "create", job, *args)
    assert done.returncode == 0, done.stderr


# ---- tests ---------------------------------------------------------------------------


def test_firing_backs_up_the_jobs_vms_and_posts_events(env: dict[str, str], session: Any,
                                                       tmp_path: Path) -> None:
    from appliance.vsphere.events import recent_events

    since = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
    serve = Serve(env, tmp_path / "serve.log")
    try:
        # Fires by itself 4 s from now: vCenter's scheduler, not us.
        create(env, "fire", "--vm", VMS[0], "--vm", VMS[1], "--once", "+4",
               "--app-aware", "off")
        [run] = wait_for(lambda: finished_runs(env, "fire", 1), 90, "the firing's run")
    finally:
        serve.stop()
    assert run.status == "ok", (run, serve.text())
    assert run.trigger == "watch"
    fired = dt.datetime.fromisoformat(run.fired_at)
    started = dt.datetime.fromisoformat(run.started)
    assert dt.timedelta(0) <= started - fired < dt.timedelta(seconds=10)
    assert sorted(v.vm for v in run.vms) == sorted(VMS)
    for v in run.vms:
        assert v.outcome == "ok" and v.consistency == "crash" and v.restore_point
        assert v.bytes_read >= 40 * 65536 and v.seconds > 0
        events = recent_events(session, vm(session, v.vm), since)
        assert any(f"Stillpoint backup {run.job_id} succeeded" in e.message for e in events)
        assert any(e.type_name == "ScheduledTaskCompletedEvent" for e in events) or \
            v.vm != VMS[0]  # the task lives on the first VM
        assert stillpoint_snapshots(session, v.vm) == []
    # The restore points are in the repository, and `job show` lists the run per VM.
    listed = cli(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {p["vm"] for p in json.loads(listed.stdout)} == set(VMS)
    shown = cli(env, "job", "show", "fire", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["runs"][0]["status"] == "ok" and len(doc["runs"][0]["vms"]) == 2
    # The firing is run once only, however often serve re-reads the task.
    assert len(runs(env, "fire")) == 1


def test_schedule_and_definition_changed_in_vcenter_are_followed(
        env: dict[str, str], session: Any, tmp_path: Path) -> None:
    create(env, "moved", "--vm", VMS[0], "--vm", VMS[1], "--daily", "03:00",
           "--app-aware", "off")
    task = task_of(session, "moved")
    # An administrator moves the schedule in vCenter (not through Stillpoint) to run soon,
    # and drops the second VM from the definition in the description.
    run_at = (dt.datetime.now(UTC) + dt.timedelta(seconds=5)).replace(microsecond=0)
    spec = vim.scheduler.ScheduledTaskSpec(
        name=task.info.name, enabled=True, action=task.info.action,
        scheduler=vim.scheduler.OnceTaskScheduler(runAt=run_at),
        description=task.info.description.replace(
            f',"{vm(session, VMS[1])._moId}"', ""))
    task.ReconfigureScheduledTask(spec)
    shown = json.loads(cli(env, "job", "show", "moved", "--json").stdout)
    assert shown["schedule"].startswith("once at ") and len(shown["targets"]) == 1
    serve = Serve(env, tmp_path / "serve.log")
    try:
        [run] = wait_for(lambda: finished_runs(env, "moved", 1), 60, "the moved firing")
    finally:
        serve.stop()
    assert run.status == "ok", serve.text()
    fired = dt.datetime.fromisoformat(run.fired_at)
    assert abs((fired - run_at).total_seconds()) < 2
    assert [v.vm for v in run.vms] == [VMS[0]]


def test_killed_mid_run_cleans_up_on_the_next_firing(env: dict[str, str], session: Any,
                                                     tmp_path: Path) -> None:
    create(env, "crash", "--vm", VMS[0], "--daily", "04:00", "--app-aware", "off")
    log = tmp_path / "serve.log"
    serve = Serve(env, log, extra_env={"STILLPOINT_HOLD_AT": "snapshot-taken"})
    try:
        task_of(session, "crash").RunScheduledTask()
        wait_for(lambda: '"held": "snapshot-taken"' in serve.text(), 60, "the held backup")
        serve.kill()  # SIGKILL: no cleanup at all
    finally:
        serve.stop()
    assert len(stillpoint_snapshots(session, VMS[0])) == 1  # left behind
    [first] = runs(env, "crash")
    assert first.status == "running"

    serve = Serve(env, log)
    try:
        [interrupted] = wait_for(lambda: finished_runs(env, "crash", 1), 30, "the mark")
        assert interrupted.status == "interrupted"
        task_of(session, "crash").RunScheduledTask()
        done = wait_for(lambda: finished_runs(env, "crash", 2), 60, "the next firing")
    finally:
        serve.stop()
    newest = done[0]
    assert newest.status == "ok", serve.text()
    assert newest.fired_at != interrupted.fired_at  # the killed firing was not run again
    assert stillpoint_snapshots(session, VMS[0]) == []
    assert "removing stale snapshot" in serve.text()
    assert cli(env, "check").returncode == 0


def _overlap(run: RunRecord) -> bool:
    a, b = run.vms
    return a.started < b.finished and b.started < a.finished


def test_two_vms_back_up_concurrently_within_the_limits(lab: Any, env: dict[str, str],
                                                        session: Any, tmp_path: Path) -> None:
    create(env, "pair", "--vm", VMS[0], "--vm", VMS[1], "--daily", "05:00",
           "--app-aware", "off")
    for name in VMS:  # long enough backups for an overlap to be unmistakable
        lab.vcsim.set_knobs(name, snapshot_delay_s=2.0)
    try:
        serve = Serve(env, tmp_path / "serve2.log", "--max-vms", "2", "--per-host", "2")
        try:
            task_of(session, "pair").RunScheduledTask()
            [parallel] = wait_for(lambda: finished_runs(env, "pair", 1), 60, "parallel run")
        finally:
            serve.stop()
        # One host in the lab: a per-host limit of 1 serializes the same job.
        serve = Serve(env, tmp_path / "serve1.log", "--max-vms", "2", "--per-host", "1")
        try:
            task_of(session, "pair").RunScheduledTask()
            serial = wait_for(lambda: finished_runs(env, "pair", 2), 60, "serial run")[0]
        finally:
            serve.stop()
    finally:
        for name in VMS:
            lab.vcsim.set_knobs(name, snapshot_delay_s=0.0)
    assert parallel.status == "ok" and serial.status == "ok"
    assert _overlap(parallel), parallel.vms
    assert not _overlap(serial), serial.vms


def test_sigterm_lets_the_running_vm_finish_and_skips_the_rest(
        lab: Any, env: dict[str, str], session: Any, tmp_path: Path) -> None:
    create(env, "term", "--vm", VMS[0], "--vm", VMS[1], "--daily", "06:00",
           "--app-aware", "off", "--keep-last", "1")
    lab.vcsim.set_knobs(VMS[0], snapshot_delay_s=3.0)
    try:
        serve = Serve(env, tmp_path / "serve.log", "--max-vms", "1")
        try:
            task_of(session, "term").RunScheduledTask()
            wait_for(lambda: f"{VMS[0]}: backup job" in serve.text(), 30, "the first VM")
            assert serve.terminate(timeout=60) == 0
        finally:
            serve.stop()
    finally:
        lab.vcsim.set_knobs(VMS[0], snapshot_delay_s=0.0)
    [run] = runs(env, "term")
    assert run.status == "interrupted", serve.text()
    outcomes = {v.vm: v.outcome for v in run.vms}
    assert outcomes == {VMS[0]: "ok", VMS[1]: "skipped"}
    assert stillpoint_snapshots(session, VMS[0]) == []
    assert cli(env, "check").returncode == 0


def test_missed_firing_is_caught_up_and_lost_sessions_are_survived(
        env: dict[str, str], session: Any, tmp_path: Path) -> None:
    create(env, "missed", "--vm", VMS[1], "--daily", "07:00", "--app-aware", "off")
    task = task_of(session, "missed")
    # Fired while no serve was running: the next serve catches up (once).
    task.RunScheduledTask()
    wait_for(lambda: task.info.prevRunTime is not None and task.info.state != "running", 30,
             "the unattended firing")
    serve = Serve(env, tmp_path / "serve.log")
    try:
        [caught] = wait_for(lambda: finished_runs(env, "missed", 1), 60, "the catch-up run")
        assert caught.trigger == "catch-up" and caught.status == "ok", serve.text()
        # vCenter drops every other session (as after a restart of its session service).
        manager = session.content.sessionManager
        mine = manager.currentSession.key
        others = [s.key for s in manager.sessionList if s.key != mine]
        assert others
        manager.TerminateSession(others)
        task.RunScheduledTask()
        done = wait_for(lambda: finished_runs(env, "missed", 2), 90, "the run after")
    finally:
        serve.stop()
    assert done[0].status == "ok", serve.text()
    assert "reconnecting" in serve.text()  # the lost session was noticed and replaced
    assert len(runs(env, "missed")) == 2


def test_two_jobs_firing_together_share_the_service(env: dict[str, str], session: Any,
                                                    tmp_path: Path) -> None:
    create(env, "left", "--vm", VMS[0], "--daily", "08:00", "--app-aware", "off")
    create(env, "right", "--vm", VMS[1], "--daily", "08:00", "--app-aware", "off",
           "--keep-last", "1")
    serve = Serve(env, tmp_path / "serve.log")
    try:
        task_of(session, "left").RunScheduledTask()
        # `job run --wait` fires through vCenter and waits for serve's result.
        done = cli(env, "job", "run", "right", "--wait", "90")
        assert done.returncode == 0, done.stderr + serve.text()
        assert "run" in done.stdout and " ok" in done.stdout
        [left] = wait_for(lambda: finished_runs(env, "left", 1), 60, "the other job")
        # A second run of "right": retention keeps only the newest restore point of its VM.
        assert cli(env, "job", "run", "right", "--wait", "90").returncode == 0
    finally:
        serve.stop()
    newest = runs(env, "right")[0]
    assert left.status == "ok" and newest.status == "ok"
    assert newest.retention and len(newest.retention["forgot"]) == 1
    listed = json.loads(cli(env, "list", "--json", "--vm", VMS[1]).stdout)
    assert [p["id"] for p in listed] == [newest.vms[0].restore_point]


def test_vcenter_restart_is_survived(lab: Any, env: dict[str, str], tmp_path: Path) -> None:
    from stillpoint_lab.vcsim import BINARY_NAME, build_vcsim

    serve = Serve(env, tmp_path / "serve.log")
    try:
        home = lab.vcsim.state_dir / "vcsim"
        config = json.loads((home / "config.json").read_text())
        config["listen"] = f"0.0.0.0:{lab.vcsim.port}"  # the same address, cert, password
        restart = home / "config-restart.json"
        write_private(restart, json.dumps(config))
        lab.vcsim.stop()
        wait_for(lambda: "reconnecting" in serve.text(), 30, "serve to notice")
        (home / "ready.json").unlink(missing_ok=True)
        # The simulator builds its inventory anew and refuses existing VM directories: the
        # restarted vCenter has the same VMs (names, morefs) with fresh disks.
        for name in VMS:
            shutil.rmtree(Path(config["datastore_dir"]) / name, ignore_errors=True)
        with open(home / "vcsim.log", "ab") as log:
            proc = subprocess.Popen([BINARY_NAME, str(restart)], executable=str(build_vcsim()),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        (home / "vcsim.pid").write_text(f"{proc.pid}\n")  # lab_down stops it by this file
        wait_for(lambda: (home / "ready.json").exists(), 60, "vCenter to come back")
        wait_for(lambda: serve.text().count("watching vCenter") >= 2, 90, "serve to reconnect")
        # The simulator keeps no scheduled tasks across a restart: make the job again.
        create(env, "after-restart", "--vm", VMS[0], "--daily", "09:00", "--app-aware", "off")
        done = cli(env, "job", "run", "after-restart", "--wait", "90")
        assert done.returncode == 0, done.stderr + serve.text()
    finally:
        serve.stop()
    assert cli(env, "job", "delete", "after-restart").returncode == 0
