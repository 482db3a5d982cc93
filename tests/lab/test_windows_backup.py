"""A Windows VM backed up end to end, as deep as this machine allows: the lab's vCenter
serves lab-win1 and its disk; the guest is the local WS-Management endpoint of the WinRM
tests (real pywinrm, TLS and the real payload push; the agent behind it is an emulation
speaking the Windows agent's protocol with recorded writer facts — see docs/windows.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_winrm_wsman_endpoint import PASSWORD, USER, WSManEndpoint, make_cert  # noqa: E402

from appliance.jobs import environment  # noqa: E402
from appliance.jobs.backup import BackupOptions, run_backup  # noqa: E402
from appliance.jobs.consistency import ConsistencyPolicy  # noqa: E402
from appliance.profile import load_profile, write_private  # noqa: E402
from appliance.progress import NullProgress  # noqa: E402
from appliance.transport.datastore_http import DatastoreHTTPReader  # noqa: E402
from appliance.vsphere import inventory  # noqa: E402
from appliance.vsphere.snapshots import find_snapshots  # noqa: E402

VM = "lab-win1"


@pytest.fixture
def windows_guest(lab: Any, private_profile_path: Path,
                  tmp_path: Path) -> Iterator[WSManEndpoint]:
    profile_path = private_profile_path
    cert = make_cert(tmp_path / "tls")
    ep = WSManEndpoint(tmp_path / "guest", cert).start()
    doc = json.loads(profile_path.read_text())
    doc["guests"][VM] = {"transport": "winrm", "host": "127.0.0.1", "port": ep.port,
                         "user": USER, "password": PASSWORD, "auth": "basic",
                         "ca_file": str(cert.cert_pem)}
    write_private(profile_path, json.dumps(doc))
    try:
        yield ep
    finally:
        ep.stop()


def backup(profile_path: Path, **policy: Any) -> Any:
    profile = load_profile(profile_path)
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile)
    try:
        opts = BackupOptions(targets=(VM,), policy=ConsistencyPolicy(**policy))
        [result] = run_backup(opts, profile, session, repo, DatastoreHTTPReader(session),
                              NullProgress())
        snapshots_left = find_snapshots(session, inventory.find_vm(session, VM))
    finally:
        session.close()
    return result, repo, snapshots_left


def test_windows_backup_is_vss_consistent_and_truncates_by_plan(
        windows_guest: WSManEndpoint, private_profile_path: Path) -> None:
    profile_path = private_profile_path
    result, repo, left = backup(profile_path)
    assert result.ok, result.error
    assert result.consistency == "application"
    assert not left
    point = repo.get(result.restore_point)
    assert point.metadata["writer_metadata"]["writers"]      # VSS writers recorded
    # Only the databases whose log chain no other tool owns are truncated (msdb facts).
    targets = result.truncation["completed"]["targets"]
    assert [t["database"] for t in targets["sql"]] == ["SalesDB", "Staging"]


def test_windows_writer_failing_after_the_snapshot_is_retried_then_reported(
        windows_guest: WSManEndpoint, private_profile_path: Path) -> None:
    profile_path = private_profile_path
    windows_guest.scenario = "sql-failed-after"
    result, _, left = backup(profile_path, attempts=2, backoff_s=0.1)
    assert not result.ok
    assert "SqlServerWriter" in (result.error or "")
    assert "after 2 attempts" in (result.error or "")
    assert not left, "the snapshot of a failed attempt must be removed"


def test_windows_restore_point_restores_with_the_windows_marker(
        windows_guest: WSManEndpoint, private_profile_path: Path, lab: Any) -> None:
    import subprocess

    result, _, _ = backup(private_profile_path)
    assert result.ok, result.error
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "restore", "vm",
                           result.restore_point, "--name", "lab-win1-restored"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    marker = json.loads(lab.vcsim.guestinfo("lab-win1-restored", "guestinfo.stillpoint.restore"))
    assert marker["restore_point"] == result.restore_point
    assert marker["ad_mode"] == "auto" and len(marker["restore_id"]) == 16
    assert "sql-server" in marker["writers"] and "exchange" in marker["writers"]


def test_a_domain_controller_is_recognised_from_its_writer_metadata() -> None:
    from datetime import UTC, datetime

    from appliance.jobs.restore import is_domain_controller, windows_restore_marker
    from appliance.repository import RestorePoint, VmRef

    def point(writers: list[dict[str, Any]]) -> RestorePoint:
        return RestorePoint(id="f" * 32, vm=VmRef("dc01"), time=datetime.now(UTC),
                            consistency="application", reasons=[], disks=[], metadata={
                                "guest_id": "windows2019srv_64Guest",
                                "writer_metadata": {"writers": writers},
                                "writer_results": {"sql-server": {"kind": "sql-server"}}})

    dc = point([{"name": "active-directory", "kind": "active-directory",
                 "components": [{"domain_controller": True, "invocation_id": "x"}]}])
    member = point([{"name": "vss:SqlServerWriter", "kind": "vss"}])
    assert is_domain_controller(dc) and not is_domain_controller(member)
    marker = windows_restore_marker(dc, "0123456789abcdef")
    assert marker["writers"]["active-directory"]["components"][0]["invocation_id"] == "x"
    assert marker["writers"]["sql-server"] == {"kind": "sql-server"}
