"""The fault suite's own lab, so that it can break things without disturbing others.

VMs: lab-vm1 (a QEMU VM booting the lab's Debian 12 image: its own kernel and systemd,
PostgreSQL and MariaDB on the root file system, disk 0 the system, disk 1 /data; the soak's
VM too: one TCG guest, not two, on two cores) and lab-raw1 (no guest, two small disks: fast
kill-at-every-phase runs whose expected images are known exactly). Each module boots
lab-vm1 once (the session fixture); tests that need more boots say so.

The lab id: STILLPOINT_FAULTS_LAB_ID, else STILLPOINT_TEST_LAB_ID (as tests/lab/conftest.py),
else 9. The `lab` fixture and `profile_path` (a fresh repository per test) mirror
tests/lab/conftest.py; the guests' handles share one SSH connection per guest for the
tests' own commands (a new connection costs a TCG guest seconds).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))  # backup_helpers

from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec

FAULTS_LAB_ID = int(os.environ.get("STILLPOINT_FAULTS_LAB_ID")
                    or os.environ.get("STILLPOINT_TEST_LAB_ID") or "9")


def lab_config() -> LabConfig:
    return LabConfig(lab_id=FAULTS_LAB_ID, vms=(
        VMSpec("lab-vm1", disks=(DiskSpec.mib(4096), DiskSpec.mib(384))),
        VMSpec("lab-raw1", has_guest=False, apps=(), disks=(DiskSpec.mib(96), DiskSpec.mib(32))),
    ))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (QEMU, taps on a bridge, loop devices)")
    from stillpoint_lab.lab import lab_down, lab_up

    from directory_scope import close_on_leaving
    from fault_helpers import mux_guest

    cfg = lab_config()
    lab_down(cfg)  # a lab left by a killed earlier run
    handle = lab_up(cfg)
    # The tests' own commands in a guest share one SSH connection (fault_helpers.MuxGuest).
    handle.guests = {name: mux_guest(g) for name, g in handle.guests.items()}

    def down() -> None:
        for g in handle.guests.values():
            g.close_mux()
        lab_down(cfg)

    # Down as soon as the run leaves tests/faults: its TCG guest would slow everything after.
    close = close_on_leaving(Path(__file__).parent, down)
    try:
        yield handle
    finally:
        close()


@pytest.fixture
def profile_path(lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lab profile, pointing at a fresh repository for this test."""
    from appliance.profile import write_private

    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(tmp_path / "repository")
    path = tmp_path / "profile.json"
    write_private(path, json.dumps(doc))
    monkeypatch.setenv("STILLPOINT_PROFILE", str(path))
    return path
