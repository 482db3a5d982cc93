"""Credentials: 0600 profile, environment, prompt; never from argv, never in a repr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.vsphere.credentials import Credentials, load_credentials

pytestmark = pytest.mark.unit


def profile(tmp_path: Path, doc: object, mode: int = 0o600) -> Path:
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(doc))
    p.chmod(mode)
    return p


def no_prompt(label: str, secret: bool) -> str:
    raise AssertionError(f"unexpected prompt for {label}")


def test_profile_0600(tmp_path: Path) -> None:
    p = profile(tmp_path, {"user": "u@vsphere.local", "password": "pw"})
    assert load_credentials(p, {}, no_prompt) == Credentials("u@vsphere.local", "pw")


def test_lab_profile_with_vcenter_section(tmp_path: Path) -> None:
    p = profile(tmp_path, {"vcenter": {"host": "h", "user": "u", "password": "pw"}})
    assert load_credentials(p, {}, None) == Credentials("u", "pw")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_profile_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = profile(tmp_path, {"user": "u", "password": "pw"}, mode)
    with pytest.raises(UsageError, match=f"mode {mode:04o}.*chmod 600"):
        load_credentials(p, {}, None)


def test_missing_or_broken_profile(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_credentials(tmp_path / "none.json", {}, None)
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    p.chmod(0o600)
    with pytest.raises(UsageError, match="not valid JSON"):
        load_credentials(p, {}, None)


def test_environment() -> None:
    env = {"STILLPOINT_VC_USER": "e", "STILLPOINT_VC_PASSWORD": "epw"}
    assert load_credentials(None, env, no_prompt) == Credentials("e", "epw")


def test_profile_wins_and_env_fills_in(tmp_path: Path) -> None:
    p = profile(tmp_path, {"user": "p"})
    env = {"STILLPOINT_VC_USER": "e", "STILLPOINT_VC_PASSWORD": "epw"}
    assert load_credentials(p, env, no_prompt) == Credentials("p", "epw")


def test_prompt_asks_only_for_what_is_missing() -> None:
    asked: list[tuple[str, bool]] = []

    def prompt(label: str, secret: bool) -> str:
        asked.append((label, secret))
        return "typed"

    creds = load_credentials(None, {"STILLPOINT_VC_USER": "e"}, prompt)
    assert creds == Credentials("e", "typed")
    assert asked == [("vCenter password for e", True)]


def test_nothing_anywhere_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="STILLPOINT_VC_USER"):
        load_credentials(None, {}, None)


def test_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2"))
