"""Soak: backup cycles of two VMs under a continuous workload, with faults injected at
random phases (seeded: the same seed replays the same faults).

Each cycle, for each VM, the seeded generator picks either a clean backup or a fault: the
appliance SIGKILLed at a random phase of BACKUP_PHASES, followed by a clean backup. At the
end: every committed restore point whose snapshot image was captured restores bit-exact,
the newest one of each VM boots as a fresh guest whose databases start with the workload's
invariants intact, `check --read-data` passes, and nothing leaked (snapshots, mounts, loop
devices, namespaces, agent processes or SSH sessions in the guests).

CI runs the short form (STILLPOINT_SOAK_CYCLES, default 3); `make soak` runs 20 cycles.
STILLPOINT_SOAK_SEED picks the faults (default 1).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from backup_helpers import backup
from fault_helpers import (
    agent_processes,
    assert_restores_bit_exact,
    check_read_data,
    kill_at,
    leak_census,
    list_ids,
    sha256_file,
    stillpoint_snapshots,
    wait_thawed,
)
from test_app_consistent import boot_image

from appliance.checkpoints import BACKUP_PHASES
from stillpoint_lab import workload

VMS = ("lab-vm1", "lab-vm2")
CYCLES = int(os.environ.get("STILLPOINT_SOAK_CYCLES", "3"))
SEED = int(os.environ.get("STILLPOINT_SOAK_SEED", "1"))
FAULT_RATE = 0.5


def _census(lab: Any) -> dict[str, Any]:
    """The leak census without what a running database legitimately varies."""
    doc = leak_census(lab)
    doc["processes"] = {vm: sorted(p for p in procs if "stillpoint" in p or "sshd: " in p
                                   and "listener" not in p)
                        for vm, procs in doc["processes"].items()}
    return doc


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
                result, cap = backup(profile_path, lab, vm, tmp_path / "cap",
                                     app_aware="require")
                assert result.ok, f"cycle {cycle} {vm}: {result.error}"
                expected[result.restore_point] = {k: sha256_file(p)
                                                  for k, p in cap.captured.items()}
                for p in cap.captured.values():
                    p.unlink()
                log.append(f"cycle {cycle} {vm}: restore point {result.restore_point[:12]}")
    finally:
        for h in handles:
            workload.stop_workload(h)
    record_property("soak", json.dumps({"seed": SEED, "cycles": CYCLES, "log": log}))
    for vm in VMS:
        assert stillpoint_snapshots(profile_path, vm) == [], vm
        assert agent_processes(lab.guests[vm]) == "", vm
    after = _census(lab)
    leaked = {k: {"before": before[k], "after": after[k]} for k in before
              if before[k] != after[k]}
    assert not leaked, f"leaked: {json.dumps(leaked, indent=1)}"
    check_read_data(env)
    committed = list_ids(env)
    assert set(expected) <= set(committed)
    for rp, digests in expected.items():
        assert_restores_bit_exact(profile_path, rp, digests, tmp_path / "restored")
    for index, vm in enumerate(VMS):
        rp = [p for p in _points_of(profile_path, vm) if p in expected][-1]
        report, error, _ = boot_image(lab, profile_path, rp, tmp_path, index)
        assert report is not None, f"{vm} {rp[:12]} did not start: {error}"
        assert report.ok, f"{vm} {rp[:12]}: {report}"


def _points_of(profile_path: Path, vm: str) -> list[str]:
    from appliance.jobs import environment
    from appliance.profile import load_profile

    repo = environment.open_repository(load_profile(profile_path))
    return [p.id for p in repo.list_restore_points(vm=vm)]
