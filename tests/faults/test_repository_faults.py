"""Faults of the repository and of concurrency: its disk full mid-write, a pack truncated,
an index lost, a lock left by a dead (or live, or foreign) process, two backups of one VM at
once, a backup while prune runs. Each: one clear message and exit code, nothing dangling,
`check --read-data` passes where the data is intact, earlier restore points restore
bit-exact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import BLOCK, backup, flat_file, scattered, write_blocks
from fault_helpers import (
    Held,
    assert_restores_bit_exact,
    check_read_data,
    cli,
    list_ids,
    sha256_file,
    stillpoint_snapshots,
)

RAW = "lab-raw1"


def _raw_backup(profile: Path, lab: Any, tmp: Path, seed: int, count: int = 20
                ) -> tuple[str, dict[int, str]]:
    """Write `count` random blocks into lab-raw1's first disk and back it up; (restore
    point, {disk key: sha256 of the captured image})."""
    d0 = flat_file(lab, RAW, 0)
    write_blocks(d0, scattered(d0.stat().st_size // BLOCK, count, seed=seed), seed=seed * 7)
    result, cap = backup(profile, lab, RAW, tmp / f"cap{seed}")
    assert result.ok, result.error
    expected = {k: sha256_file(p) for k, p in cap.captured.items()}
    for p in cap.captured.values():
        p.unlink()
    return result.restore_point, expected


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, \
        result.stderr
    lines = [ln for ln in result.stderr.splitlines()
             if ln.startswith("stillpoint: error:") or "FAILED:" in ln]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_repository_disk_full_mid_write(lab: Any, profile_path: Path, tmp_path: Path,
                                        small_fs: Path) -> None:
    doc = json.loads(profile_path.read_text())
    doc["repository"]["path"] = str(small_fs / "repo")
    profile_path.write_text(json.dumps(doc))
    for disk in (0, 1):   # empty disks: earlier tests' data would not fit the first backup
        flat = flat_file(lab, RAW, disk)
        size = flat.stat().st_size
        os.truncate(flat, 0)
        os.truncate(flat, size)
    first, expected = _raw_backup(profile_path, lab, tmp_path, seed=1, count=8)   # 0.5 MiB
    d0 = flat_file(lab, RAW, 0)
    write_blocks(d0, list(range(200, 360)), seed=99)                            # 10 MiB random
    full = cli("backup", RAW, "--app-aware", "off")
    assert full.returncode == 10, full.stderr
    assert "space" in _one_error_line(full).lower()
    assert list_ids() == [first]
    leftovers = [p for p in (small_fs / "repo").rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], f"half-written files left: {leftovers}"
    check_read_data()
    assert stillpoint_snapshots(profile_path, RAW) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = cli("backup", RAW, "--app-aware", "off")
    assert again.returncode == 0, again.stderr
    check_read_data()
    assert_restores_bit_exact(profile_path, first, expected, tmp_path / "out")


def _packs(repo: Path) -> list[Path]:
    return sorted((repo / "data").rglob("*"), key=lambda p: p.stat().st_mtime_ns)


def test_truncated_pack_is_found_and_only_its_points_are_damaged(
        lab: Any, profile_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    first, expected = _raw_backup(profile_path, lab, tmp_path, seed=2)
    first_packs = {p for p in _packs(repo) if p.is_file()}
    second, _ = _raw_backup(profile_path, lab, tmp_path, seed=3)
    new = [p for p in _packs(repo) if p.is_file() and p not in first_packs]
    assert new, "the second backup wrote no pack"
    with open(new[-1], "r+b") as f:
        f.truncate(new[-1].stat().st_size // 2)
    check = cli("check", "--read-data")
    assert check.returncode == 6
    line = _one_error_line(check)
    assert second[:12] in line and first[:12] not in line
    restore = cli("restore", "disk", second, "--to", str(tmp_path / "bad.raw"))
    assert restore.returncode == 6
    _one_error_line(restore)
    assert_restores_bit_exact(profile_path, first, expected, tmp_path / "out")


def test_lost_index_is_reported_and_earlier_points_stay_safe(
        lab: Any, profile_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    first, expected = _raw_backup(profile_path, lab, tmp_path, seed=4)
    before = {p for p in (repo / "index").iterdir()}
    second, _ = _raw_backup(profile_path, lab, tmp_path, seed=5)
    lost = [p for p in (repo / "index").iterdir() if p not in before]
    assert len(lost) == 1
    lost[0].unlink()
    check = cli("check", "--read-data")
    assert check.returncode == 6
    assert second[:12] in _one_error_line(check)
    prune = cli("prune")             # must not delete the packs no index names
    assert prune.returncode == 6, prune.stdout + prune.stderr
    _one_error_line(prune)
    assert_restores_bit_exact(profile_path, first, expected, tmp_path / "out")


@pytest.mark.parametrize("holder", ["dead-pid", "live-pid", "other-host"])
def test_lock_left_behind(holder: str, lab: Any, profile_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    first, expected = _raw_backup(profile_path, lab, tmp_path, seed=6)
    dead = subprocess.Popen(["true"])
    dead.wait()
    doc = {"pid": dead.pid, "host": socket.gethostname(), "time": "2026-01-01T00:00:00+00:00",
           "nonce": "x"}
    if holder == "live-pid":
        doc["pid"] = os.getpid()
    elif holder == "other-host":
        doc["host"] = "another-appliance"
    (repo / "lock").write_text(json.dumps(doc))
    result = cli("backup", RAW, "--app-aware", "off")
    if holder == "dead-pid":
        assert result.returncode == 0, result.stderr
        assert not (repo / "lock").exists()
    else:
        assert result.returncode == 6, result.stderr
        line = _one_error_line(result)
        assert "locked" in line and str(doc["pid"]) in line and "run again" in line
        assert list_ids() == [first]
        assert (repo / "lock").exists()
        assert stillpoint_snapshots(profile_path, RAW) == []
    check_read_data()
    assert_restores_bit_exact(profile_path, first, expected, tmp_path / "out")


def test_two_backups_of_one_vm_at_once(lab: Any, profile_path: Path, tmp_path: Path) -> None:
    """The first holds just after its snapshot; the second runs meanwhile. It used to take
    the first one's live snapshot for a crashed run's leftover and remove it (the first
    then failed, "snapshot ... is already gone"); now the second refuses at once."""
    first, expected = _raw_backup(profile_path, lab, tmp_path, seed=7)
    d0 = flat_file(lab, RAW, 0)
    write_blocks(d0, [10, 11, 12], seed=70)
    a = Held(["backup", RAW, "--app-aware", "off"], "snapshot-taken", hold_for=8)
    b = cli("backup", RAW, "--app-aware", "off")
    rc_a, out_a = a.finish()
    assert rc_a == 0, out_a                     # the first is not disturbed
    assert b.returncode == 1, b.stderr          # the second refuses at once
    line = _one_error_line(b)
    assert "another job of this VM is running" in line and "run this one again" in line
    assert len(list_ids()) == 2
    assert stillpoint_snapshots(profile_path, RAW) == []
    check_read_data()
    assert_restores_bit_exact(profile_path, first, expected, tmp_path / "out")
    assert cli("backup", RAW, "--app-aware", "off").returncode == 0


def test_backup_during_prune(lab: Any, profile_path: Path, tmp_path: Path) -> None:
    old, _ = _raw_backup(profile_path, lab, tmp_path, seed=8)
    new, expected = _raw_backup(profile_path, lab, tmp_path, seed=9)
    assert cli("forget", "--keep-last", "1").returncode == 0
    p = Held(["prune"], "prune-index-written", hold_for=6)
    b = cli("backup", RAW, "--app-aware", "off")
    rc_p, out_p = p.finish()
    assert rc_p == 0, out_p
    if b.returncode != 0:
        assert b.returncode == 6, b.stderr
        line = _one_error_line(b)
        assert "locked" in line and "run again when it has finished" in line
    assert stillpoint_snapshots(profile_path, RAW) == []
    check_read_data()
    assert_restores_bit_exact(profile_path, new, expected, tmp_path / "out")
    assert old not in list_ids()
    assert cli("backup", RAW, "--app-aware", "off").returncode == 0
    check_read_data()
