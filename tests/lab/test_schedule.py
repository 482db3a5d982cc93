"""Jobs as vCenter scheduled tasks: `stillpoint job create|list|show|edit|delete` against
the lab's vCenter (lab id 4, two VMs without guests), checked through pyVmomi as an
administrator's tools would see them; plus the description encoding and schedule parsing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from job_env import job_env
from pyVmomi import vim

from appliance.errors import UsageError
from appliance.jobs.schedule import (
    MARKER,
    JobDefinition,
    decode_description,
    encode_description,
    parse_schedule,
)
from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec
from appliance.profile import load_profile

pytestmark = pytest.mark.lab

LAB_ID = 4
VMS = ("jobs-a", "jobs-b")
STILLPOINT = [sys.executable, "-m", "appliance.cli"]
UTC = dt.UTC


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, loop devices, mounts)")
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, vms=tuple(
        VMSpec(name, has_guest=False, apps=(), disks=(DiskSpec.mib(16),)) for name in VMS))
    lab_down(cfg)
    handle = lab_up(cfg)
    try:
        yield handle
    finally:
        lab_down(cfg)


@pytest.fixture
def env(lab: Any, tmp_path: Path) -> dict[str, str]:
    return job_env(lab, tmp_path)


@pytest.fixture
def si(env: dict[str, str]) -> Iterator[Any]:
    from appliance.jobs import environment

    s = environment.open_vcenter(load_profile(env["STILLPOINT_PROFILE"]))
    try:
        yield s
    finally:
        for task in s.content.scheduledTaskManager.scheduledTask:
            task.RemoveScheduledTask()
        s.close()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def find(s: Any, name: str, kind: type = vim.VirtualMachine) -> Any:
    view = s.content.viewManager.CreateContainerView(s.content.rootFolder, [kind], True)
    try:
        return next(o for o in view.view if o.name == name)
    finally:
        view.DestroyView()


def wait_done(task: Any) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = task.info
        if info.prevRunTime is not None and info.state in ("success", "error"):
            return info
        time.sleep(0.2)
    raise AssertionError("the scheduled task did not finish")


def test_job_create_makes_a_scheduled_task_that_vcenter_lists(env: dict[str, str],
                                                              si: Any) -> None:
    done = cli(env, "job", "create", "nightly", "--vm", VMS[0], "--vm", VMS[1],
               "--daily", "02:30", "--keep-last", "7", "--keep-daily", "14",
               "--app-aware", "try")
    assert done.returncode == 0, done.stderr
    first, second = find(si, VMS[0]), find(si, VMS[1])
    [task] = si.content.scheduledTaskManager.RetrieveEntityScheduledTask(first)
    info = task.info
    assert info.name == "stillpoint: nightly" and info.enabled
    assert isinstance(info.scheduler, vim.scheduler.DailyTaskScheduler)
    assert (info.scheduler.hour, info.scheduler.minute) == (2, 30)
    assert info.action.name.info.wsdlName == "RefreshStorageInfo"  # the harmless action on a VM
    now = dt.datetime.now(UTC)
    expected = now.replace(hour=2, minute=30, second=0, microsecond=0)
    expected += dt.timedelta(days=1) if expected <= now else dt.timedelta(0)
    assert info.nextRunTime == expected
    # The definition is in the description, readable by people and by Stillpoint.
    assert f"{VMS[0]}, {VMS[1]}" in info.description
    defn = decode_description("nightly", info.description)
    assert defn.targets == (first._moId, second._moId)
    assert defn.keep == {"last": 7, "daily": 14} and defn.app_aware == "try"

    # Firing it changes nothing in the VM: same config version, power state, no snapshot.
    before = (first.config.changeVersion, first.runtime.powerState, first.snapshot)
    task.RunScheduledTask()
    assert wait_done(task).state == "success"
    assert (first.config.changeVersion, first.runtime.powerState, first.snapshot) == before

    listed = json.loads(cli(env, "job", "list", "--json").stdout)
    assert [j["name"] for j in listed] == ["nightly"]
    assert listed[0]["schedule"] == "every day at 02:30 UTC"


def test_folder_job_lives_on_the_folder_and_fires_harmlessly(env: dict[str, str],
                                                             si: Any) -> None:
    done = cli(env, "job", "create", "everything", "--folder", "DC0/vm", "--weekly",
               "sat,sun@22:00", "--app-aware", "off")
    assert done.returncode == 0, done.stderr
    folder = si.content.searchIndex.FindByInventoryPath("DC0/vm")
    [task] = si.content.scheduledTaskManager.RetrieveEntityScheduledTask(folder)
    assert task.info.action.name.info.wsdlName == "Reload"
    assert task.info.scheduler.saturday and task.info.scheduler.sunday
    assert not task.info.scheduler.monday
    task.RunScheduledTask()
    assert wait_done(task).state == "success", task.info.error


def test_edit_changes_the_task_in_vcenter_and_delete_removes_it(env: dict[str, str],
                                                                si: Any) -> None:
    assert cli(env, "job", "create", "edited", "--vm", VMS[1], "--hourly", "4",
               "--minute", "10").returncode == 0
    done = cli(env, "job", "edit", "edited", "--weekly", "mon,fri@01:15", "--keep-last", "3",
               "--disable")
    assert done.returncode == 0, done.stderr
    [task] = si.content.scheduledTaskManager.RetrieveEntityScheduledTask(find(si, VMS[1]))
    s = task.info.scheduler
    assert isinstance(s, vim.scheduler.WeeklyTaskScheduler)
    assert (s.monday, s.friday, s.tuesday, s.hour, s.minute) == (True, True, False, 1, 15)
    assert not task.info.enabled
    assert decode_description("edited", task.info.description).keep == {"last": 3}

    # An administrator edits the schedule in vCenter: `job show` reports vCenter's value.
    spec = vim.scheduler.ScheduledTaskSpec(
        name=task.info.name, description=task.info.description, enabled=True,
        action=task.info.action, scheduler=vim.scheduler.DailyTaskScheduler(hour=5, minute=45))
    task.ReconfigureScheduledTask(spec)
    shown = json.loads(cli(env, "job", "show", "edited", "--json").stdout)
    assert shown["schedule"] == "every day at 05:45 UTC" and shown["enabled"]

    # A broken definition is reported, not ignored.
    spec.description = "someone rewrote this\n" + MARKER + '{"targets": ["vm-1"], "kep": {}}'
    task.ReconfigureScheduledTask(spec)
    listed = cli(env, "job", "list")
    assert "BROKEN" in listed.stdout and "kep" in listed.stdout

    assert cli(env, "job", "delete", "edited").returncode == 0
    assert si.content.scheduledTaskManager.RetrieveEntityScheduledTask(find(si, VMS[1])) == []


@pytest.mark.parametrize(("args", "code", "message"), [
    (("job", "show", "nope"), 3, "no job 'nope'"),
    (("job", "create", "bad", "--vm", VMS[0], "--daily", "25:00"), 2, "not a time of day"),
    (("job", "create", "bad", "--vm", VMS[0]), 2, "exactly one schedule"),
    (("job", "create", "bad", "--vm", "no-such-vm", "--daily", "01:00"), 3, "no VM named"),
    (("job", "create", "bad name", "--vm", VMS[0], "--daily", "01:00"), 2, "job name"),
    (("job", "edit", "nope", "--daily", "01:00"), 3, "no job 'nope'"),
])
def test_clear_errors_with_exit_codes(env: dict[str, str], args: tuple[str, ...], code: int,
                                      message: str) -> None:
    done = cli(env, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr


def test_duplicate_job_is_refused(env: dict[str, str], si: Any) -> None:
    assert cli(env, "job", "create", "twice", "--vm", VMS[0], "--daily", "01:00").returncode == 0
    done = cli(env, "job", "create", "twice", "--vm", VMS[1], "--daily", "01:00")
    assert done.returncode == 2 and "exists already" in done.stderr


# ---- the encoding and the schedule words (no vCenter needed) ---------------------------


def test_description_round_trip_and_refusals() -> None:
    defn = JobDefinition("n1", ("vm-1", "folder:DC0/vm/prod"), {"last": 2, "weekly": 4},
                         "require", copy_only=True)
    text = encode_description(defn, ["web1", "folder DC0/vm/prod"])
    assert decode_description("n1", text) == defn
    assert "web1" in text.splitlines()[0]
    for bad, why in [("no marker here", "no 'stillpoint-job/1' line"),
                     (MARKER + "{not json", "not valid JSON"),
                     (MARKER + '{"targets": "vm-1"}', "targets must be a list"),
                     (MARKER + '{"targets": ["vm-1"], "keep": {"hourly": 1}}', "keep.hourly"),
                     (MARKER + '{"targets": ["vm-1"], "app_aware": "maybe"}', "app_aware")]:
        with pytest.raises(UsageError, match=why):
            decode_description("n1", bad)
    # The last marker line wins (an admin may append a corrected one).
    fixed = text + "\n" + MARKER + '{"targets": ["vm-9"]}'
    assert decode_description("n1", fixed).targets == ("vm-9",)


def test_parse_schedule_words() -> None:
    assert (parse_schedule(daily="7:05").hour, parse_schedule(daily="7:05").minute) == (7, 5)
    weekly = parse_schedule(weekly="fri,Mon@23:59")
    assert weekly.days == ("monday", "friday") and (weekly.hour, weekly.minute) == (23, 59)
    hourly = parse_schedule(hourly=6, minute=30)
    assert (hourly.kind, hourly.interval, hourly.minute) == ("hourly", 6, 30)
    once = parse_schedule(once="2030-01-02T03:04:00Z")
    assert once.run_at == dt.datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    for kwargs in ({}, {"daily": "1:00", "hourly": 1}, {"weekly": "xyz@01:00"},
                   {"daily": "12"}, {"once": "tomorrow"}):
        with pytest.raises(UsageError):
            parse_schedule(**kwargs)  # type: ignore[arg-type]
