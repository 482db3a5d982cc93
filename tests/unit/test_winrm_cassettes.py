"""WS-Management exchanges replayed from vcrpy cassettes (tests/cassettes/winrm/*.yaml).

The cassettes were recorded from the local endpoint (test_winrm_wsman_endpoint.py) by this
module's `record_all` (`STILLPOINT_RECORD_WINRM=1 pytest tests/unit/test_winrm_cassettes.py`
re-records them; against a real Windows host, point `record_all` at it instead). WS-Man
message ids are made deterministic so that a replay sends byte-identical envelopes, which
the cassette matcher checks (method, path and body). Credentials and cookies are scrubbed
before anything is written; a test asserts that none leaked.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import vcr
from test_winrm_wsman_endpoint import PASSWORD, USER, WSManEndpoint, make_cert, sandbox_path

from appliance.errors import AuthenticationFailed
from appliance.guest.client import AgentClient
from appliance.guest.winrm_channel import WinRMChannel, WinRMOptions
from appliance.guest.winrm_deploy import agent_argv
from appliance.guest.winrm_faults import WinRMQuotaError

CASSETTES = Path(__file__).resolve().parents[1] / "cassettes" / "winrm"
INSTALL = r"C:\ProgramData\Stillpoint\agent"
PUSHED = bytes(range(256)) * 64          # 16 KiB: several chunks at max_envelope_kb=16
SCRUBBED_HEADERS = ("authorization", "www-authenticate", "cookie", "set-cookie")


def _scrub_request(request: Any) -> Any:
    for name in list(request.headers):
        if name.lower() in SCRUBBED_HEADERS:
            del request.headers[name]
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    response["headers"] = {k: v for k, v in response["headers"].items()
                           if k.lower() not in SCRUBBED_HEADERS}
    return response


def recorder(mode: str) -> vcr.VCR:
    return vcr.VCR(cassette_library_dir=str(CASSETTES), record_mode=mode,
                   match_on=("method", "path", "body"), filter_headers=list(SCRUBBED_HEADERS),
                   before_record_request=_scrub_request, before_record_response=_scrub_response,
                   decode_compressed_response=True)


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    counter = itertools.count(1)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(counter)))
    yield


def channel(port: int, ca: Path, password: str = PASSWORD) -> WinRMChannel:
    return WinRMChannel(WinRMOptions(host="127.0.0.1", port=port, username=USER,
                                     password=password, auth="basic", ca_bundle=str(ca),
                                     operation_timeout=5, read_timeout=10, max_envelope_kb=16))


# --- the scripted sessions (the same code records and replays) ---------------------------

def session_run_and_push(port: int, ca: Path) -> dict[str, Any]:
    with channel(port, ca) as ch:
        res = ch.run_powershell("$env:COMPUTERNAME")
        ch.put_file(PUSHED, INSTALL + r"\blob.bin")
    return {"stdout": res.stdout, "code": res.exit_code}


def session_agent(port: int, ca: Path) -> list[str]:
    with channel(port, ca) as ch:
        client = AgentClient(ch.open_process(agent_argv(INSTALL, "serve")))
        seen = [client.hello()["capabilities"]["quiesce"]]
        client.prepare()
        seen.append(client.freeze(timeout_s=20)["quiesce"]["vss_backup_type"])
        seen.append(client.thaw()["state"])
        seen.append(client.request("backup-complete", {"success": True, "truncate": False,
                                                       "restore_point": "rp-1"})["state"])
        client.uninstall()
    return seen


def session_bad_password(port: int, ca: Path) -> None:
    channel(port, ca, password="not-the-password").run_powershell("$env:COMPUTERNAME")


def session_quota(port: int, ca: Path) -> None:
    with channel(port, ca) as ch:
        ch.run_powershell("Write-Output '" + "q" * 8000 + "'")


SESSIONS = {
    "run_and_push.yaml": session_run_and_push,
    "agent_session.yaml": session_agent,
    "bad_password.yaml": session_bad_password,
    "quota_fault.yaml": session_quota,
}


def record_all(tmp_path: Path) -> None:
    cert = make_cert(tmp_path / "tls")
    ep = WSManEndpoint(tmp_path / "guest", cert).start()
    ep.handlers.append((r"COMPUTERNAME", lambda s: (b"WIN-TEST\r\n", b"", 0)))
    install = sandbox_path(ep.sandbox, INSTALL)
    install.mkdir(parents=True)
    (install / "stillpoint-agent.ps1").write_text("# stand-in\n")
    import hashlib
    digest = hashlib.sha256(b"# stand-in\n").hexdigest()
    (install / "MANIFEST.sha256").write_text(f"{digest}  stillpoint-agent.ps1\n")
    try:
        for name, session in SESSIONS.items():
            (CASSETTES / name).unlink(missing_ok=True)
            if name == "quota_fault.yaml":
                ep.max_request_bytes = 20000
            counter = itertools.count(1)
            original = uuid.uuid4
            uuid.uuid4 = lambda: uuid.UUID(int=next(counter))  # type: ignore[assignment]
            try:
                with recorder("all").use_cassette(name):
                    try:
                        session(ep.port, cert.cert_pem)
                    except (AuthenticationFailed, WinRMQuotaError):
                        pass
            finally:
                uuid.uuid4 = original  # type: ignore[assignment]
                ep.max_request_bytes = None
    finally:
        ep.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("STILLPOINT_RECORD_WINRM") == "1":
        record_all(tmp_path_factory.mktemp("record"))
    return make_cert(tmp_path_factory.mktemp("tls")).cert_pem


# --- replays -----------------------------------------------------------------------------

def test_replay_run_and_chunked_push(ca: Path, fixed_ids: None) -> None:
    with recorder("none").use_cassette("run_and_push.yaml") as cassette:
        result = session_run_and_push(5986, ca)
        assert cassette.all_played
    assert result == {"stdout": b"WIN-TEST\r\n", "code": 0}
    sends = [r for r in cassette.requests if b"/shell/Send<" in r.body]
    assert len(sends) > 2        # the 16 KiB file went in several MaxEnvelope-sized lines


def test_replay_agent_session_in_one_shell(ca: Path, fixed_ids: None) -> None:
    with recorder("none").use_cassette("agent_session.yaml") as cassette:
        assert session_agent(5986, ca) == ["vmware-tools-vss", "copy", "thawed", "completed"]
        assert cassette.all_played
    creates = [r for r in cassette.requests if b"transfer/Create<" in r.body]
    assert len(creates) == 1


def test_replay_bad_password(ca: Path, fixed_ids: None) -> None:
    with recorder("none").use_cassette("bad_password.yaml"):
        with pytest.raises(AuthenticationFailed):
            session_bad_password(5986, ca)


def test_replay_quota_fault(ca: Path, fixed_ids: None) -> None:
    with recorder("none").use_cassette("quota_fault.yaml"):
        with pytest.raises(WinRMQuotaError, match="MaxEnvelopeSizekb"):
            session_quota(5986, ca)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_cassettes_hold_no_credentials(name: str) -> None:
    import base64

    text = (CASSETTES / name).read_text()
    assert PASSWORD not in text and "not-the-password" not in text
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in text
    lowered = text.lower()
    for header in SCRUBBED_HEADERS:
        assert f"{header}:" not in lowered, header
    assert json.dumps(USER) not in text
