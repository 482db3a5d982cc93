"""The agent's protocol loop and session state machine, with hook-script writers only.

The agent runs as a real subprocess (via LocalChannel and AgentClient); its writers are
limited by config to hook scripts in a temp dir, so nothing on this machine is frozen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.guest.client import AgentClient, AgentFailed
from appliance.guest.local import LocalChannel

AGENT = Path(__file__).resolve().parents[2] / "agent_payload" / "linux" / "stillpoint-agent"


def hook(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict:
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    log = tmp_path / "calls.log"
    hook(hooks, "10-record", f'echo "$1" >> {log}\n')
    cfg = {
        "freeze_timeout_s": 5,
        "state_dir": str(tmp_path / "state"),
        "filesystems": {"include": []},
        "postgresql": {"discover": False},
        "mariadb": {"discover": False},
        "hooks": {"dirs": [str(hooks)], "pre_freeze_script": None, "post_thaw_script": None},
        "boot": {"hook_dirs": [str(tmp_path / "boot.d")]},
    }
    return {"cfg": cfg, "hooks": hooks, "log": log, "tmp": tmp_path}


@pytest.fixture
def client(env: dict) -> Iterator[AgentClient]:
    c = AgentClient(LocalChannel().open_process([str(AGENT), "serve", "--config", "/nonexistent"]))
    c.hello(env["cfg"])
    try:
        yield c
    finally:
        c.close()


def calls(env: dict) -> list[str]:
    return env["log"].read_text().split() if env["log"].exists() else []


def raw(lines: list[str]) -> list[dict]:
    out = subprocess.run([str(AGENT), "serve", "--config", "/nonexistent"],
                         input="\n".join(lines) + "\n", check=False, capture_output=True, text=True,
                         timeout=30)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_hello_negotiates_and_reports_host(client: AgentClient) -> None:
    assert client.protocol_version == 1
    hello = client.request("hello", {"versions": [1, 2]})
    assert hello["protocol_version"] == 1 and "freeze" in hello["capabilities"]["ops"]
    assert hello["host"]["hostname"] and hello["agent_version"]


def test_errors_are_structured() -> None:
    out = raw([
        '{"v":1,"id":1,"op":"hello","args":{"versions":[7]}}',
        '{"v":9,"id":2,"op":"status"}',
        '{"v":1,"id":3,"op":"frobnicate"}',
        'not json',
        '{"v":1,"id":5,"op":"freeze"}',
        '{"v":1,"id":6,"op":"thaw"}',
        '{"v":1,"id":7,"op":"backup-complete","args":{"success":"yes"}}',
        '{"v":1,"id":8,"op":"prepare","args":{"config":{"bogus":1}}}',
    ])
    codes = [(r["id"], r["ok"], r.get("error", {}).get("code")) for r in out]
    assert codes == [
        (1, False, "unsupported-version"), (2, False, "unsupported-version"),
        (3, False, "unknown-op"), (None, False, "bad-request"), (5, False, "bad-state"),
        (6, False, "bad-state"), (7, False, "bad-request"), (8, False, "config-invalid")]
    assert all(isinstance(r["duration_ms"], int) and r["v"] == 1 for r in out)


def test_attempt_runs_hooks_and_records_durations(client: AgentClient, env: dict) -> None:
    meta = client.gather_metadata()
    assert [w["kind"] for w in meta["writers"]] == ["hooks"]
    client.prepare()
    frozen = client.freeze(timeout_s=3)
    assert frozen["deadline_s"] == 3 and frozen["writers"]["hooks"]["state"] == "frozen"
    thawed = client.thaw()
    assert thawed["state"] == "thawed" and calls(env) == ["freeze", "thaw"]
    assert set(thawed["durations"]) >= {"prepare_ms", "freeze_ms", "thaw_ms", "post_ms",
                                         "held_ms"}
    done = client.backup_complete(success=True, restore_point="rp-7", truncate=True)
    assert done["completed"]["restore_point"] == "rp-7" and done["state"] == "completed"


def test_freeze_timeout_cannot_exceed_the_configured_limit(client: AgentClient) -> None:
    client.prepare()
    assert client.freeze(timeout_s=600)["deadline_s"] == 5
    client.thaw()


def test_watchdog_aborts_without_the_client(client: AgentClient, env: dict) -> None:
    client.prepare({"freeze_timeout_s": 0.5})
    client.freeze()
    deadline = time.monotonic() + 15
    while len(calls(env)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls(env) == ["freeze", "freezeFail"]      # thawed by the watchdog alone
    status = client.status()
    assert status["state"] == "expired" and status["failure"]["code"] == "freeze-expired"
    with pytest.raises(AgentFailed) as err:
        client.thaw()
    assert err.value.code == "freeze-expired"


def test_eof_aborts_at_once(env: dict) -> None:
    c = AgentClient(LocalChannel().open_process([str(AGENT), "serve", "--config", "/nonexistent"]))
    c.hello(env["cfg"])
    c.prepare({"freeze_timeout_s": 40})
    c.freeze()
    start = time.monotonic()
    c.close()                        # waits for the agent to exit
    assert time.monotonic() - start < 20       # well before the 40 s watchdog
    assert calls(env) == ["freeze", "freezeFail"]


def test_failing_hook_fails_its_writer_with_output(client: AgentClient, env: dict) -> None:
    hook(env["hooks"], "20-fail", 'echo "db refuses: $1" >&2; exit 4\n')
    client.prepare()
    with pytest.raises(AgentFailed) as err:
        client.freeze()
    assert err.value.writer == "hooks" and err.value.code == "writer-failed"
    assert "20-fail freeze exited 4: db refuses: freeze" in str(err.value)
    # The hook that froze is told the attempt failed; the failing one is too (as VMware does).
    assert calls(env) == ["freeze", "freezeFail"]
    assert client.status()["state"] == "failed"


def test_backup_complete_in_a_later_session_uses_saved_results(env: dict) -> None:
    def session() -> AgentClient:
        c = AgentClient(LocalChannel().open_process([str(AGENT), "serve", "--config",
                                                     "/nonexistent"]))
        c.hello(env["cfg"])
        return c

    first = session()
    first.prepare()
    first.freeze()
    attempt = first.thaw()["attempt"]
    first.close()
    saved = env["tmp"] / "state" / "last_backup.json"
    assert saved.stat().st_mode & 0o077 == 0
    later = session()
    for wrong in (None, "0123456789abcdef"):   # never another attempt's results
        with pytest.raises(AgentFailed) as err:
            later.request("backup-complete", {"success": True, "truncate": True,
                                              **({"attempt": wrong} if wrong else {})})
        assert err.value.code == "bad-state"
    done = later.request("backup-complete", {"success": True, "restore_point": "rp-1",
                                             "truncate": True, "attempt": attempt})
    assert done["completed"]["writers"] == {"hooks": {}}
    later.close()


def test_state_stays_out_of_the_install_directory_and_leaves_with_the_agent(
        tmp_path: Path, env: dict) -> None:
    install = tmp_path / "agent"
    shutil.copytree(AGENT.parent, install, ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.relative_to(install) for p in install.rglob("*"))
    state = tmp_path / "xdg-state"
    cfg = {k: v for k, v in env["cfg"].items() if k != "state_dir"}   # the agent's default
    c = AgentClient(LocalChannel().open_process(
        ["env", f"XDG_STATE_HOME={state}", str(install / "stillpoint-agent"), "serve",
         "--config", "/nonexistent"]))
    try:
        c.hello(cfg)
        c.prepare()
        c.freeze()
        c.thaw()
        after = sorted(p.relative_to(install) for p in install.rglob("*")
                       if "__pycache__" not in p.parts)
        assert after == before, "the agent wrote into its install directory"
        saved = list(Path("/var/lib/stillpoint-agent" if os.geteuid() == 0
                          else state / "stillpoint-agent").glob("last_backup.json"))
        assert len(saved) == 1
        removed = c.request("uninstall")["removed"]
    finally:
        c.close()
    assert not install.exists() and not saved[0].exists()
    assert str(saved[0]) in removed


def test_legacy_vmware_scripts_wrap_the_hook_dirs(tmp_path: Path, env: dict) -> None:
    log = env["log"]
    pre = hook(tmp_path, "pre-freeze-script", f'echo "pre:$1" >> {log}\n')
    post = hook(tmp_path, "post-thaw-script", f'echo "post:$1" >> {log}\n')
    hook(env["hooks"], "20-second", f'echo "second:$1" >> {log}\n')
    c = AgentClient(LocalChannel().open_process([str(AGENT), "serve", "--config", "/nonexistent"]))
    try:
        c.hello(dict(env["cfg"], hooks=dict(env["cfg"]["hooks"], pre_freeze_script=str(pre),
                                            post_thaw_script=str(post))))
        c.prepare()
        c.freeze()
        c.thaw()
    finally:
        c.close()
    assert calls(env) == ["pre:freeze", "freeze", "second:freeze",
                          "second:thaw", "thaw", "post:thaw"]
