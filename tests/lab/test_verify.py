"""`verify --boot` in the lab: a good restore point passes every check (file systems,
post-restore procedures, pg_amcheck, mariadb-check) in an isolated sandbox that is torn
down afterwards; a restore point whose PostgreSQL table file was damaged in the
repository's copy fails, naming the PostgreSQL writer."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from restore_helpers import backup, cli, guest_sql, lab_repository, profile

from appliance.jobs import environment

pytestmark = pytest.mark.lab

VM = "lab-vm1"
PROBE_ROWS = 20000


@pytest.fixture(scope="module")
def point(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_repository(lab, tmp_path_factory.mktemp("verify") / "repository") as env:
        guest = lab.guests[VM]
        # A table nothing writes to after the backup's checkpoint: WAL replay cannot
        # repair a damaged page of it from a full-page image.
        guest_sql(guest, "postgres", "DROP TABLE IF EXISTS verify_probe")
        guest_sql(guest, "postgres", "CREATE TABLE verify_probe AS SELECT g AS id, "
                  f"md5(g::text) AS v FROM generate_series(1, {PROBE_ROWS}) g")
        rel = guest_sql(guest, "postgres", "SELECT pg_relation_filepath('verify_probe')")
        guest_sql(guest, "postgres", "CHECKPOINT")
        rp = backup(env, VM)
        yield {"rp": rp.restore_point, "relpath": rel, "env": env}


def _verify(env: dict[str, str], rp: str) -> tuple[int, dict[str, Any], str]:
    done = cli(env, "verify", rp, "--boot", "--json", timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    start = done.stdout.find("{\n")
    report = json.loads(done.stdout[start:]) if start >= 0 else json.loads(lines[-1])
    return done.returncode, report, done.stderr


def test_verify_passes_on_a_good_restore_point(lab: Any, point: dict[str, Any]) -> None:
    env = point["env"]
    code, report, err = _verify(env, point["rp"])
    assert code == 0, (report, err)
    assert report["ok"]
    checks = report["checks"]
    assert any(k.startswith("postgresql:") and "post-restore" not in k for k in checks)
    assert any(k.startswith("mariadb:") and "post-restore" not in k for k in checks)
    assert any(k.startswith("filesystem") for k in checks)
    assert all(c["ok"] for c in checks.values()), checks
    recorded = json.loads(Path(report["recorded"]).read_text())
    assert recorded[-1]["ok"] and recorded[-1]["restore_point"] == point["rp"]
    _assert_sandbox_gone(env, lab, report["sandbox"])


def _damaged_copy(point: dict[str, Any], tmp_path: Path) -> str:
    """A new restore point through the repository API: the good one with every block of
    the probe table's file overwritten by random bytes."""
    repo = environment.open_repository(profile(point["env"]))
    good = repo.get(point["rp"])
    disk = good.disks[0]
    raw = tmp_path / "disk.raw"
    repo.restore_disk_to(good, disk.key, raw)
    path = f"/pgsql/15/main/{point['relpath']}"
    size = int(subprocess.run(["debugfs", "-R", f"stat {path}", str(raw)], capture_output=True,
                              text=True, check=True).stdout.split("Size: ")[1].split()[0])
    block_size = 4096
    offsets = []
    for n in range(-(-size // block_size)):
        out = subprocess.run(["debugfs", "-R", f"bmap {path} {n}", str(raw)],
                             capture_output=True, text=True, check=True).stdout.strip()
        offsets.append(int(out.splitlines()[-1]) * block_size)
    assert offsets and all(o > 0 for o in offsets)
    rng = random.Random(7)
    with repo.writer(good.vm.name, moref=good.vm.moref, uuid=good.vm.uuid) as w:
        d = w.disk(disk.key, disk.label, disk.capacity, base=good.id)
        for off in offsets:
            d.write(off, rng.randbytes(block_size))
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
    damaged = _damaged_copy(point, tmp_path)
    code, report, err = _verify(env, damaged)
    assert code == 1, (report, err)
    assert not report["ok"]
    checks = report["checks"]
    failed = [k for k, c in checks.items() if not c["ok"]]
    assert failed and all(k.startswith("postgresql:") for k in failed), checks
    pg = next(c for k, c in checks.items() if k.startswith("postgresql:")
              and "post-restore" not in k)
    assert "pg_amcheck" in pg["detail"] and "verify_probe" in pg["detail"], pg
    assert all(c["ok"] for k, c in checks.items() if k.startswith(("mariadb:", "filesystem")))
    done = cli(env, "verify", damaged, "--boot", timeout=900)
    assert done.returncode == 1 and "postgresql:" in done.stdout and "FAIL" in done.stdout
    _assert_sandbox_gone(env, lab, report["sandbox"])


def _assert_sandbox_gone(env: dict[str, str], lab: Any, name: str) -> None:
    from restore_helpers import wait_guest_gone

    from stillpoint_lab.hypervisor import guest_record
    from appliance.vsphere import restore_vm as rv

    session = environment.open_vcenter(profile(env))
    try:
        assert rv.find_vm_by_name(session, name) is None
    finally:
        session.close()
    wait_guest_gone(lab.config, name)
    assert guest_record(lab.config, name) is None
