"""What each kind of restore point loses, measured: the lab's consistency experiment.

The same write load runs throughout (stillpoint_lab/workload.py on PostgreSQL, InnoDB and a
MyISAM table, plus a "ledger": a file pair an application writes one after the other, whose
pre-freeze / post-thaw hooks pause it). Restore points are taken in three modes:

    crash     agent off, no quiesce: what a power cut at that instant leaves
    quiesce   agent off, VMware-Tools-style quiesce (qemu-guest-agent fsfreeze and its hooks)
    agent     Stillpoint's agent: the applications' writers, then the freeze

and every one is booted as a VM of its own (its disks restored from the repository, the restore
marker passed through guestinfo as `restore vm` does), isolated in the sandbox network, and
judged (`judge`): a clean boot or an ext4 journal replay, PostgreSQL crash recovery, MyISAM
tables marked crashed, acknowledged transactions lost (the host's commit log against what the
restored databases hold), the workload's invariants, pg_amcheck and mariadb-check, the ledger.

    python -m stillpoint_lab.consistency [--points N] [--out docs/consistency.md]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from appliance.errors import StillpointError
from stillpoint_lab import workload
from stillpoint_lab.config import LabConfig, VMSpec
from stillpoint_lab.guest_vm import GuestHandle
from stillpoint_lab.image import layout

MODES = ("crash", "quiesce", "agent")
LAB_ID = 8
LEDGER_DIR = "/data/ledger"
LEDGER_APP = "/usr/local/sbin/stillpoint-lab-ledger"
Say = Callable[[str], None]

# The ledger: writes `ledger` then, a moment later, `ledger.sum` (its sha256). Between the two
# the pair disagrees: an image cut there without the application paused is torn. The hooks
# (VMware Tools' pre-freeze / post-thaw for quiesce, the agent's hooks.d for agent mode) ask
# it to pause at a consistent point and wait until it has. At its first start in a boot it
# records the pair it found (LEDGER_BOOT_STATE): the image's state, before it writes again
# (a check made later would race the running ledger).
LEDGER_BOOT_STATE = "/run/ledger.boot-state"
_LEDGER_SCRIPT = f"""#!/bin/sh
# Lab application with a two-file invariant (stillpoint_lab/consistency.py).
mkdir -p {LEDGER_DIR}
if [ ! -e {LEDGER_BOOT_STATE} ]; then
  if [ ! -s {LEDGER_DIR}/ledger.sum ]; then state=none
  elif [ "$(sha256sum < {LEDGER_DIR}/ledger | cut -d' ' -f1)" = "$(cat {LEDGER_DIR}/ledger.sum)" ]
  then state=intact
  else state=torn; fi
  echo $state > {LEDGER_BOOT_STATE}.tmp && mv {LEDGER_BOOT_STATE}.tmp {LEDGER_BOOT_STATE}
fi
n=0
while true; do
  if [ -e /run/ledger.pause ]; then touch /run/ledger.paused; sleep 0.05; continue; fi
  rm -f /run/ledger.paused
  n=$((n + 1))
  head -c 65536 /dev/urandom > {LEDGER_DIR}/ledger
  sleep 0.2
  sha256sum < {LEDGER_DIR}/ledger | cut -d' ' -f1 > {LEDGER_DIR}/ledger.sum
  echo $n > {LEDGER_DIR}/ledger.count
  sleep 0.2
done
"""
_LEDGER_UNIT = f"""[Unit]
Description=Stillpoint lab ledger (an application with a two-file invariant)
# /data is a nofail mount: local-fs.target does not wait for it (the ledger started before
# it wrote to the root file system and found no pair there)
RequiresMountsFor={LEDGER_DIR}

[Service]
ExecStart={LEDGER_APP}
Restart=always

[Install]
WantedBy=multi-user.target
"""
# One hook for both callers: qemu-ga's fsfreeze-hook passes freeze/thaw, the agent too.
_LEDGER_HOOK = """#!/bin/sh
case "$1" in
  # A "paused" left from the last freeze must not answer for this one (the ledger may be
  # past its check already): cleared first, then only the ledger's own pause makes it.
  # Not paused in 20 s: the freeze fails (and is retried) rather than cut a torn pair.
  freeze) rm -f /run/ledger.paused; touch /run/ledger.pause
          i=0; while [ ! -e /run/ledger.paused ]; do
            [ $i -ge 400 ] && { echo "ledger did not pause" >&2; exit 1; }
            sleep 0.05; i=$((i+1)); done ;;
  thaw) rm -f /run/ledger.pause ;;
esac
exit 0
"""


@dataclass
class Verdict:
    mode: str
    restore_point: str
    consistency: str = ""            # what the restore point says of itself
    booted: bool = False
    boot_s: float = 0.0
    error: str = ""
    ext4_replays: list[str] = field(default_factory=list)   # devices whose journal replayed
    pg_crash_recovery: bool = False
    pg_amcheck_ok: bool | None = None
    myisam_crashed: bool = False
    mariadb_check_ok: bool | None = None
    lost: dict[str, int] = field(default_factory=dict)     # acknowledged before, missing after
    invariants_ok: bool | None = None
    ledger_ok: bool | None = None
    ledger_state: str = ""           # intact, torn, none (no pair), missing (never started)

    @property
    def damage(self) -> list[str]:
        out = []
        if not self.booted:
            out.append("no boot")
        out += [f"ext4 replay {d}" for d in self.ext4_replays]
        # PostgreSQL's crash recovery is not damage by itself: it is how an atomic snapshot
        # is opened (also an application-consistent one, whose backup-end WAL is written
        # after the snapshot); what it could not recover shows in the checks below.
        if self.myisam_crashed:
            out.append("MyISAM crashed")
        if any(self.lost.values()):
            out.append("lost " + ", ".join(f"{n} {db}" for db, n in self.lost.items() if n))
        for name, ok in (("invariants", self.invariants_ok), ("pg_amcheck", self.pg_amcheck_ok),
                         ("mariadb-check", self.mariadb_check_ok), ("ledger", self.ledger_ok)):
            if ok is False:
                out.append(f"{name} failed")
        return out


def install_ledger(guest: GuestHandle) -> None:
    """The ledger application and its hooks, installed on the VM's disks (so they are in
    every image taken afterwards), started now."""
    files = {LEDGER_APP: _LEDGER_SCRIPT, "/etc/systemd/system/stillpoint-lab-ledger.service":
             _LEDGER_UNIT, f"{layout.FSFREEZE_HOOK_DIR}/50-ledger": _LEDGER_HOOK,
             "/etc/stillpoint/hooks.d/50-ledger": _LEDGER_HOOK}
    for path, text in files.items():
        mode = "644" if path.endswith(".service") else "755"
        done = guest.run(["sh", "-c", f"mkdir -p \"$(dirname {path})\" && cat > {path} && "
                                      f"chmod {mode} {path}"], input=text)
        if done.returncode != 0:
            raise StillpointError(f"installing {path} in {guest.name}: {done.stderr.strip()}")
    guest.run(["systemctl", "daemon-reload"])
    started = guest.run(["systemctl", "enable", "--now", "stillpoint-lab-ledger.service"])
    if started.returncode != 0:
        raise StillpointError(f"ledger in {guest.name}: {started.stderr.strip()}")


def judge(guest: GuestHandle, verdict: Verdict, commits: list[workload.Commit],
          cut: float) -> Verdict:
    """Examine a booted restored VM; `cut` is when its snapshot was asked for (Unix time):
    every commit acknowledged before it must be there."""
    # A journal replayed at boot: by the kernel at mount ("EXT4-fs (vdb): recovery complete"),
    # or before it by e2fsck, which is where an unclean root or /data is usually replayed: the
    # initramfs's fsck for the root (/run/initramfs/fsck.log), systemd-fsck's for /data (the
    # journal): "splab-root: recovering journal". (The first run of docs/consistency.md looked
    # at the kernel's line only.)
    boot_log = guest.sh("journalctl -b --no-pager -o cat; "
                        "cat /run/initramfs/fsck.log 2>/dev/null; true").stdout
    verdict.ext4_replays = sorted(
        {line.split("(")[1].split(")")[0] for line in boot_log.splitlines()
         if "EXT4-fs (" in line and "recovery complete" in line}
        | {line.split(": recovering journal")[0].split()[-1] for line in boot_log.splitlines()
           if ": recovering journal" in line and line.split(": recovering journal")[0].split()})
    pg_up = guest.sh("for i in $(seq 120); do pg_isready -q -h /run/postgresql && exit 0; "
                     "sleep 1; done; exit 1", timeout=180).returncode == 0
    my_up = guest.sh("for i in $(seq 120); do mariadb-admin ping >/dev/null 2>&1 && exit 0; "
                     "sleep 1; done; exit 1", timeout=180).returncode == 0
    pg_log = guest.sh("cat /var/log/postgresql/postgresql-15-main.log 2>/dev/null").stdout
    verdict.pg_crash_recovery = ("not properly shut down" in pg_log
                                 or "automatic recovery in progress" in pg_log)
    if pg_up:
        amcheck = guest.run(["runuser", "-u", "postgres", "--", f"{layout.PG_BIN}/pg_amcheck",
                             "-h", "/run/postgresql", "--all", "--install-missing"], timeout=300)
        verdict.pg_amcheck_ok = amcheck.returncode == 0
    if my_up:
        check = guest.run(["mariadb-check", "--all-databases"], timeout=300)
        verdict.mariadb_check_ok = check.returncode == 0 and not any(
            w in check.stdout for w in ("error", "crashed", "corrupt"))
        mylog = guest.sh("journalctl -b -u mariadb --no-pager -o cat").stdout
        verdict.myisam_crashed = "marked as crashed" in mylog or "crashed" in check.stdout
    if pg_up and my_up:
        try:
            report = workload.check_invariants(guest)
            verdict.invariants_ok = report.ok
            restored = {"pg": report.pg_seq_max, "my": report.my_seq_max}
            verdict.lost = {db: sum(1 for c in commits if c.db == db and c.committed < cut
                                    and c.id > restored[db]) for db in restored}
        except StillpointError as err:
            verdict.error = f"invariant check: {err}"
            verdict.invariants_ok = False
    ledger = guest.sh(f"for i in $(seq 120); do [ -e {LEDGER_BOOT_STATE} ] && "
                      f"exec cat {LEDGER_BOOT_STATE}; sleep 1; done; echo missing",
                      timeout=180).stdout.strip()
    verdict.ledger_state = ledger
    verdict.ledger_ok = {"intact": True, "torn": False}.get(ledger)
    return verdict


# --- the experiment -----------------------------------------------------------------------


def run(points: int, out: Path | None, say: Say = print) -> list[Verdict]:
    from appliance.jobs import environment
    from appliance.jobs.backup import BackupOptions, run_backup
    from appliance.jobs.consistency import ConsistencyPolicy
    from appliance.profile import load_profile
    from appliance.progress import NullProgress
    from appliance.transport.datastore_http import DatastoreHTTPReader
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, vms=(VMSpec("lab-vm1"),))
    lab_down(cfg)
    started = time.time()
    handle = lab_up(cfg, say=lambda m: say("  " + m))
    try:
        guest = handle.guests["lab-vm1"]
        install_ledger(guest)
        profile = load_profile(handle.profile_path)
        repo = environment.open_repository(profile, create=True)
        log_path = cfg.state_dir / "commits.log"
        load = workload.start_workload(guest, rate=40, log_path=log_path)
        taken: list[tuple[str, str]] = []
        try:
            time.sleep(5)
            policies = {"crash": ConsistencyPolicy(app_aware="off"),
                        "quiesce": ConsistencyPolicy(app_aware="off", quiesce=True),
                        "agent": ConsistencyPolicy(app_aware="require")}
            for i in range(points):
                for mode in MODES:
                    session = environment.open_vcenter(profile)
                    try:
                        [result] = run_backup(
                            BackupOptions(targets=("lab-vm1",), policy=policies[mode],
                                          truncate_logs=False),
                            profile, session, repo, DatastoreHTTPReader(session), NullProgress())
                    finally:
                        session.close()
                    if not result.ok:
                        raise StillpointError(f"{mode} backup {i + 1}: {result.error}")
                    point = str(result.restore_point)
                    taken.append((mode, point))
                    say(f"  {mode} restore point {i + 1}/{points}: {point[:12]}")
                    time.sleep(2)
        finally:
            workload.stop_workload(load)
        # The source VM's ledger would go on writing (and its TCG vCPUs spinning) through
        # every boot below: powered off, as an administrator would, the judges get the CPUs.
        _power_off(profile, "lab-vm1")
        commits = workload.read_log(log_path)
        verdicts = []
        for n, (mode, rp_id) in enumerate(taken):
            verdicts.append(boot_and_judge(cfg, repo, mode, rp_id, commits, n))
            v = verdicts[-1]
            say(f"  booted {mode} {rp_id[:12]}: {'; '.join(v.damage) or 'clean'}"
                + (f" ({v.error})" if v.error else ""))
    finally:
        lab_down(cfg)
    if out is not None:
        out.write_text(render(verdicts, points, time.time() - started))
        say(f"wrote {out}")
    return verdicts


def _power_off(profile: Any, vm_name: str) -> None:
    from appliance.jobs import environment
    from appliance.vsphere import inventory, restore_vm

    session = environment.open_vcenter(profile)
    try:
        restore_vm.power_off(session, inventory.find_vm(session, vm_name))
    finally:
        session.close()


def boot_and_judge(cfg: LabConfig, repo: Any, mode: str, rp_id: str,
                   commits: list[workload.Commit], n: int) -> Verdict:
    """Restore a restore point's disks to files and boot them in the sandbox, with the
    restore marker in guestinfo (as `restore vm` sets it), then judge what came up."""
    from appliance.jobs.restore import MARKER_KEY, restore_marker
    from stillpoint_lab import hostd
    from stillpoint_lab.lab import remove_scratch_vm, wait_for_guest

    rp = repo.get(rp_id)
    verdict = Verdict(mode=mode, restore_point=rp_id, consistency=rp.consistency)
    cut = datetime.fromisoformat(rp.metadata["snapshot_window"]["requested"]).timestamp()
    name = f"judge-{n}"
    with tempfile.TemporaryDirectory(prefix="stillpoint-judge-", dir=cfg.state_dir) as tmp:
        disks = []
        for d in rp.disks:
            path = Path(tmp) / f"disk-{d.key}.raw"
            repo.restore_disk_to(rp, d.key, path)
            disks.append(path)
        marker = json.dumps(restore_marker(rp), sort_keys=True)
        t0 = time.monotonic()
        try:
            hostd.call(cfg, "/vm/power-on", {
                "vm": name, "mac": f"02:00:00:00:{n // 256:02x}:{n % 256:02x}",
                "memory_mib": 1024, "cpus": 2, "sandbox": True,
                "guestinfo": {MARKER_KEY: marker},
                "disks": [{"key": 2000 + i, "flat": str(p)} for i, p in enumerate(disks)]},
                timeout=120)
            guest = wait_for_guest(cfg, name, apps=())
            verdict.booted, verdict.boot_s = True, round(time.monotonic() - t0, 1)
            judge(guest, verdict, commits, cut)
        except StillpointError as err:
            verdict.error = str(err)
        finally:
            remove_scratch_vm(cfg, name)
    return verdict


def render(verdicts: list[Verdict], points: int, seconds: float) -> str:
    rows = []
    for mode in MODES:
        vs = [v for v in verdicts if v.mode == mode]
        if not vs:
            continue
        lost = {db: sum(v.lost.get(db, 0) for v in vs) for db in ("pg", "my")}
        rows.append("| " + " | ".join(str(x) for x in (
            mode, len(vs), sum(v.booted and not v.ext4_replays for v in vs),
            sum(bool(v.ext4_replays) for v in vs), sum(v.pg_crash_recovery for v in vs),
            sum(v.myisam_crashed for v in vs),
            f"{sum(bool(v.lost.get('pg')) or bool(v.lost.get('my')) for v in vs)} "
            f"(PG {lost['pg']}, MariaDB {lost['my']} rows)",
            sum(v.invariants_ok is False for v in vs), sum(v.ledger_ok is False for v in vs),
            f"{sum(v.pg_amcheck_ok is True for v in vs)}/{len(vs)}",
            f"{sum(v.mariadb_check_ok is True for v in vs)}/{len(vs)}")) + " |")
    detail = "\n".join(
        f"| {v.mode} | {v.restore_point[:12]} | {v.consistency} | {v.boot_s} | "
        f"{'; '.join(v.damage) or 'clean'}{' — ' + v.error if v.error else ''} |"
        for v in verdicts)
    return f"""# Consistency: what each kind of restore point loses

Produced by `make consistency` (`python -m stillpoint_lab.consistency --points {points}`) on
{time.strftime('%Y-%m-%d', time.gmtime())}, {seconds / 60:.0f} minutes, on the QEMU lab (TCG, 2 cores).
The write load: the lab workload (PostgreSQL and InnoDB transfers with a gap-free sequence, a
MyISAM log table; every commit logged on the host when its COMMIT returned) and the ledger
(a file pair whose hooks pause it). Every restore point was booted as its own VM in the
sandbox network, with the restore marker passed through guestinfo as `restore vm` does.

| mode | points | clean boots | ext4 journal replays | PostgreSQL crash recoveries | MyISAM marked crashed | points that lost acknowledged commits | invariant failures | ledger torn | pg_amcheck OK | mariadb-check OK |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

"Lost": commits whose COMMIT had returned to the client before the snapshot was asked for
and which the restored database does not hold.

## Every restore point

| mode | restore point | recorded as | boot s | what the booted VM showed |
|---|---|---|---|---|
{detail}

## Raw

```json
{json.dumps([asdict(v) for v in verdicts], indent=1)}
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stillpoint_lab.consistency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10, help="restore points per mode")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("consistency: the lab needs root", file=sys.stderr)
        return 11
    try:
        run(args.points, args.out)
    except StillpointError as err:
        print(f"consistency: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
