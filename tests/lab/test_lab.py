"""The lab itself: pyVmomi over verified TLS, CBT from QEMU's dirty bitmaps against a guest
under load, and
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


def test_cbt_between_two_snapshots_covers_every_changed_block_under_a_workload(
        lab: Any, profile_path: Path, tmp_path: Path, record_property: Any) -> None:
    """Two point-in-time images of a VM whose PostgreSQL and MariaDB commit all along, and
    QueryChangedDiskAreas between them (QEMU's dirty bitmaps behind it): no block that
    differs is missing, and the old image plus the reported areas is the new image."""
    profile = load_profile(profile_path)
    session = environment.open_vcenter(profile)   # verified TLS: pinned thumbprint
    load = workload.start_workload(lab.guests["lab-vm1"], rate=50)
    images: list[Path] = []
    change_ids: list[str] = []
    try:
        vm = inventory.find_vm(session, "lab-vm1")
        info = inventory.vm_info(session, vm)
        assert info.ip_address == lab.guests["lab-vm1"].ip and info.tools_running
        cbt.enable_cbt(session, vm)
        for n in (1, 2):
            time.sleep(3)   # the workload keeps committing in between
            snap = snapshots.create_snapshot(session, vm, f"lab-test-{n}")
            try:
                d = snapshots.snapshot_disks(session, snap)[0]
                images.append(_copy_point_in_time(lab, d, tmp_path / f"image{n}.raw"))
                change_ids.append(str(d.change_id))
                if n == 2:
                    areas = cbt.changed_areas(session, vm, snap, d.key, d.capacity,
                                              change_ids[0])
                    first_page = vm.QueryChangedDiskAreas(
                        snapshot=snap.snapshot, deviceKey=d.key, startOffset=0,
                        changeId=change_ids[0])
            finally:
                snapshots.remove_snapshot(session, snap)
        assert first_page.length == 64 << 20            # paged by the lab's span cap
        changed = {o // BLOCK + i for o, n in areas for i in range(n // BLOCK)}
        differing = _differing_blocks(images[0], images[1])
        record_property("cbt", {"differing_blocks": len(differing),
                                "reported_blocks": len(changed)})
        assert differing, "the workload wrote nothing between the snapshots"
        assert differing <= changed, f"missed: {sorted(differing - changed)[:10]}"
        assert _apply(images[0], images[1], changed) == _digest(images[1])
    finally:
        workload.stop_workload(load)
        session.close()


def _copy_point_in_time(lab: Any, disk: snapshots.SnapshotDisk, to: Path) -> Path:
    """The snapshot's frozen flat file, copied while the VM goes on writing elsewhere."""
    descriptor = Path(lab.vcsim.datastore_dir) / disk.path
    flat = descriptor.with_name(descriptor.name.replace(".vmdk", "-flat.vmdk"))
    subprocess.run(["cp", "--sparse=always", str(flat), str(to)], check=True)
    return to


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


def _apply(old: Path, new: Path, blocks: set[int]) -> str:
    """sha256 of `old` with `blocks` taken from `new` (what an incremental restore does)."""
    with open(old, "r+b") as fo, open(new, "rb") as fn:
        for b in sorted(blocks):
            fn.seek(b * BLOCK)
            fo.seek(b * BLOCK)
            fo.write(fn.read(BLOCK))
    return _digest(old)


def _digest(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def _machine_state() -> dict[str, Any]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout

    procs = run("ps", "-eo", "args")
    return {
        "netns": sorted(ln.split()[0] for ln in run("ip", "netns").splitlines()
                        if ln.startswith("sp0")),
        "links": sorted(n for n in re.findall(r"^\d+: (\S+?)[:@]", run("ip", "-o", "link"),
                                              re.M) if re.match(r"^(spbr0|spsb0|sp0t\d+)$", n)),
        "loops": sorted(ln for ln in run("losetup", "-a").splitlines()
                        if "stillpoint-lab/0/" in ln),
        "mounts": sorted(ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text()
                         .splitlines() if "stillpoint-lab/0" in ln),
        "processes": sorted(p for p in procs.splitlines()
                            if "stillpoint-lab/0/" in p or "stillpoint-qemu-lab0-" in p
                            or "stillpoint-vcsim" in p and "/0/" in p),
        "state_dir": os.path.exists("/var/lib/stillpoint-lab/0"),
    }


def test_lab_up_and_down_twice_leaves_the_machine_as_it_was() -> None:
    env = {**os.environ, "STILLPOINT_LAB_ID": "0"}
    cli = [sys.executable, "-m", "stillpoint_lab.cli"]
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert '"status": "down"' in status.stdout, "lab 0 must be down before this test"
    before = _machine_state()
    # The first round boots a guest (QEMU, its tap); the second, without one, shows that an
    # up after a down starts from a clean machine, without a second TCG boot.
    for vms in ("1", "0"):
        up = subprocess.run([*cli, "up", "--vms", vms], env=env, capture_output=True,
                            text=True, timeout=600)
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


LAB_FILE = """
[[vm]]
name = "Datenbank Müller 1"
folder = "prod/db"
guest = false
disks = [1049088, "2 MiB"]

[[vm]]
name = "web 50% (copy)"
guest = false
disks = ["1 MiB"]
"""


def test_lab_file_builds_folders_unicode_names_and_byte_sized_disks(tmp_path: Path) -> None:
    """`lab up --config`: the lab a user describes (docs/lab.md), no pyVmomi script. The VMs
    are found by inventory path, backed up (full, then an incremental of what changed) and
    restored under another unicode name, bit for bit."""
    import json

    from stillpoint_lab.config import LabConfig

    env = {**os.environ, "STILLPOINT_LAB_ID": "0"}
    cli = [sys.executable, "-m", "stillpoint_lab.cli"]
    sp = [sys.executable, "-m", "appliance.cli"]
    (tmp_path / "lab.toml").write_text(LAB_FILE)
    (tmp_path / "bad.toml").write_text('[[vm]]\nname = "x"\ndisks = [1000]\n')
    bad = subprocess.run([*cli, "up", "--config", str(tmp_path / "bad.toml")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole 512-byte sectors" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    up = subprocess.run([*cli, "up", "--config", str(tmp_path / "lab.toml")], env=env,
                        capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stderr
        state = LabConfig(lab_id=0).state_dir
        spenv = {**env, "STILLPOINT_PROFILE": str(state / "profile.json"),
                 "STILLPOINT_REPOSITORY": str(tmp_path / "repository")}

        def stillpoint(*args: str) -> str:
            done = subprocess.run([*sp, *args], env=spenv, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        stillpoint("init")
        vm = "DC0/vm/prod/db/Datenbank Müller 1"
        stillpoint("backup", vm)
        datastore = state / "vcsim" / "datastore"
        src = datastore / "Datenbank Müller 1" / "Datenbank Müller 1_1-flat.vmdk"
        assert src.stat().st_size == 2 << 20
        assert (datastore / "Datenbank Müller 1" / "Datenbank Müller 1-flat.vmdk"
                ).stat().st_size == 1049088
        with open(src, "r+b") as f:
            f.seek(5000)
            f.write(os.urandom(100_000))
        out = stillpoint("backup", vm)
        assert "read 128.0 KiB" in out, out          # CBT: the two 64 KiB blocks written
        stillpoint("backup", "web 50% (copy)")
        points = json.loads(stillpoint("list", "--json"))
        assert sorted({p["vm"] for p in points}) == ["Datenbank Müller 1", "web 50% (copy)"]
        assert {p["folder"] for p in points if p["vm"] == "Datenbank Müller 1"} == {
            "DC0/vm/prod/db"}, points
        newest = [p for p in points if p["vm"] == "Datenbank Müller 1"][-1]["id"]
        stillpoint("restore", "vm", newest, "--name", "Kopie Müller – 2")
        [copy] = (datastore / "Kopie Müller – 2").glob("*_1-flat.vmdk")
        assert copy.read_bytes() == src.read_bytes()
        # "%" is escaped in the datastore folder's name as vSphere escapes it
        assert (datastore / "web 50%25 (copy)").is_dir()
        # A "/" in a name (the simulator panicked in CreateVM and Stillpoint said vCenter
        # could not be reached): kept as vCenter keeps it, the files in a folder named
        # without it, the VM reachable by its name and by its inventory path (%2f).
        stillpoint("restore", "vm", newest, "--name", "slash/name copy")
        [copy] = (datastore / "slash_name copy").glob("*_1-flat.vmdk")
        assert copy.read_bytes() == src.read_bytes()
        # (A job resolves its VMs as a backup does; the lab cannot snapshot a QEMU-backed
        # VM that was never powered on, which a restored one is.)
        folder = "DC0/vm"               # a new VM goes to the VM folder unless --folder
        for n, selector in enumerate(("slash/name copy", f"{folder}/slash%2fname copy")):
            stillpoint("job", "create", f"j{n}", "--vm", selector, "--daily", "01:00")
        jobs = json.loads(stillpoint("job", "list", "--json"))
        assert len({j["targets"][0] for j in jobs}) == 1, jobs
        missing = subprocess.run([*sp, "backup", f"{folder}/slash/name copy"], env=spenv,
                                 capture_output=True, text=True, timeout=120)
        assert missing.returncode == 3 and "written %2f" in missing.stderr, missing.stderr
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True,
                              timeout=300)
    assert down.returncode == 0, down.stderr
