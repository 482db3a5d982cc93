"""The payload manifest is current, and the guest bootstrap refuses a tampered payload."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PAYLOAD = Path(__file__).resolve().parents[2] / "agent_payload"


def test_committed_manifest_matches_the_payload() -> None:
    res = subprocess.run([sys.executable, str(PAYLOAD / "build_manifest.py"), "--check"],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_agent_never_imports_the_appliance() -> None:
    for path in (PAYLOAD / "linux").rglob("*.py"):
        text = path.read_text()
        assert "import appliance" not in text and "from appliance" not in text, path


def _run(agent: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(agent), "serve", "--config", "/nonexistent"],
                          input='{"v":1,"id":1,"op":"hello"}\n', check=False, capture_output=True,
                          text=True, timeout=30)


def test_bootstrap_runs_a_verified_payload(tmp_path: Path) -> None:
    shutil.copytree(PAYLOAD / "linux", tmp_path / "agent")
    res = _run(tmp_path / "agent" / "stillpoint-agent")
    assert res.returncode == 0 and '"ok":true' in res.stdout


def test_bootstrap_refuses_a_modified_file(tmp_path: Path) -> None:
    shutil.copytree(PAYLOAD / "linux", tmp_path / "agent")
    target = tmp_path / "agent" / "stillpoint_agent" / "server.py"
    target.write_text(target.read_text() + "\n# tampered\n")
    res = _run(tmp_path / "agent" / "stillpoint-agent")
    assert res.returncode == 97 and res.stdout == ""
    assert "does not match MANIFEST.sha256" in res.stderr


def test_bootstrap_refuses_a_missing_file(tmp_path: Path) -> None:
    shutil.copytree(PAYLOAD / "linux", tmp_path / "agent")
    (tmp_path / "agent" / "stillpoint_agent" / "writers" / "hooks.py").unlink()
    assert _run(tmp_path / "agent" / "stillpoint-agent").returncode == 97


def test_the_manifest_builder_refuses_what_is_not_agent_source(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_manifest",
                                                  PAYLOAD / "build_manifest.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    root = tmp_path / "linux"
    shutil.copytree(PAYLOAD / "linux", root)
    assert "stillpoint-agent" in builder.payload_files(str(root))
    (root / "state").mkdir()
    (root / "state" / "last_backup.json").write_text("{}")   # what a test run once left
    with pytest.raises(builder.NotSource, match="state/last_backup.json"):
        builder.payload_files(str(root))
