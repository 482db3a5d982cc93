"""Application-consistent backups through the Linux agent, under a continuous workload.

One restore point of each consistency level is taken under the workload and its disks (the
partitioned system disk and the /data disk) are booted as a sandboxed QEMU VM, the way a
restored VM boots (one boot per level: CI time):

    application   the agent (writers frozen, file systems frozen): the databases start with
                  the workload's invariants intact, MyISAM's CHECK TABLE clean
    filesystem    agent off, quiesced through the guest tools (VMware Tools' quiesce:
                  qemu-guest-agent fsfreeze): MyISAM checks OK, no journal replay at boot
    crash         agent off, no quiesce: what happens is reported, not asserted (a
                  crash-consistent image may be lucky)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.guest.deploy import DEFAULT_INSTALL_DIR
from appliance.jobs import environment, files
from appliance.jobs.backup import BackupOptions, run_backup
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.profile import load_profile
from appliance.progress import NullProgress
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.vsphere import events, inventory
from appliance.vsphere.snapshots import find_snapshots
from tests.hold_cli import HOLD_CLI
from stillpoint_lab import workload
from stillpoint_lab.image import layout
from stillpoint_lab.lab import boot_scratch_vm, remove_scratch_vm, serial_log

# Three restore points booted one after the other (and the lab's own boot) under TCG.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(2700)]

STILLPOINT = [sys.executable, "-m", "appliance.cli"]
VM = "lab-vm1"
# A file system that was not clean at boot: its journal replayed by e2fsck (the initramfs
# checks the root before mounting it, systemd-fsck /data: "splab-root: recovering journal")
# or by the kernel ("EXT4-fs (vdb): recovery complete"); or orphan inodes released
# ("Clearing orphaned inode ...", "orphan cleanup on readonly fs"). Orphans are files
# deleted while still open when the snapshot was cut: a frozen file system keeps them too
# (frozen is clean, not closed), so only a journal replay tells an unfrozen cut.
UNCLEAN_FS = re.compile(r"recovering journal|recovery (complete|required)|orphan", re.IGNORECASE)
JOURNAL_REPLAY = re.compile(r"recovering journal|recovery (complete|required)", re.IGNORECASE)
# The agent's files on the live guest (unit, its link and the database units' drop-ins).
AGENT_FILES = ("/opt/stillpoint /etc/stillpoint/boot.d/* /etc/systemd/system/stillpoint-restore.service "
               "/etc/systemd/system/multi-user.target.wants/stillpoint-restore.service "
               "/etc/systemd/system/*.d/50-stillpoint-restore.conf")


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


@dataclass
class Booted:
    """What booting one restore point's disks showed."""

    consistency: str
    invariants: workload.InvariantReport | None     # None: the databases did not start
    error: str
    agent_in_image: bool
    unclean_fs: list[str] = field(default_factory=list)   # ext4 replay / orphan messages

    def summary(self) -> dict[str, Any]:
        inv = self.invariants
        return {"consistency": self.consistency, "started": inv is not None,
                "invariants_ok": bool(inv and inv.ok),
                "myisam_check": inv.myisam_check if inv else f"did not start: {self.error}",
                "unclean_fs": self.unclean_fs}


def boot_image(lab: Any, profile_path: Path, rp_id: str, workdir: Path, name: str) -> Booted:
    """Restore every disk of a restore point, look for the agent in the image, boot the
    disks as a sandboxed VM, check the workload's invariants and read the kernel's verdict
    on the file systems; the VM and the disk files are removed afterwards."""
    repo = environment.open_repository(load_profile(profile_path))
    point = repo.get(rp_id)
    disks = []
    for i, disk in enumerate(point.disks):
        disks.append(workdir / f"{name}-disk{i}.raw")
        repo.restore_disk_to(point, disk.key, disks[-1])
    # Read-only, no journal replay (files' defaults): the boot must find the image as cut.
    with files.mounted_filesystems(disks[0]) as filesystems:
        agent_in_image = any(
            files.resolve_inside(fs.root, f"{DEFAULT_INSTALL_DIR}/stillpoint-agent").is_file()
            for fs in filesystems)
    console = serial_log(lab.config, name)

    def unclean(journal: str = "") -> list[str]:
        text = console.read_text(errors="replace") if console.exists() else ""
        return sorted({line.strip() for line in (text + "\n" + journal).splitlines()
                       if UNCLEAN_FS.search(line)})

    try:
        guest = boot_scratch_vm(lab.config, name, disks, sandbox=True)
        journal = guest.run(["journalctl", "-b", "--no-pager", "-o", "cat", "_TRANSPORT=kernel",
                             "+", "SYSLOG_IDENTIFIER=systemd-fsck"], timeout=120)
        return Booted(point.consistency, workload.check_invariants(guest), "",
                      agent_in_image, unclean(journal.stdout))
    except Exception as err:  # noqa: BLE001 - reported: an image that does not start
        return Booted(point.consistency, None, str(err), agent_in_image, unclean())
    finally:
        remove_scratch_vm(lab.config, name)
        for d in disks:
            d.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def booted(lab: Any, running_workload: Any, tmp_path_factory: pytest.TempPathFactory,
           ) -> dict[str, Booted]:
    """Under the workload: one restore point per consistency level, then each booted."""
    profile_path = Path(lab.profile_path)
    work = tmp_path_factory.mktemp("boot")
    env = {"STILLPOINT_PROFILE": str(profile_path),
           "STILLPOINT_REPOSITORY": str(work / "repository")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        points = {}
        for level, policy in (("application", {"app_aware": "require"}),
                              ("filesystem", {"app_aware": "off", "quiesce": True}),
                              ("crash", {"app_aware": "off"})):
            result = run_job(profile_path, **policy)
            assert result.ok, result.error
            assert result.consistency == level, (level, result.consistency)
            if level == "application":
                assert live_agent_files(lab) == "", "the agent must be gone from the live guest"
            points[level] = result.restore_point
            time.sleep(2)
        return {level: boot_image(lab, profile_path, rp, work, f"lab-vm1-boot-{level[:5]}")
                for level, rp in points.items()}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work / "repository", ignore_errors=True)


def live_agent_files(lab: Any) -> str:
    out = lab.guests[VM].sh(f"ls -d {AGENT_FILES} 2>/dev/null")
    return out.stdout.strip()


def test_application_consistent_image_starts_clean_under_load(
        booted: dict[str, Booted], record_property: Any) -> None:
    app = booted["application"]
    record_property("consistency_report", json.dumps({k: b.summary() for k, b in booted.items()}))
    print("consistency report:", json.dumps({k: b.summary() for k, b in booted.items()}))
    assert app.agent_in_image, "the agent must be inside the backed-up image"
    assert app.invariants is not None, f"application-consistent image did not start: {app.error}"
    assert app.invariants.ok, f"invariants broken in an application-consistent image: {app}"
    assert not [line for line in app.unclean_fs if JOURNAL_REPLAY.search(line)], app.unclean_fs


def test_quiesced_snapshot_myisam_checks_ok_where_crash_consistent_may_not(
        booted: dict[str, Booted], record_property: Any) -> None:
    """The issue's "Done when": a quiesced snapshot's MyISAM tables check OK where a
    crash-consistent one's may not. Quiesce without the agent = ConsistencyPolicy(
    app_aware="off", quiesce=True) (`backup --app-aware off --quiesce`): the guest tools
    freeze the file systems after their pre-freeze scripts (the lab image has MariaDB's:
    FLUSH TABLES WITH READ LOCK held across the freeze), and the restore point is
    "filesystem"-consistent. No journal replay at its
    boot; orphan inodes (files deleted while open) are released even then, so they are
    reported with the rest."""
    quiesced, crash = booted["filesystem"], booted["crash"]
    record_property("crash_consistent", json.dumps(crash.summary()))
    record_property("quiesced", json.dumps(quiesced.summary()))
    assert not quiesced.agent_in_image and not crash.agent_in_image
    assert quiesced.invariants is not None, f"quiesced image did not start: {quiesced.error}"
    assert quiesced.invariants.myisam_check == "OK", quiesced.summary()
    replayed = [line for line in quiesced.unclean_fs if JOURNAL_REPLAY.search(line)]
    assert replayed == [], ("a frozen file system needs no journal replay", replayed)


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
    proc = subprocess.Popen([*HOLD_CLI, "backup", VM, "--freeze-limit", str(limit)],
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
    probe = f"{layout.DATA_MOUNT}/.thaw-probe"
    return g.run(["timeout", "0.5", "sh", "-c", f"echo x > {probe}"]).returncode == 0


def _wal_archive(g: Any) -> set[str]:
    out = g.run(["ls", layout.PG_WAL_ARCHIVE]).stdout.split()
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
    [warning] = result.warnings      # degraded success says so (the CLI exits 12)
    assert "not application-consistent" in warning and "ledger is busy" in warning
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

