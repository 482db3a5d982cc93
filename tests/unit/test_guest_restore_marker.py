"""The restore marker the appliance builds, as the agent's boot procedure reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.guest.local import LocalChannel
from appliance.guest.restore_marker import build_restore_marker, read_restore_result

RESULTS = {
    "postgresql:/data/pg": {"kind": "postgresql", "data_dir": "/data/pg",
                            "backup_label": "START WAL LOCATION: 0/2000028\n",
                            "stop_wal_file": "000000010000000000000003"},
    "mariadb:/run/mysqld/mysqld.sock": {"kind": "mariadb", "binlog_file": "binlog.000002",
                                        "binlog_pos": 385, "gtid": "0-1-7"},
    "filesystems": {"kind": "filesystem", "frozen": ["/data"]},
}


def test_marker_keeps_restorable_writers_and_adds_pitr() -> None:
    marker = json.loads(build_restore_marker(
        "rp-1", RESULTS, {"postgresql:/data/pg": {"target_time": "2026-11-25 10:00:00+00"}}))
    assert marker["restore_point"] == "rp-1"
    assert set(marker["writers"]) == {"postgresql:/data/pg", "mariadb:/run/mysqld/mysqld.sock"}
    assert marker["writers"]["postgresql:/data/pg"]["pitr"]["target_time"].startswith("2026")
    assert "pitr" not in RESULTS["postgresql:/data/pg"]          # input not modified


def test_marker_rejects_unknown_pitr_writer_and_oversize() -> None:
    with pytest.raises(UsageError):
        build_restore_marker("rp-1", RESULTS, {"filesystems": {"target_time": "x"}})
    big = {"postgresql:/x": {"kind": "postgresql", "backup_label": "x" * 70000}}
    with pytest.raises(UsageError, match="over"):
        build_restore_marker("rp-1", big)


def test_read_restore_result(tmp_path: Path) -> None:
    path = tmp_path / "restore.json"
    assert read_restore_result(LocalChannel(), str(path)) is None
    path.write_text('{"ok": true, "restore_point": "rp-1", "writers": {}}')
    assert read_restore_result(LocalChannel(), str(path))["restore_point"] == "rp-1"


def _point(frozen: list[str]) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(metadata={
        "writer_results": RESULTS,
        "writer_metadata": {"writers": [
            {"name": "filesystems", "kind": "filesystem",
             "components": [{"mount_point": m} for m in frozen]},
            {"name": "postgresql:/data/pg", "kind": "postgresql",
             "files": ["/var/lib/postgresql/15/main"]},
            {"name": "mariadb:/run/mysqld/mysqld.sock", "kind": "mariadb",
             "files": ["/data/mysql"]},
        ]}})


def test_writers_on_the_backed_up_root_file_system_are_restorable() -> None:
    """A whole Linux VM (its root frozen and backed up): every writer's files are inside.
    Found on the QEMU lab: the root was frozen, yet PostgreSQL under /var was left out of
    the restore marker, so the restored VM ran no post-restore procedure for it."""
    from appliance.jobs.restore import restorable_writers

    assert set(restorable_writers(_point(["/", "/data"]))) == set(RESULTS)
    # Only /data backed up: PostgreSQL's files under /var are not in the image.
    assert "postgresql:/data/pg" not in restorable_writers(_point(["/data"]))
    assert "mariadb:/run/mysqld/mysqld.sock" in restorable_writers(_point(["/data"]))
