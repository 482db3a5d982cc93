"""The boot-time post-restore procedure on a fake image (no real PostgreSQL needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

PAYLOAD = Path(__file__).resolve().parents[2] / "agent_payload" / "linux"
LABEL = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: stillpoint\n"


@pytest.fixture
def image(tmp_path: Path) -> dict:
    """An installed agent with its boot hook, and a cluster directory as restored."""
    install = tmp_path / "opt" / "agent"
    shutil.copytree(PAYLOAD, install)
    data = tmp_path / "pg"
    (data / "pg_wal").mkdir(parents=True)
    (data / "postmaster.pid").write_text("12345\n")
    (data / "postgresql.auto.conf").write_text("# auto\n")
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "000000010000000000000003").write_text("wal")
    marker = tmp_path / "marker.json"
    cfg = {"boot": {"hook_dirs": [str(tmp_path / "boot.d")],
                    "marker_command": ["cat", str(marker)],
                    "log_path": str(tmp_path / "log" / "restore.log"),
                    "result_path": str(tmp_path / "restore.json")}}
    (install / "config.json").write_text(json.dumps(cfg))
    agent = install / "stillpoint-agent"
    subprocess.run([str(agent), "install"], check=True, capture_output=True)
    return {"tmp": tmp_path, "install": install, "data": data, "archive": archive,
            "marker": marker, "hook": tmp_path / "boot.d" / "stillpoint-restore"}


def pg_entry(image: dict, **over: object) -> dict:
    entry = {"kind": "postgresql", "data_dir": str(image["data"]), "backup_label": LABEL,
             "tablespace_map": "", "stop_wal_file": "000000010000000000000003",
             "archive_dir": str(image["archive"])}
    entry.update(over)
    return entry


def boot(image: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(image["hook"])], check=False, capture_output=True, text=True, timeout=60)


def test_unset_marker_only_removes_hook_and_agent(image: dict) -> None:
    assert image["hook"].exists()
    res = boot(image)                         # `cat` of a missing file exits 1: unset
    assert res.returncode == 0, res.stderr
    assert not image["install"].exists() and not image["hook"].exists()
    assert not (image["tmp"] / "restore.json").exists()
    assert (image["data"] / "postmaster.pid").exists()       # nothing else touched


def test_postgresql_label_and_point_in_time(image: dict) -> None:
    image["marker"].write_text(json.dumps({"restore_point": "rp-9", "writers": {
        "postgresql:x": pg_entry(image, pitr={"target_time": "2026-11-25 09:00:00+00"}),
        "mariadb:/run/mysqld.sock": {"kind": "mariadb", "binlog_file": "binlog.000004",
                                     "binlog_pos": 342, "gtid": "0-1-9"}}}))
    res = boot(image)
    assert res.returncode == 0, res.stderr
    data = image["data"]
    assert (data / "backup_label").read_text() == LABEL
    assert (data / "backup_label").stat().st_mode & 0o777 == 0o600
    assert (data / "recovery.signal").exists() and not (data / "postmaster.pid").exists()
    auto = (data / "postgresql.auto.conf").read_text()
    assert f"restore_command = 'cp \"{image['archive']}/%f\" \"%p\"'" in auto
    assert "recovery_target_time = '2026-11-25 09:00:00+00'" in auto
    assert "recovery_target_action = 'promote'" in auto
    result = json.loads((image["tmp"] / "restore.json").read_text())
    assert result["ok"] and result["restore_point"] == "rp-9"
    assert result["writers"]["mariadb:/run/mysqld.sock"]["binlog_file"] == "binlog.000004"
    assert "placed backup_label" in (image["tmp"] / "log" / "restore.log").read_text()
    assert not image["install"].exists() and not image["hook"].exists()


def test_label_withheld_when_backup_end_wal_is_missing(image: dict) -> None:
    (image["archive"] / "000000010000000000000003").unlink()
    image["marker"].write_text(json.dumps({"restore_point": "rp-2",
                                           "writers": {"postgresql:x": pg_entry(image)}}))
    assert boot(image).returncode == 0
    assert not (image["data"] / "backup_label").exists()
    assert not (image["data"] / "recovery.signal").exists()
    result = json.loads((image["tmp"] / "restore.json").read_text())
    assert "crash recovery" in result["writers"]["postgresql:x"]["reason"]


def test_label_from_the_image_agent_dir(image: dict) -> None:
    # The marker names the writer; the label itself was written into the image.
    (image["install"] / "restore").mkdir()
    (image["install"] / "restore" / "marker.json").write_text(
        json.dumps({"writers": {"postgresql:x": pg_entry(image)}}))
    image["marker"].write_text(json.dumps({"restore_point": "rp-3", "writers": {
        "postgresql:x": {"kind": "postgresql"}}}))
    assert boot(image).returncode == 0
    assert (image["data"] / "backup_label").read_text() == LABEL
