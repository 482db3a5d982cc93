"""Helpers for the restore, file-restore and verify lab tests: a profile on the lab's own
profile file (hostd adds the guest access of the VMs it boots to it) with a repository of
the test's own, backups through the job API, the CLI, cleanup, and where a guest file lies
in a restored (partitioned) disk image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.jobs import environment, files
from appliance.jobs.backup import BackupOptions, VMResult, run_backup
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.profile import Profile, load_profile
from appliance.progress import NullProgress
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.vsphere import restore_vm as rv
from stillpoint_lab import hostd
from stillpoint_lab.image import layout

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


def guest_gone(cfg: Any, name: str) -> bool:
    """hostd runs no VM of that name and the lab profile has no access for it."""
    if name in hostd.call(cfg, "/host/ping").get("vms", []):
        return False
    return name not in json.loads(cfg.profile_path.read_text()).get("guests", {})


def wait_guest_gone(cfg: Any, name: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not guest_gone(cfg, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def guest_sql(guest: Any, db: str, sql: str) -> str:
    """Run SQL in a guest's PostgreSQL (db) as postgres; returns stdout."""
    done = guest.run(["runuser", "-u", "postgres", "--", f"{layout.PG_BIN}/psql",
                      "-X", "-q", "-A", "-t", "-h", layout.PG_SOCKET_DIR, "-d", db, "-v",
                      "ON_ERROR_STOP=1", "-c", sql], timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def guest_mariadb(guest: Any, sql: str, db: str = "") -> str:
    """Run SQL in a guest's MariaDB as root over its socket; returns stdout (tab-separated)."""
    done = guest.run(["mariadb", "--protocol=socket", "-N", "-B", *([db] if db else []),
                      "-e", sql], timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def file_extents(raw: Path, guest_path: str) -> list[tuple[int, int]]:
    """(offset in the disk image, length) of each extent of a file of the image's root file
    system (any partition of it), read with FIEMAP (filefrag) once the kernel replayed the
    journal (raw is a private copy): where to write to damage that file in the disk."""
    from appliance.jobs.guest_tree import replayed_filesystems

    with replayed_filesystems(raw) as filesystems:
        for fs in filesystems:
            target = files.resolve_inside(fs.root, guest_path)
            if not target.is_file():
                continue
            start = _partition_start(fs)
            out = subprocess.run(["filefrag", "-v", "-b1", str(target)], capture_output=True,
                                 text=True, check=True).stdout
            extents = []
            for line in out.splitlines():
                m = re.match(r"\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+):", line)
                if m:
                    extents.append((start + int(m.group(1)), int(m.group(3))))
            assert extents, out
            return extents
    raise AssertionError(f"{guest_path} is in none of the image's file systems")


def _partition_start(fs: files.MountedFS) -> int:
    if fs.partition == 0:
        return 0
    name = Path(fs.device).name
    sectors = next(Path("/sys/block").glob(f"*/{name}/start")).read_text()
    return int(sectors) * 512
