"""`make demo`: the lab, a real application-consistent backup, and an application-aware
restore, end to end, printing every command it runs and what came of it.

    python -m stillpoint_lab.demo [--keep]     (root; --keep leaves the lab up afterwards)

Steps: lab up -> workload on PostgreSQL and MariaDB -> full backup -> more transactions ->
incremental backup -> restore the incremental as a new VM, powered on: the agent inside the
image runs the post-restore procedures at first boot -> check the restored databases'
invariants -> repository check --read-data -> lab down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stillpoint_lab import guest as guest_mod
from stillpoint_lab import hypervisor, workload
from stillpoint_lab.config import LabConfig, VMSpec
from stillpoint_lab.lab import lab_down, lab_up

DEMO_LAB_ID = 2


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def stillpoint(*args: str, env: dict[str, str],
               echo: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ stillpoint " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env,
                            capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines() if echo else []:
        print("  " + line)
    if result.returncode != 0:
        raise SystemExit(f"demo: 'stillpoint {' '.join(args)}' failed "
                         f"(exit {result.returncode})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: the lab needs root (network namespaces, loop devices, mounts)",
              file=sys.stderr)
        return 11
    cfg = LabConfig(lab_id=DEMO_LAB_ID, vms=(VMSpec("lab-vm1"),))
    lab_down(cfg)
    say("starting the lab: vCenter simulator + a Linux guest with PostgreSQL and MariaDB")
    handle = lab_up(cfg, say=lambda m: print("  " + m))
    env = {**os.environ, "STILLPOINT_PROFILE": str(handle.profile_path)}
    guest = handle.guests["lab-vm1"]
    try:
        say("a workload commits transfers on both databases while we back up")
        load = workload.start_workload(guest, rate=30)
        time.sleep(3)
        say("backup 1: full, application-consistent (agent pushed over SSH, writers frozen)")
        stillpoint("backup", "lab-vm1", env=env)
        time.sleep(3)
        say("backup 2: incremental through Changed Block Tracking")
        stillpoint("backup", "lab-vm1", env=env)
        workload.stop_workload(load)
        stillpoint("list", env=env)
        listing = stillpoint("list", "--json", env=env, echo=False)
        points = json.loads(listing.stdout)
        latest = points[-1]["id"]
        say(f"restore point {latest[:12]}: what was recorded")
        show = json.loads(stillpoint("show", latest, env=env, echo=False).stdout)
        meta = show["metadata"]
        print(f"  consistency: {show['consistency']} ({'; '.join(show['reasons'])})")
        print(f"  phase durations per attempt (ms): "
              f"{[a['durations_ms'] for a in meta['attempts']]}")
        for name, facts in (meta.get("writer_results") or {}).items():
            keep = {k: v for k, v in facts.items() if k in (
                "start_wal_file", "stop_lsn", "binlog_file", "binlog_pos", "gtid", "frozen")}
            print(f"  writer {name}: {keep}")
        print(f"  disks: {[(d['label'], d['mode'], d['bytes_read']) for d in meta['disks']]}")
        say("application-aware restore as a new VM, powered on in the lab")
        stillpoint("restore", "vm", latest, "--name", "lab-vm1-restored", "--power-on",
                   env=env)
        stillpoint("restore", "status", "lab-vm1-restored", "--wait", "300", env=env)
        say("the restored guest's databases: invariants of the workload")
        restored = _restored_guest(cfg, "lab-vm1-restored")
        report = workload.check_invariants(restored)
        print(f"  {report}")
        print(f"  invariants {'HOLD' if report.ok else 'BROKEN'}")
        say("repository check, re-reading every chunk")
        stillpoint("check", "--read-data", env=env)
        return 0 if report.ok else 1
    finally:
        if args.keep:
            print(f"\nlab left up: export STILLPOINT_PROFILE={handle.profile_path}")
        else:
            say("tearing the lab down")
            lab_down(cfg, say=lambda m: print("  " + m))


def _restored_guest(cfg: LabConfig, name: str) -> "guest_mod.GuestHandle":
    hypervisor.wait_for_guest(cfg, name)
    return hypervisor.guest_handle(cfg, name)


if __name__ == "__main__":
    sys.exit(main())
