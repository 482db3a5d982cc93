"""deploy_agent / AgentSession / remove_agent through the local channel (a temp 'guest')."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.errors import GuestError
from appliance.guest.client import AgentClient, AgentFailed
from appliance.guest.deploy import deploy_agent, payload_files, remove_agent
from appliance.guest.local import LocalChannel


def config(tmp: Path) -> dict:
    return {"filesystems": {"include": []}, "postgresql": {"discover": False},
            "mariadb": {"discover": False}, "hooks": {"dirs": []},
            "boot": {"hook_dirs": [str(tmp / "boot.d")]}}


def test_deploy_runs_the_agent_and_leaving_uninstalls(tmp_path: Path) -> None:
    install = str(tmp_path / "opt" / "stillpoint" / "agent")
    with deploy_agent(LocalChannel(), install, config(tmp_path)) as session:
        assert session.hello["protocol_version"] == 1
        assert (tmp_path / "boot.d" / "stillpoint-restore").exists()
        assert os.stat(install).st_mode & 0o777 == 0o700
        assert os.stat(Path(install) / "config.json").st_mode & 0o777 == 0o600
        assert json.loads((Path(install) / "config.json").read_text())["hooks"]["dirs"] == []
        assert session.client.gather_metadata()["writers"] == []
    assert not os.path.exists(install)
    assert not (tmp_path / "boot.d" / "stillpoint-restore").exists()


def test_leaving_after_a_failure_still_uninstalls(tmp_path: Path) -> None:
    install = str(tmp_path / "agent-dir" / "agent")
    with (pytest.raises(AgentFailed),
          deploy_agent(LocalChannel(), install, config(tmp_path)) as session):
        session.client.freeze()      # before prepare: bad-state
    assert not os.path.exists(install)


def test_remove_agent_without_a_live_session(tmp_path: Path) -> None:
    install = str(tmp_path / "x" / "agent")
    session = deploy_agent(LocalChannel(), install, config(tmp_path))
    session.client.close()
    (Path(install) / "stillpoint_agent" / "server.py").write_text("broken")  # agent can't run
    remove_agent(LocalChannel(), install, config(tmp_path))
    assert not os.path.exists(install)
    assert not (tmp_path / "boot.d" / "stillpoint-restore").exists()


def test_shallow_install_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestError):
        deploy_agent(LocalChannel(), "/agent", config(tmp_path))


def test_payload_manifest_is_checked_locally(tmp_path: Path) -> None:
    assert any(rel == "stillpoint-agent" for _, rel in payload_files())
    (tmp_path / "MANIFEST.sha256").write_text("0" * 64 + "  f\n")
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestError, match="does not match"):
        payload_files(tmp_path)


class SilentStream:
    """A stream whose agent never answers."""

    def __init__(self) -> None:
        self.closed = False
        self.sent: list[str] = []

    def write_line(self, line: str) -> None:
        self.sent.append(line)

    def read_line(self, timeout: float) -> str | None:
        raise GuestError(f"no answer from the agent within {timeout:.0f} s")

    def stderr_text(self) -> str:
        return ""

    def close(self) -> int | None:
        self.closed = True
        return None


def test_a_silent_agent_times_out_and_the_stream_is_closed() -> None:
    stream = SilentStream()
    client = AgentClient(stream, timeouts={"freeze": 0.1})
    with pytest.raises(GuestError, match="no answer"):
        client.freeze()
    assert stream.closed and client.closed       # EOF makes the agent thaw
    assert json.loads(stream.sent[0])["op"] == "freeze"


def test_ancestors_deploy_made_are_removed_but_not_what_was_there(tmp_path: Path) -> None:
    made = tmp_path / "made" / "by" / "deploy"
    with deploy_agent(LocalChannel(), str(made / "agent"), config(tmp_path)):
        assert (made / "agent" / "stillpoint-agent").is_file()
        assert not (made / "agent" / ".payload.tar").exists()
    assert not (tmp_path / "made").exists()
    kept = tmp_path / "kept"
    (kept / "other").mkdir(parents=True)
    with deploy_agent(LocalChannel(), str(kept / "sp" / "agent"), config(tmp_path)):
        pass
    assert (kept / "other").is_dir() and not (kept / "sp").exists()
