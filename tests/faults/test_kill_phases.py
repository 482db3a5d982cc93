"""SIGKILL of the appliance at every hold point of a backup and of a prune.

The phases come from appliance.checkpoints (BACKUP_PHASES, PRUNE_PHASES), not from a list
here: a new hold point in the job is tested without touching this file. After each kill:
the guest takes writes again (the agent's deadman thawed it), the restore point exists only
if the kill came after its commit, `check` finds the repository's structure whole, the next
run succeeds and removes our stale snapshot, no agent is left in the guest; after the last
kill `check --read-data` passes and the earlier restore point still restores bit-exact.

lab-vm1 is a QEMU VM booting Debian 12 (its root file system and /data are frozen by the
agent); lab-raw1 a VM without a guest whose disks the tests write directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import BLOCK, backup, flat_file, scattered, write_blocks
from fault_helpers import (
    FreezeClock,
    agent_left_in_guest,
    assert_restores_bit_exact,
    backup_hashed,
    check_read_data,
    check_structure,
    cli,
    kill_at,
    list_ids,
    sha256_file,
    stillpoint_snapshots,
    wait_thawed,
    write_probe,
)

from appliance.checkpoints import BACKUP_PHASES, PRUNE_PHASES
from appliance.profile import write_private

pytestmark = pytest.mark.timeout(2400)   # a TCG guest: each backup takes minutes under load

VM = "lab-vm1"
# Phases at which the snapshot exists when the appliance dies.
_SNAPSHOT_ALIVE = {"snapshot-taken", "copy-started", "disks-copied", "committed"}
_AFTER_COMMIT = {"committed", "snapshot-removed", "truncated"}


@pytest.fixture(scope="module")
def shared(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One repository for the module, with a baseline restore point of lab-vm1 whose disk
    images (as the snapshot captured them) are known by sha256."""
    base = tmp_path_factory.mktemp("killphases")
    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(base / "repository")
    profile = base / "profile.json"
    write_private(profile, json.dumps(doc))
    write_probe(lab.guests[VM], "baseline.bin", 2)
    result, expected = backup_hashed(profile, lab, VM, app_aware="require")
    assert result.ok, result.error
    yield {"profile": profile, "baseline": result.restore_point, "expected": expected,
           "env": {"STILLPOINT_PROFILE": str(profile)}, "dir": base}


@pytest.mark.parametrize("phase", BACKUP_PHASES)
def test_backup_killed_at_phase(phase: str, lab: Any, shared: dict[str, Any]) -> None:
    env, guest = shared["env"], lab.guests[VM]
    before = list_ids(env)
    write_probe(guest, f"probe-{phase}.bin")          # changes to copy: copy-started is reached
    clock = FreezeClock(guest, map_to_host=False)
    try:
        kill_at(["backup", VM, "--freeze-limit", "20"], phase, env=env)
        wait_thawed(guest, within=25)
    finally:
        clocks = clock.stop()
    # Measured in the guest: the freeze ended when the appliance died (the agent's deadman
    # saw its session end), not at the freeze limit.
    assert clock.frozen_for(clocks) < 15, "the guest thawed only at the freeze limit"
    after_kill = list_ids(env)
    if phase in _AFTER_COMMIT:
        assert len(after_kill) == len(before) + 1 and set(before) < set(after_kill)
    else:
        assert after_kill == before, "a killed backup left a visible restore point"
    check_structure(env)
    again = cli("backup", VM, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    if phase in _SNAPSHOT_ALIVE:
        assert "removing stale snapshot" in again.stderr + again.stdout
    assert stillpoint_snapshots(shared["profile"], VM) == []
    assert agent_left_in_guest(guest) == ""
    check_structure(env)


def test_repository_whole_after_every_backup_kill(shared: dict[str, Any]) -> None:
    """After the kills above (damage does not heal: one full read finds what any kill did;
    a full read and restore of lab-vm1 after each kill cost a TCG run minutes): every pack
    reads back and authenticates, and the baseline restores bit-exact."""
    check_read_data(shared["env"])
    assert_restores_bit_exact(shared["profile"], shared["baseline"], shared["expected"],
                              shared["dir"] / "restored")


def test_backup_killed_mid_copy_of_the_second_disk(lab: Any, profile_path: Path,
                                                   tmp_path: Path) -> None:
    """lab-raw1 has two disks: the hold is skipped once so the kill lands in disk 2."""
    d0, d1 = flat_file(lab, "lab-raw1", 0), flat_file(lab, "lab-raw1", 1)
    write_blocks(d0, scattered(d0.stat().st_size // BLOCK, 40, seed=41), seed=410)
    write_blocks(d1, scattered(d1.stat().st_size // BLOCK, 40, seed=42), seed=420)
    first, cap = backup(profile_path, lab, "lab-raw1", tmp_path / "cap")
    assert first.ok, first.error
    expected = {k: sha256_file(p) for k, p in cap.captured.items()}
    write_blocks(d0, [1, 2, 3], seed=411)
    write_blocks(d1, [4, 5, 6], seed=421)
    held = kill_at(["backup", "lab-raw1", "--app-aware", "off"], "copy-started", skip=1)
    assert "Hard disk 2" in held, held       # really in the second disk
    assert list_ids() == [first.restore_point]
    check_read_data()
    again = cli("backup", "lab-raw1", "--app-aware", "off")
    assert again.returncode == 0, again.stderr
    assert "removing stale snapshot" in again.stderr + again.stdout
    assert stillpoint_snapshots(profile_path, "lab-raw1") == []
    assert_restores_bit_exact(profile_path, first.restore_point, expected, tmp_path / "out")


@pytest.mark.parametrize("phase", PRUNE_PHASES)
def test_prune_killed_at_phase(phase: str, lab: Any, profile_path: Path,
                               tmp_path: Path) -> None:
    """A prune that must rewrite a partly dead pack, killed at each of its steps: every
    remaining restore point restores bit-exact; the lock of the dead prune is broken by
    the next command; a second prune finishes the work."""
    d0 = flat_file(lab, "lab-raw1", 0)
    n = d0.stat().st_size // BLOCK
    write_blocks(d0, scattered(n, 60, seed=51), seed=510)
    old, _ = backup(profile_path, lab, "lab-raw1", tmp_path / "a")
    write_blocks(d0, scattered(n, 30, seed=52), seed=520)   # half of old's pack becomes dead
    new, cap = backup(profile_path, lab, "lab-raw1", tmp_path / "b")
    assert old.ok and new.ok
    expected = {k: sha256_file(p) for k, p in cap.captured.items()}
    forget = cli("forget", "--keep-last", "1")
    assert forget.returncode == 0, forget.stderr
    kill_at(["prune"], phase)
    assert list_ids() == [new.restore_point]
    check_read_data()
    assert_restores_bit_exact(profile_path, new.restore_point, expected, tmp_path / "out1")
    pruned = cli("prune")                 # takes over the dead prune's lock
    assert pruned.returncode == 0, pruned.stderr
    check_read_data()
    assert_restores_bit_exact(profile_path, new.restore_point, expected, tmp_path / "out2")
    third = cli("backup", "lab-raw1", "--app-aware", "off")
    assert third.returncode == 0, third.stderr
