"""Image backup against the lab: full + incrementals bit-exact, CBT reads only changes,
dedup across VMs, crash safety, corruption found, clear errors with exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backup_helpers import BLOCK, backup, files_equal, flat_file, scattered, write_blocks

from appliance.jobs import environment
from appliance.profile import load_profile
from tests.hold_cli import HOLD_CLI

STILLPOINT = [sys.executable, "-m", "appliance.cli"]


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_full_and_three_incrementals_restore_bit_exact(lab: Any, profile_path: Path,
                                                       tmp_path: Path) -> None:
    disk0 = flat_file(lab, "lab-raw1", 0)
    nblocks = disk0.stat().st_size // BLOCK
    write_blocks(disk0, scattered(nblocks, 300, seed=1), seed=100)   # the "OS install"
    write_blocks(flat_file(lab, "lab-raw1", 1), [0, 5, 7], seed=101)
    points = []
    full, cap = backup(profile_path, lab, "lab-raw1", tmp_path / "cap0")
    assert full.ok, full.error
    assert [d["mode"] for d in full.disks] == ["full", "full"]
    points.append((full, cap))
    for i in range(3):
        # Scattered changes, and a clustered run, between backups.
        changed = set(scattered(nblocks, 20 + 10 * i, seed=10 + i))
        changed |= set(range(1000 + 40 * i, 1000 + 40 * i + 17))
        write_blocks(disk0, sorted(changed), seed=200 + i)
        inc, cap = backup(profile_path, lab, "lab-raw1", tmp_path / f"cap{i + 1}")
        assert inc.ok, inc.error
        assert [d["mode"] for d in inc.disks] == ["incremental", "incremental"]
        # CBT is exact at 64 KiB: exactly the blocks written (those whose content changed).
        assert inc.disks[0]["bytes_changed"] == len(changed) * BLOCK
        assert inc.disks[1]["bytes_changed"] == 0
        assert inc.bytes_read == len(changed) * BLOCK
        points.append((inc, cap))
    for n, (result, cap) in enumerate(points):
        for key, expected in cap.captured.items():
            out = tmp_path / f"restored-{n}-{key}.img"
            repo = environment.open_repository(load_profile(profile_path))
            repo.restore_disk_to(result.restore_point, key, out)
            assert files_equal(out, expected), f"restore point {n} disk {key} differs"


def test_nbd_transport_full_and_incremental_bit_exact(lab: Any, profile_path: Path,
                                                      tmp_path: Path) -> None:
    """--transport nbd: nbdkit (file plugin in the lab, VDDK in production) per disk."""
    disk0 = flat_file(lab, "lab-raw2", 0)
    nblocks = disk0.stat().st_size // BLOCK
    write_blocks(disk0, scattered(nblocks, 100, seed=21), seed=210)
    full, cap0 = backup(profile_path, lab, "lab-raw2", tmp_path / "c0", transport="nbd")
    changed = scattered(nblocks, 25, seed=22)
    write_blocks(disk0, changed, seed=220)
    inc, cap1 = backup(profile_path, lab, "lab-raw2", tmp_path / "c1", transport="nbd")
    assert full.ok and inc.ok, (full.error, inc.error)
    assert inc.disks[0]["mode"] == "incremental"
    assert inc.bytes_read == len(changed) * BLOCK
    repo = environment.open_repository(load_profile(profile_path))
    for result, cap in ((full, cap0), (inc, cap1)):
        for key, expected in cap.captured.items():
            out = tmp_path / f"nbd-{result.restore_point[:8]}-{key}.img"
            repo.restore_disk_to(result.restore_point, key, out)
            assert files_equal(out, expected)


def test_same_content_on_a_second_vm_adds_almost_nothing(lab: Any, profile_path: Path,
                                                         tmp_path: Path) -> None:
    src, dst = flat_file(lab, "lab-raw1", 0), flat_file(lab, "lab-raw2", 0)
    write_blocks(src, scattered(src.stat().st_size // BLOCK, 400, seed=5), seed=55)
    with open(src, "rb") as f, open(dst, "r+b") as g:
        g.write(f.read())
    first, _ = backup(profile_path, lab, "lab-raw1", tmp_path / "a", full=True)
    second, _ = backup(profile_path, lab, "lab-raw2", tmp_path / "b", full=True)
    assert first.ok and second.ok
    assert first.bytes_new > 400 * BLOCK // 2          # random data: stored
    assert second.bytes_new < first.bytes_new * 0.02   # only metadata is new


def test_cbt_reset_forces_a_full(lab: Any, profile_path: Path, tmp_path: Path) -> None:
    first, _ = backup(profile_path, lab, "lab-raw2", tmp_path / "a")
    assert first.ok
    lab.vcsim.set_knobs("lab-raw2", cbt_reset=True)
    second, cap = backup(profile_path, lab, "lab-raw2", tmp_path / "b")
    assert second.ok
    assert second.disks[0]["mode"] == "full" and "reset" in second.disks[0]["why"]


def test_killed_backup_leaves_repository_clean_and_next_run_cleans_up(
        lab: Any, profile_path: Path, tmp_path: Path) -> None:
    disk0 = flat_file(lab, "lab-raw1", 0)
    write_blocks(disk0, scattered(disk0.stat().st_size // BLOCK, 200, seed=3), seed=33)
    assert cli("backup", "lab-raw1", "--app-aware", "off").returncode == 0
    before = cli("list", "--json")
    proc = subprocess.Popen([*HOLD_CLI, "backup", "lab-raw1", "--full", "--app-aware", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "STILLPOINT_HOLD_AT": "copy-started"})
    assert proc.stderr is not None
    for line in proc.stderr:   # held just after its first data reached the repository
        if line.startswith('{"held": "copy-started"'):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the backup ended before it could be killed"
    assert cli("list", "--json").stdout == before.stdout    # no half restore point
    check = cli("check", "--read-data")
    assert check.returncode == 0, check.stdout + check.stderr
    again = cli("backup", "lab-raw1", "--app-aware", "off")
    assert again.returncode == 0, again.stderr
    assert "removing stale snapshot" in again.stderr + again.stdout


def test_flipped_byte_found_by_check_and_refused_by_restore(lab: Any, profile_path: Path,
                                                            tmp_path: Path) -> None:
    disk0 = flat_file(lab, "lab-raw2", 0)
    write_blocks(disk0, list(range(64)), seed=77)
    result, _ = backup(profile_path, lab, "lab-raw2", tmp_path / "cap", full=True)
    assert result.ok
    packs = sorted((tmp_path / "repository").rglob("*"), key=lambda p: p.stat().st_size
                   if p.is_file() else 0)
    pack = packs[-1]                       # the biggest file holds the data
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    check = cli("check", "--read-data")
    assert check.returncode == 6
    assert result.restore_point[:12] in check.stderr
    restore = cli("restore", "disk", result.restore_point, "--disk", "0",
                  "--to", str(tmp_path / "out.img"))
    assert restore.returncode == 6, restore.stderr
    assert "Traceback" not in restore.stderr


@pytest.mark.parametrize("case", ["wrong-passphrase", "unknown-vm", "thumbprint-mismatch",
                                  "repository-full"])
def test_clear_errors_with_exit_codes(case: str, lab: Any, profile_path: Path,
                                      tmp_path: Path) -> None:
    assert cli("backup", "lab-win1", "--app-aware", "off").returncode == 0   # repo exists
    env: dict[str, str] = {}
    args = ["backup", "lab-win1", "--app-aware", "off"]
    mount = None
    if case == "wrong-passphrase":
        env["STILLPOINT_PASSPHRASE"] = "not the passphrase"
        expected = 6
    elif case == "unknown-vm":
        args = ["backup", "no-such-vm"]
        expected = 3
    elif case == "thumbprint-mismatch":
        args += ["--thumbprint", ":".join(["AB"] * 32)]
        expected = 5
    else:
        mount = tmp_path / "small"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
        env["STILLPOINT_REPOSITORY"] = str(mount / "repo")
        write_blocks(flat_file(lab, "lab-win1", 0), list(range(200)), seed=9)  # 12 MiB random
        expected = 10
    try:
        result = cli(*args, env=env)
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], check=False)
    assert result.returncode == expected, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "stillpoint: error:" in result.stderr or "FAILED:" in result.stderr, result.stderr


def test_a_write_cbt_missed_is_caught_copied_and_cbt_reset(lab: Any, profile_path: Path) -> None:
    """The QEMU VM's second disk is written behind QEMU's back (its dirty bitmap never sees
    it: what ESXi's CBT bugs did). The verifying incremental finds it, copies that disk in
    full, posts the event, resets CBT; the restore point holds the write."""
    assert cli("backup", "lab-vm1", "--app-aware", "off").returncode == 0
    clean = cli("backup", "lab-vm1", "--app-aware", "off", "--cbt-verify-every", "1",
                "--cbt-verify-blocks", "600")
    assert clean.returncode == 0, clean.stderr
    said = clean.stdout + clean.stderr
    assert said.count("CBT verified") == 2, said   # both disks, all equal

    disk1 = flat_file(lab, "lab-vm1", 1)
    offset = disk1.stat().st_size - (1 << 20)            # the last MiB: no file system data
    original = disk1.read_bytes()[offset:offset + (1 << 20)]
    missed = os.urandom(1 << 20)
    with open(disk1, "r+b") as f:
        f.seek(offset)
        f.write(missed)
        os.fsync(f.fileno())
    try:
        caught = cli("backup", "lab-vm1", "--app-aware", "off", "--cbt-verify-every", "1",
                     "--cbt-verify-blocks", "600", "--json")
        assert caught.returncode == 12, caught.stdout + caught.stderr   # the warning tier
        [line] = [json.loads(x)["result"] for x in caught.stdout.splitlines() if '"result"' in x]
        assert [d["mode"] for d in line["disks"]] == ["incremental", "full"]
        assert "CBT was wrong: 1 of " in line["disks"][1]["why"]
        assert any("Hard disk 2 missed writes" in w for w in line["warnings"]), line["warnings"]
        repo = environment.open_repository(load_profile(profile_path))
        point = repo.get(line["restore_point"])
        key = point.disks[1].key
        assert repo.block_reader(point, key)(offset >> 20) == missed
        assert point.metadata["cbt_verification"][str(key)]["mismatched"] == [offset]
        session = environment.open_vcenter(load_profile(profile_path))
        try:
            from appliance.vsphere import inventory
            from appliance.vsphere.events import recent_events

            since = point.time - dt.timedelta(minutes=5)
            messages = [e.message for e in recent_events(
                session, inventory.find_vm(session, "lab-vm1"), since)]
        finally:
            session.close()
        assert any("Changed Block Tracking of lab-vm1 Hard disk 2 missed writes" in m
                   for m in messages), messages[-5:]
    finally:
        with open(disk1, "r+b") as f:                    # behind QEMU's back again:
            f.seek(offset)                               # harmless, CBT was reset and
            f.write(original)                            # the next backup is a full
    after = cli("backup", "lab-vm1", "--app-aware", "off", "--json")
    assert after.returncode == 0, after.stderr
    [line] = [json.loads(x)["result"] for x in after.stdout.splitlines() if '"result"' in x]
    assert [d["mode"] for d in line["disks"]] == ["full", "full"]
    assert all("CBT was reset" in d["why"] for d in line["disks"]), line["disks"]
