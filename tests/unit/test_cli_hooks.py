"""The shipped CLI has no test hook that can make it wait, and a broken install fails loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import checkpoints
from tests import hold_cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_product_never_reads_a_hold_variable() -> None:
    readers = [str(path.relative_to(ROOT)) for path in (ROOT / "appliance").rglob("*.py")
               if "STILLPOINT_HOLD" in path.read_text()]
    assert readers == []


def test_reached_without_an_observer_returns_even_with_the_variable_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLPOINT_HOLD_AT", "frozen")
    monkeypatch.setattr("time.sleep", lambda s: pytest.fail(f"the product slept {s} s"))
    monkeypatch.setattr(checkpoints, "_observers", [])
    checkpoints.reached("frozen")


def test_the_test_runner_holds_at_the_named_arrival(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    slept: list[float] = []
    monkeypatch.setattr(hold_cli.time, "sleep", slept.append)
    monkeypatch.setattr(checkpoints, "_observers", [])
    monkeypatch.setenv("STILLPOINT_HOLD_AT", "copy-started")
    monkeypatch.setenv("STILLPOINT_HOLD_SKIP", "1")
    monkeypatch.setenv("STILLPOINT_HOLD_FOR", "7")
    hold_cli.attach_from_environment()
    for phase in ("frozen", "copy-started", "copy-started", "committed"):
        checkpoints.reached(phase)
    assert slept == [7.0]   # the second disk's copy-started only
    assert '"held": "copy-started"' in capsys.readouterr().err


def test_the_test_runner_refuses_an_unknown_phase() -> None:
    result = subprocess.run([*hold_cli.HOLD_CLI, "--version"], cwd=ROOT, capture_output=True,
                            text=True, env={"STILLPOINT_HOLD_AT": "no-such-phase",
                                            "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "unknown phase 'no-such-phase'" in result.stderr


def test_a_command_module_that_cannot_be_imported_fails_the_cli_loudly() -> None:
    script = ("import sys; sys.modules['appliance.commands.backup'] = None\n"
              "from appliance.cli import main; main(['--help'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1, result.stdout
    assert "installation is incomplete" in result.stderr
    assert "appliance.commands.backup" in result.stderr
    assert "Traceback" not in result.stderr
