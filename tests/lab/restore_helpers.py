"""Helpers for the restore, file-restore and verify lab tests: a profile on the lab's own
profile file (the lab hypervisor adds the guest access of restored VMs to it) with a
repository of the test's own, backups through the job API, the CLI, and cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.jobs import environment
from appliance.jobs.backup import BackupOptions, VMResult, run_backup
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.profile import Profile, load_profile
from appliance.progress import NullProgress
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.vsphere import restore_vm as rv

STILLPOINT = [sys.executable, "-m", "appliance.cli"]


@contextmanager
def lab_repository(lab: Any, repo_dir: Path) -> Iterator[dict[str, str]]:
    """Environment for the CLI: the lab profile, this test's repository. (In-process code
    uses `profile(env)`: tests/conftest.py strips STILLPOINT_* from os.environ per test.)"""
    yield {"STILLPOINT_PROFILE": str(lab.profile_path), "STILLPOINT_REPOSITORY": str(repo_dir)}


def profile(env: dict[str, str]) -> Profile:
    prof = load_profile(env["STILLPOINT_PROFILE"])
    prof.repository = dict(prof.repository, path=env["STILLPOINT_REPOSITORY"])
    return prof


def backup(env: dict[str, str], vm: str, app_aware: str = "require") -> VMResult:
    prof = profile(env)
    repo = environment.open_repository(prof, create=True)
    session = environment.open_vcenter(prof)
    try:
        opts = BackupOptions(targets=(vm,), policy=ConsistencyPolicy(app_aware=app_aware))
        [result] = run_backup(opts, prof, session, repo, DatastoreHTTPReader(session),
                              NullProgress())
    finally:
        session.close()
    assert result.ok, result.error
    return result


def cli(env: dict[str, str], *args: str, timeout: float = 600,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, check=False)


def cli_json(env: dict[str, str], *args: str, timeout: float = 600) -> Any:
    done = cli(env, *args, "--json", timeout=timeout)
    assert done.returncode == 0, done.stderr + done.stdout
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        return json.loads(done.stdout)
    except ValueError:
        return json.loads(lines[-1])


def destroy_vms(env: dict[str, str], *names: str) -> None:
    """Remove restored VMs (their lab guests go with them)."""
    session = environment.open_vcenter(profile(env))
    try:
        for name in names:
            vm = rv.find_vm_by_name(session, name)
            if vm is not None:
                rv.destroy_vm(session, vm)
    finally:
        session.close()


def wait_guest_gone(cfg: Any, name: str, timeout: float = 60) -> None:
    from stillpoint_lab.hypervisor import guest_record

    deadline = time.monotonic() + timeout
    while guest_record(cfg, name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def guest_sql(guest: Any, db: str, sql: str) -> str:
    """Run SQL in a guest's PostgreSQL (db) as postgres; returns stdout."""
    done = guest.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql",
                      "-X", "-q", "-A", "-t", "-h", "/run/postgresql", "-d", db, "-v",
                      "ON_ERROR_STOP=1", "-c", sql], timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
