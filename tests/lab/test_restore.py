"""Full-VM restore in the lab: a restore point taken under load, restored as a new VM, boots
its own kernel and systemd (a QEMU VM on the restored disks: `uname -r` and /etc/machine-id
are the image's), the agent inside the image runs the post-restore procedures before the
databases start (the guest's own journal says so), and the databases come up with their
invariants intact; point in time between two backups; one database dumped from a sandbox;
refusals and no half-made VM on failure. Two VM boots besides lab-vm1's."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from restore_helpers import (
    backup,
    cli,
    cli_json,
    destroy_vms,
    lab_repository,
    profile,
)

from appliance.errors import TransportError
from stillpoint_lab.image import layout
from stillpoint_lab.image.build import cached_guest_image
from stillpoint_lab.lab import guest_handle, serial_log
from stillpoint_lab.workload import check_invariants, read_log, start_workload, stop_workload

# Boots under TCG are slow; the first test also pays for the lab (session fixture).
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

VM = "lab-vm1"
STATUS_WAIT = "600"          # a restored VM's boot under TCG on a loaded host
RESTORE_UNIT = "stillpoint-restore.service"
# systemd's catalog ids: a unit's job started / finished (for a oneshot: ExecStart exited)
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


@pytest.fixture(scope="module")
def env(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with lab_repository(lab, tmp_path_factory.mktemp("restore") / "repository") as e:
        yield e


@pytest.fixture(scope="module")
def history(lab: Any, env: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two application-consistent backups under load, with a quiet second between them
    (binary-log times have one-second resolution): T lies inside it."""
    guest = lab.guests[VM]
    identity = {"machine_id": guest.run(["cat", "/etc/machine-id"]).stdout.strip(),
                "kernel": guest.run(["uname", "-r"]).stdout.strip()}
    assert re.fullmatch(r"[0-9a-f]{32}", identity["machine_id"]), identity
    log = tmp_path_factory.mktemp("workload") / "commits.log"
    load = start_workload(guest, rate=30, log_path=log)
    try:
        time.sleep(3)
        before_rp1 = time.time()
        rp1 = backup(env, VM)
        time.sleep(2)
        stop_workload(load)
        last = max(c.committed for c in read_log(log))
        whole = math.ceil(last + 0.05)
        time.sleep(max(0.0, whole + 1.2 - time.time()))
        target = whole + 0.5
        load = start_workload(guest, rate=30, log_path=log)
        time.sleep(3)
        rp2 = backup(env, VM)
    finally:
        stop_workload(load)
    return {"env": env, "rp1": rp1.restore_point, "rp2": rp2.restore_point,
            "before_rp1": before_rp1, "target": target, "commits": read_log(log), **identity}


def _boot_journal(guest: Any) -> list[dict[str, Any]]:
    """systemd's own (PID 1) journal entries of the current boot."""
    done = guest.run(["journalctl", "-b", "-o", "json", "--no-pager", "_PID=1",
                      "--output-fields=UNIT,MESSAGE_ID,JOB_TYPE,JOB_RESULT,MESSAGE"],
                     timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _first(entries: list[dict[str, Any]], unit: str, message_id: str) -> int:
    """Monotonic time (µs) of the first entry about `unit` with that catalog id."""
    times = [int(e["__MONOTONIC_TIMESTAMP"]) for e in entries
             if e.get("UNIT") == unit and e.get("MESSAGE_ID") == message_id
             and e.get("JOB_RESULT", "done") == "done"]
    assert times, f"no {message_id} entry for {unit} in the boot's journal"
    return min(times)


def _wait_promoted(guest: Any, timeout: float = 300) -> None:
    """Until PostgreSQL answers and is out of recovery; on timeout, what the guest says."""
    deadline = time.monotonic() + timeout
    while True:
        done = guest.run(["runuser", "-u", "postgres", "--", f"{layout.PG_BIN}/psql", "-X",
                          "-q", "-A", "-t", "-h", layout.PG_SOCKET_DIR, "-d", "postgres",
                          "-c", "SELECT pg_is_in_recovery()"], timeout=120)
        if done.returncode == 0 and done.stdout.strip() == "f":
            return
        if time.monotonic() > deadline:
            why = guest.run(["sh", "-c", "systemctl --no-pager status 'postgresql@*' 2>&1; "
                             "tail -n 40 /var/log/postgresql/*.log 2>&1"], timeout=60)
            raise AssertionError(f"PostgreSQL not promoted: {done.stdout}{done.stderr}\n"
                                 f"{why.stdout[-4000:]}")
        time.sleep(1)


def test_restored_vm_boots_runs_post_restore_and_keeps_invariants(
        lab: Any, history: dict[str, Any]) -> None:
    env = history["env"]
    name = "lab-vm1-restored"
    try:
        done = cli_json(env, "restore", "vm", history["rp1"], "--name", name, "--power-on")
        result = done["result"]
        assert result["powered_on"] and all(d["verified"] for d in result["disks"])
        assert len(result["disks"]) == 2
        status = cli_json(env, "restore", "status", name, "--wait", STATUS_WAIT,
                          timeout=900)
        assert status["state"] == "done" and status["ok"], status
        writers = status["result"]["writers"]
        assert {w.split(":")[0] for w in writers} == {"postgresql", "mariadb"}
        assert all(w["ok"] for w in writers.values()), writers
        assert "post-restore done (ok=True)" in status["log"]
        assert not status["hook_present"]         # the agent removed its hook ...
        guest = guest_handle(lab.config, name)
        assert guest.run(["test", "-e", "/opt/stillpoint/agent"]).returncode != 0  # ... and itself
        # It booted its own kernel and systemd from the restored disk: the image's kernel,
        # the original's machine id (also on the VM's console, written by the image).
        kernel = guest.run(["uname", "-r"]).stdout.strip()
        image = cached_guest_image()
        assert kernel == history["kernel"], (kernel, history["kernel"])
        assert image is None or kernel == image.kernel_release, (kernel, image)
        assert guest.run(["cat", "/etc/machine-id"]).stdout.strip() == history["machine_id"]
        banner = [line for line in serial_log(lab.config, name).read_text(errors="replace")
                  .splitlines() if layout.BOOT_BANNER in line]
        assert banner and f"kernel={kernel}" in banner[-1], banner
        assert f"machine-id={history['machine_id']}" in banner[-1], banner
        # The post-restore unit had finished before either database was started.
        journal = _boot_journal(guest)
        restored = _first(journal, RESTORE_UNIT, UNIT_STARTED)
        for unit in (layout.PG_UNIT, layout.MY_UNIT):
            started = _first(journal, unit, UNIT_STARTING)
            assert restored < started, (f"{RESTORE_UNIT} finished at {restored} µs, "
                                        f"{unit} was started at {started} µs")
        assert guest.run(["findmnt", "-n", "/data"]).returncode == 0   # disk 1 mounted
        report = check_invariants(guest)
        assert report.ok, report
        # Everything committed before the backup started is in the restored databases.
        for db, restored in (("pg", report.pg_seq_max), ("my", report.my_seq_max)):
            before = [c.id for c in history["commits"]
                      if c.db == db and c.committed < history["before_rp1"]]
            assert before and restored >= max(before), (db, restored, max(before))
        # The original was not touched: it still runs at its own address.
        assert lab.guests[VM].run(["true"]).returncode == 0
    finally:
        destroy_vms(env, name)


def test_until_a_time_between_two_backups_gives_exactly_the_commits_before_it(
        lab: Any, history: dict[str, Any]) -> None:
    env = history["env"]
    name = "lab-vm1-pitr"
    target = history["target"]
    until = datetime.fromtimestamp(target, UTC).isoformat()
    try:
        done = cli_json(env, "restore", "vm", history["rp1"], "--name", name, "--power-on",
                        "--until", until)
        assert done["result"]["pitr_source"] == history["rp2"]
        status = cli_json(env, "restore", "status", name, "--wait", STATUS_WAIT,
                          timeout=900)
        assert status["ok"], status
        writers = status["result"]["writers"]
        pg = next(w for n, w in writers.items() if n.startswith("postgresql"))
        my = next(w for n, w in writers.items() if n.startswith("mariadb"))
        assert pg["backup_label_placed"] and pg["target_time"] == until, pg
        assert my["replayed"], my
        guest = guest_handle(lab.config, name)
        _wait_promoted(guest)
        report = check_invariants(guest)
        assert report.ok, report
        for db, restored in (("pg", report.pg_seq_max), ("my", report.my_seq_max)):
            before = max(c.id for c in history["commits"] if c.db == db and c.committed < target)
            after = min(c.id for c in history["commits"] if c.db == db and c.sent > target)
            assert restored == before, (db, restored, before, after)
    finally:
        destroy_vms(env, name)


def test_until_after_the_newest_backup_is_refused(history: dict[str, Any]) -> None:
    env = history["env"]
    done = cli(env, "restore", "vm", history["rp1"], "--name", "lab-vm1-late", "--until",
               datetime.now(UTC).isoformat())
    assert done.returncode == 3, done.stderr
    assert "only on the live VM" in done.stderr


def test_restore_db_dumps_one_database_from_a_sandbox(history: dict[str, Any],
                                                     tmp_path: Path) -> None:
    env = history["env"]
    out = tmp_path / "splab.sql"
    done = cli(env, "restore", "db", history["rp1"], "--writer", "postgresql", "--database",
               "splab", "--to-file", str(out))
    assert done.returncode == 0, done.stderr
    dump = out.read_text()
    assert "CREATE TABLE public.accounts" in dump and "COPY public.seq" in dump


def test_existing_vm_is_not_overwritten_without_overwrite(history: dict[str, Any]) -> None:
    env = history["env"]
    done = cli(env, "restore", "vm", history["rp1"])
    assert done.returncode == 2
    assert f"a VM named {VM} exists" in done.stderr and "--overwrite" in done.stderr


def test_failed_upload_leaves_no_vm(history: dict[str, Any], monkeypatch: Any) -> None:
    env = history["env"]
    from appliance.jobs import environment
    from appliance.jobs.restore import RestoreVMOptions, run_restore_vm
    from appliance.progress import NullProgress
    from appliance.vsphere import restore_vm as rv

    def broken(*_a: Any, **_k: Any) -> str:
        raise TransportError("PUT failed: connection reset (injected)")

    monkeypatch.setattr(rv, "upload_disk", broken)
    prof = profile(env)
    repo = environment.open_repository(prof)
    session = environment.open_vcenter(prof)
    try:
        with pytest.raises(TransportError):
            run_restore_vm(RestoreVMOptions(history["rp1"], name="lab-vm1-broken"), repo,
                           session, NullProgress())
        assert rv.find_vm_by_name(session, "lab-vm1-broken") is None
    finally:
        session.close()


def test_overwrite_replaces_an_existing_vm_only_when_complete(history: dict[str, Any]) -> None:
    env = history["env"]
    from appliance.jobs import environment
    from appliance.vsphere import restore_vm as rv

    name = "lab-vm1-replaced"
    try:
        first = cli_json(env, "restore", "vm", history["rp1"], "--name", name)["result"]
        refused = cli(env, "restore", "vm", history["rp2"], "--name", name)
        assert refused.returncode == 2 and "--overwrite" in refused.stderr
        second = cli_json(env, "restore", "vm", history["rp2"], "--name", name,
                          "--overwrite")["result"]
        assert second["replaced"] == first["moref"] and second["moref"] != first["moref"]
        session = environment.open_vcenter(profile(env))
        try:
            vm = rv.find_vm_by_name(session, name)
            assert vm is not None and vm._moId == second["moref"]
            assert rv.find_vm_by_name(session, f"{name}.stillpoint-restoring") is None
        finally:
            session.close()
    finally:
        destroy_vms(env, name)
