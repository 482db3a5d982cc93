"""The Windows backup path over WinRM end to end against the local WS-Man endpoint:
push the real payload (chunked, sha256-checked), manifest check in the "guest", agent
session in one long-lived shell (hello, metadata, prepare, freeze, thaw, truncation
decision, backup-complete with targets), uninstall and the leftover check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_winrm_wsman_endpoint import PASSWORD, USER, WSManEndpoint, make_cert, sandbox_path

from appliance.errors import GuestError
from appliance.guest.client import AgentFailed
from appliance.guest.winrm_channel import WinRMChannel, WinRMOptions
from appliance.guest.winrm_deploy import (
    DEFAULT_INSTALL_DIR,
    PAYLOAD_DIR,
    deploy_windows_agent,
    remaining,
)
from appliance.guest.winrm_vss import TruncationPolicy, parse_vssadmin_writers, truncation_plan


@pytest.fixture
def guest(tmp_path: Path):
    cert = make_cert(tmp_path / "tls")
    ep = WSManEndpoint(tmp_path / "guest", cert).start()
    ch = WinRMChannel(WinRMOptions(host="127.0.0.1", port=ep.port, username=USER,
                                   password=PASSWORD, auth="basic", ca_bundle=str(cert.cert_pem),
                                   operation_timeout=5, read_timeout=10, max_envelope_kb=64))
    try:
        yield ep, ch
    finally:
        try:
            ch.close()
        finally:
            ep.stop()


def test_backup_flow_over_winrm(guest: tuple[WSManEndpoint, WinRMChannel]) -> None:
    ep, ch = guest
    install = sandbox_path(ep.sandbox, DEFAULT_INSTALL_DIR)
    with deploy_windows_agent(ch, config={"freeze_timeout_s": 30}) as session:
        # Every payload file arrived byte for byte, plus the manifest and config.
        for rel in ["stillpoint-agent.ps1", "lib/VssWriters.ps1", "MANIFEST.sha256"]:
            assert (install / rel).read_bytes() == (PAYLOAD_DIR / rel).read_bytes()
        assert json.loads((install / "config.json").read_text()) == {"freeze_timeout_s": 30}
        assert (install / "boot-task").exists()                  # first-boot task registered
        assert session.hello["capabilities"]["quiesce"] == "vmware-tools-vss"
        shell_ids = set(ep.shells)
        client = session.client
        meta = client.gather_metadata()
        raw = meta["raw"]["vssadmin_list_writers"]
        assert {w.name for w in parse_vssadmin_writers(raw)} >= {"SqlServerWriter", "NTDS"}
        client.prepare()
        frozen = client.freeze(timeout_s=10)
        assert frozen["quiesce"] == {"by": "vmware-tools-vss", "snapshot_quiesce": True,
                                     "vss_backup_type": "copy"}
        thawed = client.thaw()
        plan = truncation_plan(thawed["results"], TruncationPolicy())
        assert [t["database"] for t in plan.sql] == ["SalesDB", "Staging"]
        done = client.request("backup-complete", {"success": True, "restore_point": "rp-1",
                                                  "truncate": True, "targets": plan.targets()})
        assert done["completed"]["targets"]["sql"][0]["database"] == "SalesDB"
        assert set(ep.shells) == shell_ids          # one shell for the whole session
    assert not install.exists()
    assert remaining(ch, DEFAULT_INSTALL_DIR) == []


def test_writer_failure_names_the_writer(guest: tuple[WSManEndpoint, WinRMChannel]) -> None:
    ep, ch = guest
    ep.scenario = "sql-failed-before"
    with deploy_windows_agent(ch, boot_hook=False) as session:
        with pytest.raises(AgentFailed) as info:
            session.client.prepare()
        assert info.value.writer == "SqlServerWriter" and info.value.code == "writer-failed"
        assert "[8]" in str(info.value)
    assert not sandbox_path(ep.sandbox, DEFAULT_INSTALL_DIR).exists()


def test_writer_failed_after_snapshot(guest: tuple[WSManEndpoint, WinRMChannel]) -> None:
    ep, ch = guest
    ep.scenario = "sql-failed-after"
    with deploy_windows_agent(ch, boot_hook=False) as session:
        session.client.prepare()
        session.client.freeze()
        with pytest.raises(AgentFailed, match="SqlServerWriter"):
            session.client.thaw()


def test_stale_payload_is_refused_in_the_guest(guest: tuple[WSManEndpoint, WinRMChannel],
                                               tmp_path: Path) -> None:
    ep, ch = guest
    payload = tmp_path / "payload"
    for rel in ["stillpoint-agent.ps1", "MANIFEST.sha256"]:
        (payload / rel).parent.mkdir(parents=True, exist_ok=True)
        (payload / rel).write_bytes((PAYLOAD_DIR / rel).read_bytes())
    lines = [ln for ln in (payload / "MANIFEST.sha256").read_text().splitlines()
             if ln.endswith("stillpoint-agent.ps1")]
    (payload / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    # Tamper after the local check: the guest must refuse (its own manifest check).
    original = ch.put_file

    def tampering_put(source, remote, mode=0o600, timeout=600.0):  # type: ignore[no-untyped-def]
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if remote.endswith("stillpoint-agent.ps1"):
            data = data + b"\n# tampered\n"
        return original(data, remote, mode, timeout)

    ch.put_file = tampering_put  # type: ignore[method-assign]
    with pytest.raises(GuestError, match="verifying the agent payload"):
        deploy_windows_agent(ch, payload_dir=payload)
    assert not sandbox_path(ep.sandbox, DEFAULT_INSTALL_DIR).exists()


def test_install_dir_must_be_deep_and_absolute(guest: tuple[WSManEndpoint, WinRMChannel]) -> None:
    _, ch = guest
    with pytest.raises(GuestError, match="absolute Windows path"):
        deploy_windows_agent(ch, install_dir=r"C:\agent")
