"""A lab guest is a virtual machine: its own kernel and systemd, reached as a VM is reached.

Against the session's lab (tests/lab/conftest.py): lab-vm1 is a QEMU VM booting the lab's
Debian 12 image; everything here is asked of it over SSH (host key pinned), through its
guest agent, or through the vSphere API, never from the host's side of its disks.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.jobs import environment
from appliance.profile import load_profile
from appliance.vsphere import inventory, snapshots
from stillpoint_lab import hostd, workload
from stillpoint_lab.image import layout
from stillpoint_lab.image.build import cached_guest_image

VM = "lab-vm1"


def test_the_guest_runs_its_own_kernel_and_file_systems_from_the_vm_disks(lab: Any) -> None:
    g = lab.guests[VM]
    image = cached_guest_image()
    assert image is not None
    assert g.run(["uname", "-r"]).stdout.strip() == image.kernel_release
    machine_id = g.run(["cat", "/etc/machine-id"]).stdout.strip()
    assert len(machine_id) == 32 and int(machine_id, 16)      # made at its first boot
    for target, source in (("/", "/dev/vda1"), ("/data", "/dev/vdb")):
        found = g.run(["findmnt", "-rn", "-o", "SOURCE,FSTYPE", "--mountpoint", target]).stdout
        assert found.split() == [source, "ext4"], (target, found)
    assert g.run(["systemctl", "is-system-running", "--wait"], timeout=120
                 ).stdout.strip() in ("running", "degraded")


def test_ssh_pins_the_host_key_the_guest_agent_reported(lab: Any) -> None:
    g = lab.guests[VM]
    assert g.run(["sudo", "-n", "true"]).returncode == 0
    # The key hostd read through qemu-guest-agent is the one sshd presents.
    pub = g.run(["cat", layout.SSH_HOST_KEY_PUB]).stdout.split()[:2]
    assert g.host_key_line.split()[1:3] == pub
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(g.state_dir / "not-the-key")], input="y\n", text=True,
                           capture_output=True)
    assert other.returncode == 0, other.stderr
    wrong = (g.state_dir / "not-the-key.pub").read_text().split()[:2]
    impostor = replace(g, host_key_line=f"{g.ip} {wrong[0]} {wrong[1]}",
                       state_dir=g.state_dir / "impostor")
    refused = impostor.run(["true"])
    assert refused.returncode == 255, refused
    assert "host key verification failed" in refused.stderr.lower(), refused.stderr


def test_databases_keep_data_logs_and_archives_on_the_vm_disk(lab: Any) -> None:
    g = lab.guests[VM]
    pg = g.run(["runuser", "-u", "postgres", "--", "psql", "-h", layout.PG_SOCKET_DIR, "-qAt",
                "-c", "SELECT current_setting('data_directory'), current_setting('wal_level'),"
                      " current_setting('archive_mode')"])
    assert pg.stdout.strip() == f"{layout.PGDATA}|replica|on", pg.stderr
    my = g.run(["mariadb", "-N", "-B", "-e",
                "SELECT @@datadir, @@log_bin, @@binlog_format, @@myisam_recover_options"])
    assert my.stdout.split() == [layout.MY_DATADIR + "/", "1", "ROW", "OFF"], my.stderr
    archived = g.run(["sh", "-c", f"ls {layout.PG_WAL_ARCHIVE} | head -1"]).stdout
    binlogs = g.run(["sh", "-c", f"ls {layout.MY_BINLOG_DIR}"]).stdout
    # Any numbered binlog: earlier tests' backups purge the old ones (log truncation).
    assert "mysql-bin.index" in binlogs and re.search(r"mysql-bin\.\d{6}", binlogs), binlogs
    assert archived.strip() == "" or len(archived.strip()) >= 24


def test_vmware_rpctool_reads_guestinfo_that_came_through_the_hypervisor(lab: Any) -> None:
    g = lab.guests[VM]
    raw = g.run(["cat", f"{layout.FW_CFG_SYSFS}/{layout.FW_CFG_GUESTINFO}/raw"])
    assert raw.returncode == 0, raw.stderr
    values = json.loads(raw.stdout)          # the VM's guestinfo.* at power-on (fw_cfg)
    missing = g.run(["vmware-rpctool", "info-get guestinfo.stillpoint.no-such-key"])
    assert (missing.returncode, missing.stderr.strip()) == (1, "No value found")
    for key, value in values.items():
        got = g.run(["vmware-rpctool", f"info-get {key}"])
        assert (got.returncode, got.stdout.rstrip("\n")) == (0, value)


def test_vsphere_shows_what_the_guest_agent_reports(lab: Any, profile_path: Path) -> None:
    g = lab.guests[VM]
    session = environment.open_vcenter(load_profile(profile_path))
    try:
        info = inventory.vm_info(session, inventory.find_vm(session, VM))
    finally:
        session.close()
    assert info.ip_address == g.ip and info.tools_running
    assert info.host_name == g.run(["hostname"]).stdout.strip()


def test_workload_keeps_its_invariants(lab: Any, tmp_path: Path) -> None:
    g = lab.guests[VM]
    load = workload.start_workload(g, rate=30, log_path=tmp_path / "commits.log")
    try:
        time.sleep(5)
    finally:
        workload.stop_workload(load)
    commits = workload.read_log(tmp_path / "commits.log")
    assert {c.db for c in commits} == {"pg", "my"}
    report = workload.check_invariants(g)
    assert report.ok, report


def test_snapshot_is_a_point_in_time_that_leaves_the_guest_running(
        lab: Any, profile_path: Path, tmp_path: Path, record_property: Any) -> None:
    """CreateSnapshot_Task: milliseconds in the hypervisor, the guest never stops (the
    workload commits throughout), and the snapshot's disk is a file that no longer changes
    while the guest keeps writing; removal consolidates the writes back."""
    g = lab.guests[VM]
    session = environment.open_vcenter(load_profile(profile_path))
    load = workload.start_workload(g, rate=30, log_path=tmp_path / "commits.log")
    try:
        vm = inventory.find_vm(session, VM)
        time.sleep(2)
        snap = snapshots.create_snapshot(session, vm, "lab-test-pit")
        try:
            status = hostd.call(lab.config, "/vm/status", {"vm": VM})
            assert status["running"] and status["snapshot"], status
            disk = snapshots.snapshot_disks(session, snap)[1]          # /data
            flat = _flat(lab, disk)
            before = _sha256(flat)
            g.run(["sh", "-c", "head -c 8M /dev/urandom > /data/pit-probe && sync"])
            time.sleep(2)
            assert _sha256(flat) == before, "the snapshot's disk changed"
        finally:
            snapshots.remove_snapshot(session, snap)
        probe = g.run(["sha256sum", "/data/pit-probe"]).stdout.split()[0]
        assert hostd.call(lab.config, "/vm/status", {"vm": VM})["snapshot"] is None
    finally:
        workload.stop_workload(load)
        session.close()
    commits = workload.read_log(tmp_path / "commits.log")
    gaps = [b.committed - a.committed for a, b in zip(commits, commits[1:])]
    record_property("longest_commit_gap_s", round(max(gaps), 3))
    assert len(probe) == 64
    g.run(["rm", "-f", "/data/pit-probe"])


def _flat(lab: Any, disk: snapshots.SnapshotDisk) -> Path:
    descriptor = Path(lab.vcsim.datastore_dir) / disk.path
    return descriptor.with_name(descriptor.name.replace(".vmdk", "-flat.vmdk"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
