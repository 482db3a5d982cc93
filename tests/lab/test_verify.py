"""`verify --boot` in the lab: a good restore point, verified by the backup's own policy
(`backup --verify-boot`), passes every check (file systems, post-restore procedures,
pg_amcheck, mariadb-check) in an isolated sandbox that is torn down afterwards, and `list`
shows the verdict; a restore point whose PostgreSQL table file was damaged in the
repository's copy fails, naming the PostgreSQL writer; a restore point taken with the agent
off (nothing in its image reports) is checked from outside without waiting for a report,
and its damaged MyISAM table is found. Three sandbox boots."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from restore_helpers import (
    backup,
    cli,
    cli_json,
    destroy_vms,
    file_extents,
    guest_gone,
    guest_mariadb,
    guest_sql,
    lab_repository,
    profile,
    wait_guest_gone,
)

from appliance.jobs import environment
from appliance.jobs.verify import verdicts_dir
from stillpoint_lab.image import layout

# Boots under TCG are slow; the first test also pays for the lab (session fixture).
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

VM = "lab-vm1"
PROBE_ROWS = 20000
MY_PROBE = "verify_probe.myisam_probe"      # a MyISAM table (database.table)


@pytest.fixture(scope="module")
def point(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An application-consistent restore point, then one taken with the agent off; each
    holds a table nothing writes to after it was flushed (WAL replay cannot repair a damaged
    page of it from a full-page image; MyISAM has no log at all)."""
    with lab_repository(lab, tmp_path_factory.mktemp("verify") / "repository") as env:
        guest = lab.guests[VM]
        guest_sql(guest, "postgres", "DROP TABLE IF EXISTS verify_probe")
        guest_sql(guest, "postgres", "CREATE TABLE verify_probe AS SELECT g AS id, "
                  f"md5(g::text) AS v FROM generate_series(1, {PROBE_ROWS}) g")
        rel = guest_sql(guest, "postgres", "SELECT pg_relation_filepath('verify_probe')")
        guest_sql(guest, "postgres", "CHECKPOINT")
        db, table = MY_PROBE.split(".")
        guest_mariadb(guest, f"CREATE DATABASE IF NOT EXISTS {db}; USE {db}; DROP TABLE IF EXISTS "
                      f"{MY_PROBE}; CREATE TABLE {MY_PROBE} (id INT PRIMARY KEY, v CHAR(32)) "
                      f"ENGINE=MyISAM CHECKSUM=1; INSERT INTO {MY_PROBE} SELECT seq, md5(seq) "
                      f"FROM seq_1_to_{PROBE_ROWS}; FLUSH TABLES")
        assert guest.run(["sync"]).returncode == 0
        verified = cli(env, "backup", VM, "--verify-boot", "--json", timeout=1200)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        [rp] = [doc["result"]["restore_point"] for doc in map(json.loads, (
            line for line in verified.stdout.splitlines() if line.startswith("{")))
            if "result" in doc]
        crash = backup(env, VM, app_aware="off")
        assert crash.consistency == "crash"
        yield {"rp": rp, "crash_rp": crash.restore_point, "env": env,
               "pg_file": f"{layout.PGDATA}/{rel}",
               "my_file": f"{layout.MY_DATADIR}/{db}/{table}.MYD"}


def _verify(env: dict[str, str], rp: str, *args: str) -> tuple[int, dict[str, Any], str]:
    done = cli(env, "verify", rp, "--boot", "--json", *args, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    start = done.stdout.find("{\n")
    report = json.loads(done.stdout[start:]) if start >= 0 else json.loads(lines[-1])
    return done.returncode, report, done.stderr


def test_backup_verification_policy_passes_a_good_restore_point_and_records_it(
        lab: Any, point: dict[str, Any]) -> None:
    env = point["env"]
    [listed] = [p for p in cli_json(env, "list") if p["id"] == point["rp"]]
    assert listed["verified"] == "pass", listed
    assert "VERIFIED" in cli(env, "list").stdout
    report = json.loads((verdicts_dir(profile(env)) / f"{point['rp']}.json").read_text())[-1]
    assert report["ok"] and report["agent_in_image"], json.dumps(report, indent=1)
    checks = report["checks"]
    assert any(k.startswith("postgresql:") and "post-restore" in k for k in checks)
    assert any(k.startswith("postgresql:") and "post-restore" not in k for k in checks)
    assert any(k.startswith("mariadb:") and "post-restore" not in k for k in checks)
    # disk 0: the root file system in partition 1; disk 1: /data, a whole-disk file system
    assert any(k.startswith("filesystem") and k.endswith("partition 1") for k in checks)
    assert sum(k.startswith("filesystem") for k in checks) == 2, checks
    assert all(c["ok"] for c in checks.values()), checks
    # The agent froze the file systems: nothing needed a journal replay.
    assert not any("journal replayed" in c["detail"] for c in checks.values()), checks
    assert report["restore_point"] == point["rp"]
    _assert_sandbox_gone(env, lab, report["sandbox"])


def _damaged_copy(point: dict[str, Any], rp_id: str, guest_path: str, tmp_path: Path) -> str:
    """A new restore point through the repository API: `rp_id` with every block of one
    file of its root file system (disk 0, a partition) overwritten by random bytes."""
    repo = environment.open_repository(profile(point["env"]))
    good = repo.get(rp_id)
    disk = good.disks[0]
    raw = tmp_path / "disk.raw"
    repo.restore_disk_to(good, disk.key, raw)
    extents = file_extents(raw, guest_path)
    raw.unlink()
    assert extents and all(off > 0 and off % 4096 == 0 for off, _ in extents), extents
    rng = random.Random(7)
    with repo.writer(good.vm.name, moref=good.vm.moref, uuid=good.vm.uuid) as w:
        d = w.disk(disk.key, disk.label, disk.capacity, base=good.id)
        for off, length in extents:
            for at in range(off, off + length, 1 << 20):
                d.write(at, rng.randbytes(min(1 << 20, off + length - at)))
        d.finish(change_id=disk.change_id)
        for other in good.disks[1:]:
            w.disk(other.key, other.label, other.capacity, base=good.id).finish(
                change_id=other.change_id)
        damaged = w.commit(consistency=good.consistency, reasons=good.reasons,
                           metadata=good.metadata)
    return damaged.id


def test_verify_fails_naming_the_writer_on_damaged_database_files(
        lab: Any, point: dict[str, Any], tmp_path: Path) -> None:
    env = point["env"]
    damaged = _damaged_copy(point, point["rp"], point["pg_file"], tmp_path)
    done = cli(env, "verify", damaged, "--boot", timeout=1200)     # the text report
    assert done.returncode == 1, done.stdout + done.stderr
    assert "postgresql:" in done.stdout and "FAIL" in done.stdout
    report = json.loads((verdicts_dir(profile(env)) / f"{damaged}.json").read_text())[-1]
    assert not report["ok"]
    checks = report["checks"]
    failed = [k for k, c in checks.items() if not c["ok"]]
    assert failed and all(k.startswith("postgresql:") for k in failed), checks
    pg = next(c for k, c in checks.items() if k.startswith("postgresql:")
              and "post-restore" not in k)
    assert "pg_amcheck" in pg["detail"] and "verify_probe" in pg["detail"], pg
    assert all(c["ok"] for k, c in checks.items() if k.startswith(("mariadb:", "filesystem")))
    _assert_sandbox_gone(env, lab, report["sandbox"])


def test_verify_without_agent_checks_from_outside_and_finds_a_damaged_myisam_table(
        lab: Any, point: dict[str, Any], tmp_path: Path, record_property: Any) -> None:
    """Found by a new user: on a restore point taken with the agent off, verify waited its
    whole timeout for a post-restore report that could never come and ran no check."""
    env = point["env"]
    damaged = _damaged_copy(point, point["crash_rp"], point["my_file"], tmp_path)
    timeout = 900
    started = time.monotonic()
    code, report, err = _verify(env, damaged, "--keep", "--timeout", str(timeout))
    took = time.monotonic() - started
    sandbox = report["sandbox"]
    record_property("verify_without_agent_s", round(took))
    try:
        checks = report["checks"]
        print(json.dumps(report, indent=1))
        assert report["agent_in_image"] is False
        assert "sandbox" not in checks, checks          # no timeout, no error
        assert not any("post-restore" in k for k in checks), checks
        assert took < timeout, took
        assert checks["boot"]["ok"], checks["boot"]
        # Cut without a freeze: the journals were replayed before fsck, and fsck is clean.
        fs = {k: c for k, c in checks.items() if k.startswith("filesystem")}
        assert len(fs) == 2 and all(c["ok"] for c in fs.values()), fs
        assert any("journal replayed" in c["detail"] for c in fs.values()), fs
        pg = [c for k, c in checks.items() if k.startswith("postgresql:")]
        assert len(pg) == 1 and pg[0]["ok"] and "pg_amcheck" in pg[0]["detail"], checks
        [(my_name, my)] = [(k, c) for k, c in checks.items() if k.startswith("mariadb:")]
        assert my_name == f"mariadb:{layout.MY_SOCKET}"
        assert not my["ok"] and MY_PROBE in my["detail"], my
        assert my["tables"][MY_PROBE] != "OK", my["tables"]
        assert all(v == "OK" for t, v in my["tables"].items() if t != MY_PROBE), my["tables"]
        assert code == 1 and not report["ok"], json.dumps(report, indent=1) + err
        # restore status knows at once that nothing in this image reports.
        started = time.monotonic()
        status = cli_json(env, "restore", "status", sandbox, "--wait", "300")
        assert time.monotonic() - started < 60
        assert status["state"] == "no-agent", status
        assert "no agent in the image" in status["reason"], status
        text = cli(env, "restore", "status", sandbox)
        assert text.returncode == 0 and "no agent in the image" in text.stdout, text
    finally:
        destroy_vms(env, sandbox)
    assert wait_guest_gone(lab.config, sandbox)


def _assert_sandbox_gone(env: dict[str, str], lab: Any, name: str) -> None:
    from appliance.vsphere import restore_vm as rv

    session = environment.open_vcenter(profile(env))
    try:
        assert rv.find_vm_by_name(session, name) is None
    finally:
        session.close()
    assert wait_guest_gone(lab.config, name), name
    assert guest_gone(lab.config, name)
