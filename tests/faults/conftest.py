"""The fault suite's own lab (id 4), so that it can break things without disturbing others.

VMs: lab-vm1 and lab-vm2 (real guests with PostgreSQL and MariaDB, the soak's two VMs),
lab-raw1 (no guest, two small disks: fast kill-at-every-phase runs whose expected images are
known exactly). The `lab` fixture and `profile_path` (a fresh repository per test) mirror
tests/lab/conftest.py; fixtures here add the suite's own checks (leaks, guest thawed).
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

# Our lab id (STILLPOINT_FAULTS_LAB_ID overrides it when several checkouts test side by side).
FAULTS_LAB_ID = int(os.environ.get("STILLPOINT_FAULTS_LAB_ID", "9"))


def lab_config() -> LabConfig:
    return LabConfig(lab_id=FAULTS_LAB_ID, vms=(
        VMSpec("lab-vm1", disks=(DiskSpec(384),)),
        VMSpec("lab-vm2", disks=(DiskSpec(384),)),
        VMSpec("lab-raw1", has_guest=False, apps=(), disks=(DiskSpec(96), DiskSpec(32))),
    ))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, loop devices, mounts)")
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = lab_config()
    lab_down(cfg)  # a lab left by a killed earlier run
    handle = lab_up(cfg)
    try:
        yield handle
    finally:
        lab_down(cfg)


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
