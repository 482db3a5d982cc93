"""The lab for integration tests: one lab (id 1) for the whole session, always torn down.

VMs: lab-vm1 (a QEMU VM booting the lab's Debian 12 image: its own kernel and systemd,
PostgreSQL and MariaDB; disk 0 the system, disk 1 /data), lab-raw1 / lab-raw2 (no guest: tests
write their disks directly, so the expected image of every snapshot is known exactly) and
lab-win1 (a Windows VM without a guest).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec

# 1 in CI; a developer running two suites at once gives the second another id.
TEST_LAB_ID = int(os.environ.get("STILLPOINT_TEST_LAB_ID", "1"))


def lab_config() -> LabConfig:
    return LabConfig(lab_id=TEST_LAB_ID, cbt_span_cap_mib=64, vms=(
        VMSpec("lab-vm1", disks=(DiskSpec.mib(4096), DiskSpec.mib(512))),
        VMSpec("lab-raw1", has_guest=False, apps=(), disks=(DiskSpec.mib(256), DiskSpec.mib(64))),
        VMSpec("lab-raw2", has_guest=False, apps=(), disks=(DiskSpec.mib(256), DiskSpec.mib(64))),
        VMSpec("lab-win1", guest_id="windows2019srv_64Guest", has_guest=False, apps=(),
               disks=(DiskSpec.mib(64),)),
    ))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator["object"]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (QEMU, taps on a bridge, loop devices)")
    from stillpoint_lab.lab import lab_down, lab_up

    from directory_scope import close_on_leaving

    cfg = lab_config()
    lab_down(cfg)  # a lab left by a killed earlier run
    handle = lab_up(cfg)
    # Down as soon as the run leaves tests/lab: its TCG guest would slow everything after.
    close = close_on_leaving(Path(__file__).parent, lambda: lab_down(cfg))
    try:
        yield handle
    finally:
        close()


@pytest.fixture
def profile_path(lab: "object", tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lab's own profile (the lab adds the guests of VMs it boots to it), with a fresh
    repository for this test ($STILLPOINT_REPOSITORY)."""
    monkeypatch.setenv("STILLPOINT_PROFILE", str(lab.profile_path))  # type: ignore[attr-defined]
    monkeypatch.setenv("STILLPOINT_REPOSITORY", str(tmp_path / "repository"))
    return Path(lab.profile_path)  # type: ignore[attr-defined]


@pytest.fixture
def private_profile_path(profile_path: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the lab profile that a test may change."""
    from appliance.profile import write_private

    path = tmp_path / "profile.json"
    write_private(path, profile_path.read_text())
    monkeypatch.setenv("STILLPOINT_PROFILE", str(path))
    return path
