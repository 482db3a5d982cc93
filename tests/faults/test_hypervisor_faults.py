"""Faults of the hypervisor itself, made for real on the lab's QEMU VM (docs/lab-hypervisor.md):

* a snapshot whose consolidation fails: the base's flat file of one disk is made immutable
  (`chattr +i`) while the snapshot exists, so the commit of its delta cannot write it; the
  copy still reads it. vSphere then sets runtime.consolidationNeeded and refuses new
  snapshots; the next run must consolidate before it snapshots, or say why it cannot.
* QEMU killed (`kill -9`): its dirty bitmaps reopen "inconsistent", hostd starts a new CBT
  epoch (ESXi's CBT reset). The VM is powered on again through the vSphere API; the next
  backup is a full, and says why.

Boots: lab-vm1 once for the module (the `lab` fixture), once more after the kill (the kill
test runs last).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import flat_file
from fault_helpers import (
    HashingReader,
    agent_left_in_guest,
    assert_restores_bit_exact,
    backup_hashed,
    check_read_data,
    cli,
    list_ids,
    mux_guest,
    stillpoint_snapshots,
    write_probe,
)

from appliance.jobs import environment
from appliance.profile import load_profile, write_private
from appliance.vsphere.props import retrieve_one
from stillpoint_lab import hostd
from stillpoint_lab.lab import power_on, wait_for_guest

pytestmark = pytest.mark.timeout(2400)   # a TCG guest: a boot and backups take minutes

VM = "lab-vm1"
# copy.py's reasons for a full where an incremental was possible before: the changeId's
# epoch changed (what the lab's CBT reset does, as ESXi's), or vSphere answered FileFault
# for the old changeId.
CBT_RESET_WHY = "CBT was reset since the previous restore point (changeId UUID changed)"
FILEFAULT_WHY = "vSphere cannot answer for the previous changeId"


@pytest.fixture(scope="module")
def world(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One repository for the module."""
    base = tmp_path_factory.mktemp("hvfaults")
    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(base / "repository")
    profile = base / "profile.json"
    write_private(profile, json.dumps(doc))
    return {"profile": profile, "env": {"STILLPOINT_PROFILE": str(profile)}, "dir": base}


def _consolidation_needed(profile: Path) -> bool:
    session = environment.open_vcenter(load_profile(profile))
    try:
        vm = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{VM}")
        return bool(retrieve_one(session, vm, ["runtime.consolidationNeeded"]).get(
            "runtime.consolidationNeeded"))
    finally:
        session.close()


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture(scope="module")
def failed_consolidation(lab: Any, world: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A backup whose snapshot cannot be consolidated (the data disk's base flat file is
    immutable from the first disk's copy on), a backup while it still cannot be, and one
    after the file is writable again; what each did."""
    flat = flat_file(lab, VM, 1)
    probe = flat.with_name(".chattr-probe")
    probe.touch()
    works = _chattr("+i", probe)
    _chattr("-i", probe)
    probe.unlink()
    if not works:
        pytest.skip("chattr +i does not work on the lab's datastore file system")
    profile, env = world["profile"], world["env"]
    baseline, _ = backup_hashed(profile, lab, VM, app_aware="require")
    assert baseline.ok, baseline.error
    write_probe(lab.guests[VM], "consolidation.bin", 2)
    before = list_ids(env)

    class ImmutableBase(HashingReader):
        def open(self, disk: Any) -> Any:
            stream = super().open(disk)
            _chattr("+i", flat)          # reads go on; the commit cannot write it
            return stream

    out: dict[str, Any] = {"before": before}
    try:
        events: list[str] = []
        out["failed"], out["digests"] = backup_hashed(
            profile, lab, VM, app_aware="require", events=events, reader_class=ImmutableBase)
        out["failed_events"] = events
        out["after_failed"] = list_ids(env)
        out["status_failed"] = hostd.call(lab.config, "/vm/status", {"vm": VM})
        out["needed_failed"] = _consolidation_needed(profile)
        out["snapshots_failed"] = stillpoint_snapshots(profile, VM)
        out["stuck"] = cli("backup", VM, "--attempts", "1", env=env, timeout=900)
        out["needed_stuck"] = _consolidation_needed(profile)
    finally:
        _chattr("-i", flat)
    out["fixed"] = cli("backup", VM, env=env, timeout=900)
    out["needed_fixed"] = _consolidation_needed(profile)
    out["status_fixed"] = hostd.call(lab.config, "/vm/status", {"vm": VM})
    yield out


def test_failed_consolidation_is_flagged_and_the_next_run_consolidates(
        lab: Any, world: dict[str, Any], failed_consolidation: dict[str, Any]) -> None:
    fc, env = failed_consolidation, world["env"]
    # The failed commit: vSphere (hostd) says consolidation is needed; no snapshot is left
    # in the tree (the VM runs on the delta); the restore point was committed before.
    assert fc["status_failed"]["consolidation_needed"], fc["status_failed"]
    assert "block-commit" in (fc["status_failed"]["consolidation_error"] or "")
    assert fc["needed_failed"] is True
    assert fc["snapshots_failed"] == []
    new = [p for p in fc["after_failed"] if p not in fc["before"]]
    assert len(new) == 1, (fc["before"], fc["after_failed"])
    # The run itself succeeded with a warning (the restore point is complete).
    assert fc["failed"].ok, fc["failed"].error
    assert fc["failed"].restore_point == new[0]
    assert any("consolidation needed" in w for w in fc["failed"].warnings), fc["failed"].warnings
    # While the disk still cannot be consolidated, the next run says so in one line and
    # takes no snapshot.
    stuck = fc["stuck"]
    assert stuck.returncode == 7, stuck.stdout + stuck.stderr
    [line] = [ln for ln in stuck.stderr.splitlines() if "FAILED:" in ln]
    assert "consolidating disks" in line and "block-commit failed" in line, line
    assert fc["needed_stuck"] is True
    # Once it can, the next run consolidates first, then backs up.
    fixed = fc["fixed"]
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "disks consolidated" in fixed.stderr + fixed.stdout
    assert fc["needed_fixed"] is False and not fc["status_fixed"]["consolidation_needed"]
    assert stillpoint_snapshots(world["profile"], VM) == []
    assert agent_left_in_guest(lab.guests[VM]) == ""
    check_read_data(env)
    # The restore point of the run whose consolidation failed is complete and bit-exact.
    assert_restores_bit_exact(world["profile"], new[0], fc["digests"], world["dir"] / "out")


def test_failed_consolidation_after_the_commit_is_a_warning(
        failed_consolidation: dict[str, Any]) -> None:
    """The restore point was committed before the snapshot's removal failed: the run is a
    success with a warning, and the applications were told (their logs truncated)."""
    fc = failed_consolidation
    failed = fc["failed"]
    assert failed.ok and failed.warnings, failed
    assert any("WARNING" in e and "the next run" in e for e in fc["failed_events"]), \
        fc["failed_events"]
    assert failed.truncation is not None, "the agent was not told of the committed backup"


def test_qemu_killed_next_backup_is_full_with_the_reason(lab: Any,
                                                         world: dict[str, Any]) -> None:
    """`kill -9` of the VM's QEMU: after a power-on through the vSphere API, the next
    backup reads every disk in full, and its reason says CBT was reset; the full restores
    bit-exact."""
    profile = world["profile"]
    guest = lab.guests[VM]
    if not list_ids(world["env"]):     # a full first (the module's other tests made one)
        first, _ = backup_hashed(profile, lab, VM, app_aware="require")
        assert first.ok, first.error
    write_probe(guest, "before-kill.bin", 2)
    inc, _ = backup_hashed(profile, lab, VM, app_aware="require")
    assert inc.ok, inc.error
    assert [d["mode"] for d in inc.disks] == ["incremental"] * len(inc.disks), inc.disks

    before = hostd.call(lab.config, "/vm/status", {"vm": VM})
    guest.close_mux()
    os.kill(int(before["pid"]), signal.SIGKILL)
    _wait_powered_off(profile)
    power_on(lab.vcsim, [VM])
    lab.guests[VM] = guest = mux_guest(wait_for_guest(lab.config, VM))
    status = hostd.call(lab.config, "/vm/status", {"vm": VM})
    assert status["unclean_stop"] and status["cbt_epoch"] != before["cbt_epoch"], status
    assert "did not stop cleanly" in status["cbt_resets"][-1]["reason"], status["cbt_resets"]

    events: list[str] = []
    after, digests = backup_hashed(profile, lab, VM, app_aware="require", events=events)
    assert after.ok, after.error
    for d in after.disks:
        assert d["mode"] == "full", d
        assert d["why"] == CBT_RESET_WHY or d["why"].startswith(FILEFAULT_WHY), d
        assert f"{VM}: {d['label']}: full ({d['why']})" in events, events
        assert d["bytes_read"] > 0
    assert stillpoint_snapshots(profile, VM) == []
    assert agent_left_in_guest(guest) == ""
    check_read_data(world["env"])
    assert_restores_bit_exact(profile, after.restore_point, digests, world["dir"] / "full")


def _wait_powered_off(profile: Path, timeout: float = 120) -> None:
    """Until vCenter shows the VM powered off (hostd noticed its QEMU is gone)."""
    session = environment.open_vcenter(load_profile(profile))
    try:
        vm = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{VM}")
        deadline = time.monotonic() + timeout
        while retrieve_one(session, vm, ["runtime.powerState"]).get(
                "runtime.powerState") != "poweredOff":
            assert time.monotonic() < deadline, f"{VM} still powered on after its QEMU died"
            time.sleep(1)
    finally:
        session.close()
