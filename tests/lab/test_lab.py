"""The lab itself: pyVmomi over verified TLS, CBT exact against a guest under load, and
`lab up` / `lab down` leaving the machine as it found it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.jobs import environment
from stillpoint_lab import workload
from appliance.profile import load_profile
from appliance.vsphere import cbt, inventory, snapshots

BLOCK = 64 * 1024


def test_cbt_between_two_snapshots_is_exact_under_a_postgresql_workload(
        lab: Any, profile_path: Path) -> None:
    profile = load_profile(profile_path)
    session = environment.open_vcenter(profile)   # verified TLS: pinned thumbprint
    load = workload.start_workload(lab.guests["lab-vm1"], rate=50)
    snaps = []
    try:
        vm = inventory.find_vm(session, "lab-vm1")
        info = inventory.vm_info(session, vm)
        assert info.ip_address == lab.guests["lab-vm1"].ip and info.tools_running
        cbt.enable_cbt(session, vm)
        time.sleep(2)
        snaps.append(snapshots.create_snapshot(session, vm, "lab-test-1"))
        time.sleep(3)   # the workload keeps committing in between
        snaps.append(snapshots.create_snapshot(session, vm, "lab-test-2"))
        [d1] = snapshots.snapshot_disks(session, snaps[0])
        [d2] = snapshots.snapshot_disks(session, snaps[1])
        assert d1.capacity == 512 << 20 and d1.capacity > 64 << 20   # over the span cap
        areas = cbt.changed_areas(session, vm, snaps[1], d2.key, d2.capacity, d1.change_id)
        first_page = vm.QueryChangedDiskAreas(snapshot=snaps[1].snapshot, deviceKey=d2.key,
                                              startOffset=0, changeId=d1.change_id)
        assert first_page.length == 64 << 20            # so 8 replies cover the 512 MiB disk
        changed = {o // BLOCK + i for o, n in areas for i in range(n // BLOCK)}
        differing = _differing_blocks(_capture(lab, d1), _capture(lab, d2))
        assert differing, "the workload wrote nothing between the snapshots"
        assert changed == differing
    finally:
        workload.stop_workload(load)
        for snap in snaps:
            snapshots.remove_snapshot(session, snap)
        session.close()


def _capture(lab: Any, disk: snapshots.SnapshotDisk) -> Path:
    descriptor = Path(lab.vcsim.datastore_dir) / disk.path
    return descriptor.with_name(descriptor.name.replace(".vmdk", "-flat.vmdk"))


def _differing_blocks(a: Path, b: Path) -> set[int]:
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        index = 0
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if not x and not y:
                return out
            if x != y:
                out.add(index)
            index += 1


def _machine_state() -> dict[str, Any]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout

    procs = run("ps", "-eo", "args")
    return {
        "netns": sorted(ln.split()[0] for ln in run("ip", "netns").splitlines()
                        if ln.startswith("sp0-")),
        "links": sorted(n for n in re.findall(r"^\d+: (\S+?)[:@]", run("ip", "-o", "link"),
                                              re.M) if n == "spbr0" or n.startswith("sp0h")),
        "loops": sorted(ln for ln in run("losetup", "-a").splitlines()
                        if "stillpoint-lab/0/" in ln),
        "mounts": sorted(ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text()
                         .splitlines() if "stillpoint-lab/0" in ln),
        "processes": sorted(p for p in procs.splitlines()
                            if "stillpoint-lab/0/" in p or "stillpoint-vcsim" in p
                            and "/0/" in p),
        "state_dir": os.path.exists("/var/lib/stillpoint-lab/0"),
    }


def test_lab_up_and_down_twice_leaves_the_machine_as_it_was() -> None:
    env = {**os.environ, "STILLPOINT_LAB_ID": "0"}
    cli = [sys.executable, "-m", "stillpoint_lab.cli"]
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert '"status": "down"' in status.stdout, "lab 0 must be down before this test"
    before = _machine_state()
    for _ in range(2):
        up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=600)
        try:
            assert up.returncode == 0, up.stderr
            assert '"status": "up"' in subprocess.run(
                [*cli, "status"], env=env, capture_output=True, text=True).stdout
            assert _machine_state() != before
        finally:
            down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert down.returncode == 0, down.stderr
        assert _machine_state() == before
