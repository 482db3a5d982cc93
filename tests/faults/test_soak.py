"""Soak: backup cycles of a VM under a continuous workload, with faults injected at random
phases (seeded: the same seed replays the same faults).

One QEMU VM (lab-vm1, Debian 12 with PostgreSQL and MariaDB; the workload commits to both
over the lab network from the host): two TCG guests on two cores would make every boot and
backup several times slower, and a second VM adds nothing the fault paths do not already
see with one. Each cycle the seeded generator picks either a clean backup or a fault: the
appliance SIGKILLed at a random phase of BACKUP_PHASES, followed by a clean backup. At the
end: every committed restore point whose snapshot image was hashed restores bit-exact, the
newest one boots as a fresh VM (a sandboxed scratch VM: one boot more) whose databases
start with the workload's invariants intact, `check --read-data` passes, and nothing leaked
(snapshots; host mounts, loop devices and taps; in the guest: mounts, frozen file systems,
agent processes or SSH sessions).

CI runs the short form (STILLPOINT_SOAK_CYCLES, default 2); `make soak` runs 20 cycles.
STILLPOINT_SOAK_SEED picks the faults (default 1). Boots: lab-vm1 once, the restored image
once.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import (
    agent_processes,
    assert_restores_bit_exact,
    backup_hashed,
    check_read_data,
    kill_at,
    leak_census,
    list_ids,
    stillpoint_snapshots,
    wait_thawed,
)

from appliance.checkpoints import BACKUP_PHASES
from stillpoint_lab import workload

VMS = ("lab-vm1",)
CYCLES = int(os.environ.get("STILLPOINT_SOAK_CYCLES", "2"))
SEED = int(os.environ.get("STILLPOINT_SOAK_SEED", "1"))
FAULT_RATE = 0.5
# Minutes per cycle on a TCG guest under load, plus the restores and the boot at the end.
pytestmark = pytest.mark.timeout(1800 + CYCLES * 900)


def _census(lab: Any) -> dict[str, Any]:
    """The leak census without what a running system legitimately varies (its processes
    other than the agent's and SSH sessions)."""
    doc = leak_census(lab)
    doc["processes"] = {vm: sorted(p for p in procs if "stillpoint" in p or "sshd: " in p
                                   and "listener" not in p)
                        for vm, procs in doc["processes"].items()}
    return doc


def _leaks(lab: Any, before: dict[str, Any], settle: float = 20) -> dict[str, Any]:
    """What differs from `before`, after up to `settle` seconds for SSH sessions that are
    still closing."""
    deadline = time.monotonic() + settle
    while True:
        after = _census(lab)
        leaked = {k: {"before": before[k], "after": after[k]} for k in before
                  if before[k] != after[k]}
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(2)


def test_soak(lab: Any, profile_path: Path, tmp_path: Path, record_property: Any) -> None:
    rng = random.Random(SEED)
    env = {"STILLPOINT_PROFILE": str(profile_path)}
    before = _census(lab)
    handles = [workload.start_workload(lab.guests[vm], rate=20) for vm in VMS]
    expected: dict[str, dict[int, str]] = {}
    log: list[str] = []
    try:
        time.sleep(2)
        for cycle in range(CYCLES):
            for vm in VMS:
                if rng.random() < FAULT_RATE:
                    phase = rng.choice(BACKUP_PHASES)
                    log.append(f"cycle {cycle} {vm}: SIGKILL at {phase}")
                    kill_at(["backup", vm, "--freeze-limit", "20"], phase, env=env)
                    wait_thawed(lab.guests[vm], within=25)
                result, digests = backup_hashed(profile_path, lab, vm, app_aware="require")
                assert result.ok, f"cycle {cycle} {vm}: {result.error}"
                expected[result.restore_point] = digests
                log.append(f"cycle {cycle} {vm}: restore point {result.restore_point[:12]}")
    finally:
        for h in handles:
            workload.stop_workload(h)
    record_property("soak", json.dumps({"seed": SEED, "cycles": CYCLES, "log": log}))
    print("soak:", json.dumps({"seed": SEED, "cycles": CYCLES, "log": log}))
    for vm in VMS:
        assert stillpoint_snapshots(profile_path, vm) == [], vm
        assert agent_processes(lab.guests[vm]) == "", vm
    leaked = _leaks(lab, before)
    assert not leaked, f"leaked: {json.dumps(leaked, indent=1)}"
    check_read_data(env)
    committed = list_ids(env)
    assert set(expected) <= set(committed)
    for rp, digests in expected.items():
        assert_restores_bit_exact(profile_path, rp, digests, tmp_path / "restored")
    for vm in VMS:
        rp = [p for p in _points_of(profile_path, vm) if p in expected][-1]
        report, error = _boot_restored(lab, profile_path, rp, tmp_path)
        assert report is not None, f"{vm} {rp[:12]} did not start: {error}"
        assert report.ok, f"{vm} {rp[:12]}: {report}"
    assert _leaks(lab, before, settle=5) == {}, "the restored VM left something"


def _boot_restored(lab: Any, profile_path: Path, rp_id: str, tmp_path: Path,
                   ) -> tuple[workload.InvariantReport | None, str]:
    """Restore every disk of `rp_id`, boot them as a sandboxed scratch VM (a new MAC and
    address, only the host reachable), check the workload's invariants over its network;
    (invariants or None if its databases did not start, error text)."""
    from appliance.jobs import environment
    from appliance.profile import load_profile
    from stillpoint_lab.lab import boot_scratch_vm, remove_scratch_vm

    repo = environment.open_repository(load_profile(profile_path))
    point = repo.get(rp_id)
    images = []
    for disk in point.disks:
        images.append(tmp_path / f"boot-{disk.key}.raw")
        repo.restore_disk_to(point, disk.key, images[-1])
    name = "soak-restored"
    try:
        guest = boot_scratch_vm(lab.config, name, images, sandbox=True)
        return workload.check_invariants(guest), ""
    except Exception as err:  # noqa: BLE001 - reported: an image that does not start
        return None, str(err)
    finally:
        remove_scratch_vm(lab.config, name)
        for image in images:
            image.unlink(missing_ok=True)


def _points_of(profile_path: Path, vm: str) -> list[str]:
    from appliance.jobs import environment
    from appliance.profile import load_profile

    repo = environment.open_repository(load_profile(profile_path))
    return [p.id for p in repo.list_restore_points(vm=vm)]
