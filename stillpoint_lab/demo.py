"""`make demo`: the QEMU lab, a crash-consistent and an application-consistent backup of the
same VM under load, both booted, and what each lost; printing every command it runs.

    python -m stillpoint_lab.demo [--keep]     (root; --keep leaves the lab up afterwards)

Steps: lab up (a Debian VM under QEMU behind the vCenter simulator) -> workload on PostgreSQL,
InnoDB and MyISAM, and the ledger application -> backup 1 with the agent off (a power cut at
that instant) -> backup 2 application-consistent (the agent's writers, then the freeze) ->
restore backup 2 as a new VM, powered on: its own kernel boots and the agent inside the image
runs the post-restore procedures before the databases start -> boot backup 1 the same way in
the sandbox -> one table: what each image lost -> repository check --read-data -> lab down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stillpoint_lab import consistency, workload
from stillpoint_lab.config import LabConfig, VMSpec
from stillpoint_lab.lab import guest_handle, lab_down, lab_up, wait_for_guest

DEMO_LAB_ID = 2


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def stillpoint(*args: str, env: dict[str, str], echo: bool = True,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ stillpoint " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env,
                            capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines() if echo else []:
        print("  " + line)
    if result.returncode != 0 and check:
        raise SystemExit(f"demo: 'stillpoint {' '.join(args)}' failed "
                         f"(exit {result.returncode})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: the lab needs root (QEMU, taps on a bridge, loop devices)",
              file=sys.stderr)
        return 11
    cfg = LabConfig(lab_id=DEMO_LAB_ID, vms=(VMSpec("lab-vm1"),))
    lab_down(cfg)
    say("starting the lab: the vCenter simulator and a Debian 12 VM under QEMU "
        "(its own kernel, systemd, PostgreSQL 15, MariaDB)")
    handle = lab_up(cfg, say=lambda m: print("  " + m))
    env = {**os.environ, "STILLPOINT_PROFILE": str(handle.profile_path)}
    guest = handle.guests["lab-vm1"]
    try:
        consistency.install_ledger(guest)
        say("a workload commits on PostgreSQL, InnoDB and MyISAM (every COMMIT logged on the "
            "host) and the ledger writes its file pair, all through both backups")
        log_path = cfg.state_dir / "commits.log"
        load = workload.start_workload(guest, rate=40, log_path=log_path)
        try:
            time.sleep(5)
            say("backup 1: agent off, no quiesce: a crash-consistent image (a power cut)")
            stillpoint("backup", "lab-vm1", "--app-aware", "off", env=env)
            time.sleep(3)
            say("backup 2: application-consistent (agent over SSH: writers, then the freeze)")
            stillpoint("backup", "lab-vm1", "--app-aware", "require", env=env)
            time.sleep(3)
        finally:
            workload.stop_workload(load)
        commits = workload.read_log(log_path)
        stillpoint("list", env=env)
        crash_rp, app_rp = [p["id"] for p in json.loads(
            stillpoint("list", "--json", env=env, echo=False).stdout)][-2:]
        show = json.loads(stillpoint("show", app_rp, env=env, echo=False).stdout)
        meta = show["metadata"]
        print(f"  restore point {app_rp[:12]}: {show['consistency']} "
              f"({'; '.join(show['reasons'])})")
        print(f"  snapshot window: {meta['snapshot_window']}")
        print(f"  phase durations per attempt (ms): "
              f"{[a['durations_ms'] for a in meta['attempts']]}")

        say(f"application-aware restore of {app_rp[:12]} as a new VM, powered on")
        stillpoint("restore", "vm", app_rp, "--name", "lab-vm1-restored", "--power-on",
                   env=env)
        stillpoint("restore", "status", "lab-vm1-restored", "--wait", "600", env=env)
        restored = wait_for_guest(cfg, "lab-vm1-restored")
        print(f"  restored VM: kernel {restored.run(['uname', '-r']).stdout.strip()}, "
              f"machine-id {restored.run(['cat', '/etc/machine-id']).stdout.strip()} "
              f"(the original's: {guest.run(['cat', '/etc/machine-id']).stdout.strip()})")
        app = consistency.Verdict(mode="application-consistent", restore_point=app_rp,
                                  booted=True)   # wait_for_guest: it booted and answers
        from datetime import datetime
        consistency.judge(guest_handle(cfg, "lab-vm1-restored"), app, commits,
                          datetime.fromisoformat(meta["snapshot_window"]["requested"]).timestamp())
        _destroy(handle.profile_path, "lab-vm1-restored")   # one restored VM at a time

        say(f"the crash-consistent {crash_rp[:12]}, booted the same way in the sandbox")
        from appliance.jobs import environment
        from appliance.profile import load_profile

        repo = environment.open_repository(load_profile(handle.profile_path))
        crash = consistency.boot_and_judge(cfg, repo, "crash-consistent", crash_rp, commits, 1)

        say("what each image lost (acknowledged = COMMIT had returned before the snapshot)")
        print(f"  {'':26}{'crash-consistent':>20}{'application':>20}")
        for label, fn in (
                ("ext4 journal replays", lambda v: ", ".join(v.ext4_replays) or "none"),
                ("PostgreSQL recovery", lambda v: "crash recovery" if v.pg_crash_recovery
                 else "none"),
                ("MyISAM tables", lambda v: "marked crashed" if v.myisam_crashed else "OK"),
                ("acknowledged, lost", lambda v: f"PG {v.lost.get('pg', '?')}, "
                                                 f"MariaDB {v.lost.get('my', '?')}"),
                ("invariants", lambda v: {True: "hold", False: "BROKEN", None: "?"}
                 [v.invariants_ok]),
                ("ledger file pair", lambda v: {True: "intact", False: "TORN"}.get(
                    v.ledger_ok, f"? ({v.ledger_state})")),
                ("pg_amcheck / mariadb-check", lambda v: f"{_ok(v.pg_amcheck_ok)} / "
                                                         f"{_ok(v.mariadb_check_ok)}")):
            print(f"  {label:26}{fn(crash):>20}{fn(app):>20}")
        say("repository check, re-reading every chunk")
        stillpoint("check", "--read-data", env=env)
        if app.damage:
            print(f"\ndemo: the application-consistent image shows damage: "
                  f"{'; '.join(app.damage)}", file=sys.stderr)
            return 1
        return 0
    finally:
        if args.keep:
            print(f"\nlab left up: export STILLPOINT_PROFILE={handle.profile_path}")
        else:
            say("tearing the lab down")
            lab_down(cfg, say=lambda m: print("  " + m))


def _destroy(profile_path: Path, name: str) -> None:
    from appliance.jobs import environment
    from appliance.profile import load_profile
    from appliance.vsphere import restore_vm

    session = environment.open_vcenter(load_profile(profile_path))
    try:
        vm = restore_vm.find_vm_by_name(session, name)
        if vm is not None:
            restore_vm.destroy_vm(session, vm)
    finally:
        session.close()


def _ok(value: bool | None) -> str:
    return {True: "OK", False: "FAILED", None: "?"}[value]


if __name__ == "__main__":
    sys.exit(main())
