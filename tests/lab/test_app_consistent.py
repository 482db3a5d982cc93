"""Application-consistent backups through the Linux agent, under a continuous workload.

Each restore point's image is booted as a fresh lab guest (the way a restored VM boots):
its PostgreSQL and MariaDB must start with the workload's invariants intact and MyISAM's
CHECK TABLE clean. The same is done for images taken with the agent disabled, and the
difference is reported (not asserted: a crash-consistent image may be lucky).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.jobs import environment
from appliance.jobs.backup import BackupOptions, run_backup
from appliance.jobs.consistency import ConsistencyPolicy
from stillpoint_lab import guest as lab_guest
from stillpoint_lab import workload
from appliance.profile import load_profile
from appliance.progress import NullProgress
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.vsphere import events, inventory
from appliance.vsphere.snapshots import find_snapshots

STILLPOINT = [sys.executable, "-m", "appliance.cli"]
VM = "lab-vm1"


@pytest.fixture(scope="module")
def running_workload(lab: Any) -> Iterator[Any]:
    handle = workload.start_workload(lab.guests[VM], rate=40)
    try:
        time.sleep(2)
        yield handle
    finally:
        workload.stop_workload(handle)


class _Events(NullProgress):
    """Progress that calls `on_event` for each event (to act between attempts)."""

    def __init__(self, on_event: Any) -> None:
        super().__init__()
        self.on_event = on_event
        self.seen: list[str] = []

    def event(self, message: str, **fields: Any) -> None:
        self.seen.append(message)
        self.on_event(message)


def run_job(profile_path: Path, progress: Any = None, **policy: Any) -> Any:
    profile = load_profile(profile_path)
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile)
    try:
        opts = BackupOptions(targets=(VM,), policy=ConsistencyPolicy(**policy))
        [result] = run_backup(opts, profile, session, repo, DatastoreHTTPReader(session),
                              progress or NullProgress())
        return result
    finally:
        session.close()


def boot_image(lab: Any, profile_path: Path, rp_id: str, tmp_path: Path, index: int,
               ) -> tuple[workload.InvariantReport | None, str, bool]:
    """Restore disk 0 of a restore point, check the agent is in the image, boot it as a new
    guest; (invariants or None if the apps did not start, error text, agent_in_image)."""
    repo = environment.open_repository(load_profile(profile_path))
    image = tmp_path / f"image-{index}.raw"
    point = repo.get(rp_id)
    repo.restore_disk_to(point, point.disks[0].key, image)
    mnt = tmp_path / f"mnt-{index}"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(mnt)], check=True)
    try:
        agent_in_image = (mnt / "opt/stillpoint/agent/stillpoint-agent").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    name = f"boot{index}"
    try:
        g = lab_guest.start_guest(lab.config, 30 + index, name, [image], format_disks=False)
        return workload.check_invariants(g), "", agent_in_image
    except Exception as err:  # noqa: BLE001 - reported: an image that does not start
        return None, str(err), agent_in_image
    finally:
        lab_guest.stop_guest(lab.config, name)


def live_agent_files(lab: Any) -> str:
    out = lab.guests[VM].run(["find", "/opt/stillpoint", "/etc/stillpoint/boot.d", "-mindepth", "1"])
    return out.stdout.strip()


def test_application_consistent_images_start_clean_under_load(
        lab: Any, running_workload: Any, profile_path: Path, tmp_path: Path,
        record_property: Any) -> None:
    report = []
    for run in range(3):
        result = run_job(profile_path, app_aware="require")
        assert result.ok, result.error
        assert result.consistency == "application"
        assert live_agent_files(lab) == "", "the agent must be gone from the live guest"
        inv, err, agent_in_image = boot_image(lab, profile_path, result.restore_point,
                                              tmp_path, run)
        assert agent_in_image, "the agent must be inside the backed-up image"
        assert inv is not None, f"application-consistent image did not start: {err}"
        assert inv.ok, f"invariants broken in an application-consistent image: {inv}"
        report.append(("application", inv.ok, inv.myisam_check))
        crash = run_job(profile_path, app_aware="off")
        assert crash.ok and crash.consistency == "crash"
        inv, err, _ = boot_image(lab, profile_path, crash.restore_point, tmp_path, 10 + run)
        report.append(("crash", bool(inv and inv.ok),
                       inv.myisam_check if inv else f"did not start: {err}"))
    record_property("consistency_report", json.dumps(report))
    print("consistency report (level, invariants ok, MyISAM CHECK TABLE):", report)


def test_failing_writer_is_retried_then_reported_and_nothing_truncated(
        lab: Any, running_workload: Any, profile_path: Path) -> None:
    g = lab.guests[VM]
    hook = "/etc/stillpoint/hooks.d/50-busy"
    archive_before, binlogs_before = _wal_archive(g), _binlogs(g)
    g.run(["sh", "-c", f"mkdir -p /etc/stillpoint/hooks.d && printf '%s\\n' '#!/bin/sh' "
           f"'[ \"$1\" = freeze ] && {{ echo \"ledger is busy\" >&2; exit 3; }}' 'exit 0' "
           f"> {hook} && chmod 755 {hook}"])
    since = datetime.now(UTC) - timedelta(seconds=5)
    try:
        result = run_job(profile_path, app_aware="require", attempts=2, backoff_s=0.1)
    finally:
        g.run(["rm", "-f", hook])
    assert not result.ok
    assert result.exit_code == 8
    assert "ledger is busy" in (result.error or "")
    assert "after 2 attempts" in (result.error or "")
    assert live_agent_files(lab) == ""
    # Nothing truncated after a failure: every archived WAL and binlog is still there.
    assert archive_before <= _wal_archive(g)
    assert binlogs_before <= _binlogs(g)
    profile = load_profile(profile_path)
    session = environment.open_vcenter(profile)
    try:
        vm = inventory.find_vm(session, VM)
        assert not find_snapshots(session, vm)
        posted = [e.message for e in events.recent_events(session, vm, since)]
    finally:
        session.close()
    assert any("failed" in m and "ledger is busy" in m for m in posted), posted


def test_logs_truncated_after_success(lab: Any, running_workload: Any,
                                      profile_path: Path) -> None:
    g = lab.guests[VM]
    for _ in range(3):   # several archived WAL segments and binary logs before the backup
        g.run(["runuser", "-u", "postgres", "--", "psql", "-h", "/run/postgresql", "-qAtc",
               "SELECT pg_switch_wal()"])
        g.run(["mariadb", "-e", "FLUSH BINARY LOGS"])
    time.sleep(2)   # let the archiver copy them
    archive_before, binlogs_before = _wal_archive(g), _binlogs(g)
    result = run_job(profile_path, app_aware="require")
    assert result.ok, result.error
    pg = next(v for k, v in (result.truncation or {}).get("completed", {}).get(
        "writers", {}).items() if k.startswith("postgresql"))
    assert pg, result.truncation
    archive_after, binlogs_after = _wal_archive(g), _binlogs(g)
    assert archive_after != archive_before and len(archive_after - archive_before) >= 0
    assert len(archive_before - archive_after) >= 3, (archive_before, archive_after)
    assert len(binlogs_before - binlogs_after) >= 3, (binlogs_before, binlogs_after)


def test_slow_snapshot_is_abandoned_and_retried(lab: Any, running_workload: Any,
                                                profile_path: Path) -> None:
    lab.vcsim.set_knobs(VM, snapshot_delay_s=3.0)

    def on_event(message: str) -> None:
        if "attempt 2/" in message:        # the first attempt blew its budget: heal
            lab.vcsim.set_knobs(VM, snapshot_delay_s=0.0)

    progress = _Events(on_event)
    try:
        result = run_job(profile_path, progress, app_aware="require", attempts=3,
                         backoff_s=0.1, snapshot_budget_s=1.0)
    finally:
        lab.vcsim.set_knobs(VM, snapshot_delay_s=0.0)
    assert result.ok, result.error
    assert result.consistency == "application"
    profile = load_profile(profile_path)
    repo = environment.open_repository(profile)
    attempts = repo.get(result.restore_point).metadata["attempts"]
    assert [a["ok"] for a in attempts] == [False, True]
    assert "not done within 1 s" in attempts[0]["error"]
    session = environment.open_vcenter(profile)
    try:
        assert not find_snapshots(session, inventory.find_vm(session, VM))
    finally:
        session.close()


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_guest_thaws_when_the_appliance_vanishes_mid_freeze(
        how: str, lab: Any, running_workload: Any, profile_path: Path) -> None:
    limit = 4.0
    proc = subprocess.Popen([*STILLPOINT, "backup", VM, "--freeze-limit", str(limit)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "STILLPOINT_HOLD_AT": "frozen"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith('{"held": "frozen"'):
            break
    g = lab.guests[VM]
    assert not _writable(g), "the guest's disk should be frozen now"
    held_at = time.monotonic()
    # "stopped": the appliance hangs with its connection open -> the agent's watchdog.
    # "killed": the connection drops -> the agent thaws at once.
    proc.send_signal(signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
    try:
        while not _writable(g):
            assert time.monotonic() - held_at < limit + 5, "the guest stayed frozen"
            time.sleep(0.2)
        thawed_after = time.monotonic() - held_at
    finally:
        proc.kill()
        proc.wait()
    if how == "killed":
        assert thawed_after < limit
    assert workload.check_invariants(g).ok
    # The next run cleans up whatever the vanished one left and succeeds.
    again = subprocess.run([*STILLPOINT, "backup", VM], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert live_agent_files(lab) == ""


def _writable(g: Any) -> bool:
    return g.run(["timeout", "0.5", "sh", "-c", "echo x > /data/.thaw-probe"]).returncode == 0


def _wal_archive(g: Any) -> set[str]:
    out = g.run(["ls", "/data/pgsql/wal-archive"]).stdout.split()
    return {n for n in out if len(n) == 24}


def _binlogs(g: Any) -> set[str]:
    out = g.run(["mariadb", "-N", "-e", "SHOW BINARY LOGS"]).stdout.splitlines()
    return {line.split()[0] for line in out if line.strip()}


def test_try_policy_falls_back_to_crash_consistent_and_says_so(
        lab: Any, running_workload: Any, profile_path: Path) -> None:
    g = lab.guests[VM]
    hook = "/etc/stillpoint/hooks.d/50-busy"
    g.run(["sh", "-c", f"mkdir -p /etc/stillpoint/hooks.d && printf '%s\\n' '#!/bin/sh' "
           f"'[ \"$1\" = freeze ] && {{ echo \"ledger is busy\" >&2; exit 3; }}' 'exit 0' "
           f"> {hook} && chmod 755 {hook}"])
    try:
        result = run_job(profile_path, app_aware="try", attempts=2, backoff_s=0.1)
    finally:
        g.run(["rm", "-f", hook])
    assert result.ok, result.error
    assert result.consistency == "crash"
    point = environment.open_repository(load_profile(profile_path)).get(result.restore_point)
    assert any("fell back after 2 failed attempts" in r and "ledger is busy" in r
               for r in point.reasons), point.reasons
    assert [a["ok"] for a in point.metadata["attempts"]] == [False, False, True]


def test_copy_only_truncates_nothing(lab: Any, running_workload: Any,
                                     profile_path: Path) -> None:
    g = lab.guests[VM]
    g.run(["runuser", "-u", "postgres", "--", "psql", "-h", "/run/postgresql", "-qAtc",
           "SELECT pg_switch_wal()"])
    g.run(["mariadb", "-e", "FLUSH BINARY LOGS"])
    time.sleep(2)
    archive_before, binlogs_before = _wal_archive(g), _binlogs(g)
    profile = load_profile(profile_path)
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile)
    try:
        opts = BackupOptions(targets=(VM,), truncate_logs=False,
                             policy=ConsistencyPolicy(app_aware="require"))
        [result] = run_backup(opts, profile, session, repo, DatastoreHTTPReader(session),
                              NullProgress())
    finally:
        session.close()
    assert result.ok and result.consistency == "application", result.error
    assert archive_before <= _wal_archive(g)
    assert binlogs_before <= _binlogs(g)


def test_backup_with_verification_policy_records_the_verdict(
        lab: Any, running_workload: Any, profile_path: Path) -> None:
    done = subprocess.run([*STILLPOINT, "backup", VM, "--verify-boot"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    listing = subprocess.run([*STILLPOINT, "list", "--json"], capture_output=True, text=True)
    [point] = json.loads(listing.stdout)
    assert point["verified"] == "pass"
    table = subprocess.run([*STILLPOINT, "list"], capture_output=True, text=True).stdout
    assert "VERIFIED" in table and "pass" in table
