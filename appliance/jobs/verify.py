"""`verify --boot`: prove that a restore point restores, then record the verdict.

    file systems: every disk's file systems checked read-only (e2fsck -fn / xfs_repair -n)
      on a private image, by the appliance; one the kernel must recover at mount (its
      journal, cut without a freeze; orphan inodes) is recovered by the kernel on that
      copy first, as at the guest's boot
    sandbox: the restore point restored as a new VM "<vm>-verify-<id>", marked with
      extraConfig stillpoint.sandbox (an isolated network: NICs mapped to the profile's
      verify.network when set; the lab isolates such VMs itself), powered on
    post-restore: the agent in the image runs each writer's procedure at first boot;
      its result is read from the guest
      (no agent in the image: a restore point taken with the agent off has nothing that
      reports, so nothing is awaited: the guest is reached over SSH, its boot awaited
      (systemctl is-system-running --wait), and the databases it runs are found there)
    applications: each writer's own check in the running sandbox
      postgresql: pg_amcheck --all (heap and B-tree indexes)
      mariadb: mariadb-check --all-databases (CHECK TABLE: MyISAM tables too)
    verdict: pass/fail per writer; stored next to the repository; sandbox destroyed

The repository API has no objects besides restore points and their data (and restore
points are immutable), so verdicts are kept in `<repository>.verify/<restore point>.json`
(0600, a directory beside the repository), newest run last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import GuestError, StillpointError
from appliance.jobs import environment, files, restore
from appliance.jobs.point_metadata import PointMetadata
from appliance.profile import Profile
from appliance.progress import Progress
from appliance.repository import Repository, RestorePoint
from appliance.vsphere import restore_vm as rv
from appliance.vsphere.session import VSphereSession

SANDBOX_KEY = "stillpoint.sandbox"


@dataclass(frozen=True)
class VerifyOptions:
    restore_point: str
    timeout_s: float = 600.0
    keep: bool = False


def verdicts_dir(profile: Profile) -> Path:
    repo = profile.repository_path()
    return repo.with_name(repo.name + ".verify")


def record_verdict(profile: Profile, report: dict[str, Any]) -> Path:
    d = verdicts_dir(profile)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"{report['restore_point']}.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(report)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(history, f, indent=1, default=str)
    tmp.replace(path)
    return path


def last_verdict(profile: Profile, rp_id: str) -> dict[str, Any] | None:
    path = verdicts_dir(profile) / f"{rp_id}.json"
    if not path.exists():
        return None
    history = json.loads(path.read_text())
    return dict(history[-1]) if history else None


def run_verify(opts: VerifyOptions, profile_loader: Callable[[], Profile], repo: Repository,
               session: VSphereSession, progress: Progress) -> dict[str, Any]:
    profile = profile_loader()
    rp = repo.get(opts.restore_point)
    started = time.monotonic()
    agent = restore.agent_in_image(rp)
    report: dict[str, Any] = {"restore_point": rp.id, "vm": rp.vm.name,
                              "time": datetime.now(UTC).isoformat(), "ok": False, "checks": {},
                              "agent_in_image": agent}
    checks: dict[str, dict[str, Any]] = report["checks"]
    for key, result in check_filesystems(repo, rp, progress).items():
        checks[key] = result
    sandbox = f"{rp.vm.name}-verify-{rp.id[:8]}"
    report["sandbox"] = sandbox
    network = (profile_extra(profile).get("verify") or {}).get("network")
    ropts = restore.RestoreVMOptions(
        restore_point=rp.id, name=sandbox, power_on=True,
        network_map={"*": network} if network else {},
        extra_config={SANDBOX_KEY: "verify"})
    _remove_stale_sandbox(session, sandbox, progress)
    made = None
    try:
        made = restore.run_restore_vm(ropts, repo, session, progress)
        deadline = time.monotonic() + opts.timeout_s
        targets: dict[str, dict[str, Any]] = {}
        if agent:
            targets = _await_post_restore(profile_loader, sandbox, rp, opts, checks, progress)
            channel = environment.open_guest_channel(
                restore.guest_access_for(profile_loader(), sandbox))
        else:
            progress.event(f"{sandbox}: booting; restore point {rp.id[:12]} was taken without "
                           "the agent: nothing in the image reports, the checks run from outside")
            channel = _reach_guest(profile_loader, sandbox, deadline)
        try:
            if not agent:
                checks["boot"] = _await_boot(channel, deadline, progress)
                targets = _discover_databases(channel, checks, progress)
            for name, target in targets.items():
                if target["kind"] == "postgresql":
                    checks[name] = _check_postgresql(channel, name, target, progress)
                elif target["kind"] == "mariadb":
                    checks[name] = _check_mariadb(channel, name, target, progress)
        finally:
            channel.close()
    except StillpointError as err:
        checks["sandbox"] = {"ok": False, "detail": str(err)}
    finally:
        if made is not None and not opts.keep:
            vm = rv.find_vm_by_name(session, sandbox)
            if vm is not None:
                rv.destroy_vm(session, vm)
                progress.event(f"{sandbox}: destroyed")
    report["ok"] = bool(checks) and all(c["ok"] for c in checks.values())
    report["seconds"] = round(time.monotonic() - started, 1)
    report["recorded"] = str(record_verdict(profile, report))
    return report


def _await_post_restore(profile_loader: Callable[[], Profile], sandbox: str, rp: RestorePoint,
                        opts: VerifyOptions, checks: dict[str, dict[str, Any]],
                        progress: Progress) -> dict[str, dict[str, Any]]:
    """The agent's post-restore result (one check per writer); what to check next."""
    progress.event(f"{sandbox}: booting; waiting for the post-restore result")
    status = restore.wait_for_status(profile_loader, sandbox, opts.timeout_s, source_vm=None)
    writers = (status.get("result") or {}).get("writers") or {}
    for name, w in sorted(writers.items()):
        checks[f"{name} post-restore"] = {"ok": bool(w.get("ok")),
                                          "detail": w.get("error") or _summary(w)}
    targets = {}
    for name, res in restore.restorable_writers(rp).items():
        if res.get("kind") == "postgresql":
            targets[name] = _pg_target(rp, name, res)
        elif res.get("kind") == "mariadb":
            targets[name] = {"kind": "mariadb",
                             "socket": res.get("socket") or "/run/mysqld/mysqld.sock"}
    return targets


def _pg_target(rp: RestorePoint, name: str, res: dict[str, Any]) -> dict[str, Any]:
    version = int(res.get("version") or 0)
    comp = PointMetadata.of(rp).first_component(name)
    return {"kind": "postgresql",
            "major": version // 10000 if version >= 100000 else version // 100,
            "socket_dir": comp.get("socket_dir") or "/run/postgresql",
            "port": str(comp.get("port") or 5432), "os_user": res.get("os_user") or "postgres"}


def _reach_guest(profile_loader: Callable[[], Profile], sandbox: str, deadline: float) -> Any:
    """A channel to the booted sandbox, once its access is known and SSH answers."""
    last = ""
    while True:
        try:
            channel = environment.open_guest_channel(
                restore.guest_access_for(profile_loader(), sandbox))
            try:
                if channel.run(["true"], timeout=30).ok:
                    return channel
            except StillpointError:
                pass
            channel.close()
            last = "the guest does not run commands yet"
        except StillpointError as err:
            last = str(err)
        if time.monotonic() > deadline:
            raise GuestError(f"{sandbox}: not reachable within the timeout ({last})")
        time.sleep(2)


def _await_boot(channel: Any, deadline: float, progress: Progress) -> dict[str, Any]:
    """Until the guest's boot has finished (every unit started or failed)."""
    left = max(10, int(deadline - time.monotonic()))
    got = channel.run(["timeout", str(left), "systemctl", "is-system-running", "--wait"],
                      timeout=left + 30)
    state = got.stdout.decode("utf-8", "replace").strip() or got.text()
    if state not in ("running", "degraded"):
        return {"ok": False, "detail": f"boot not finished: systemd says {state!r}"}
    failed = channel.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend",
                          "--no-pager"], timeout=60)
    units = [line.split()[0] for line in failed.stdout.decode("utf-8", "replace").splitlines()
             if line.strip()]
    progress.event(f"boot finished: {state}" + (f", failed units: {', '.join(units)}"
                                                  if units else ""))
    return {"ok": True, "detail": f"systemd: {state}"
            + (f" (failed units: {', '.join(units)})" if units else "")}


# Run as root in the booted guest (POSIX sh, procps and iproute2): one line per database
# server it runs, and one per failed database unit.
#   postgresql <data_dir> <port> <socket_dir> <owner> <PG_VERSION>
#   mariadb <socket>
#   failed <unit>
_DISCOVER = r"""
for p in $(pgrep -x postgres; pgrep -x postmaster); do
  pp=$(ps -o ppid= -p "$p" | tr -d ' ')
  case "$(ps -o comm= -p "$pp")" in postgres|postmaster) continue ;; esac
  d=$(readlink "/proc/$p/cwd") || continue
  [ -f "$d/postmaster.pid" ] || continue
  echo "postgresql	$d	$(sed -n 4p "$d/postmaster.pid")	$(sed -n 5p "$d/postmaster.pid")	$(stat -c %U "$d")	$(cat "$d/PG_VERSION")"
done
for p in $(pgrep -x mariadbd; pgrep -x mysqld); do
  ss -xlpnH | grep "pid=$p," | awk '{print "mariadb	" $5}' | head -n 1
done
systemctl list-units --failed --plain --no-legend --no-pager   | awk '$1 ~ /^(postgresql|mariadb|mysql)/ {print "failed	" $1}'
"""


def _discover_databases(channel: Any, checks: dict[str, dict[str, Any]],
                        progress: Progress) -> dict[str, dict[str, Any]]:
    """The database servers the booted guest runs (named like the agent's writers); a
    database unit that failed to start is a failed check."""
    got = channel.run(["sh", "-c", _DISCOVER], timeout=120)
    targets: dict[str, dict[str, Any]] = {}
    for line in got.stdout.decode("utf-8", "replace").splitlines():
        kind, *fields = line.split("\t")
        if kind == "postgresql" and len(fields) == 5:
            data_dir, port, sock, owner, version = fields
            major = version.split(".")[0]
            targets[f"postgresql:{data_dir}"] = {
                "kind": "postgresql", "major": int(major) if major.isdigit() else 0,
                "socket_dir": sock or "/run/postgresql", "port": port or "5432",
                "os_user": owner or "postgres"}
        elif kind == "mariadb" and fields:
            targets[f"mariadb:{fields[0]}"] = {"kind": "mariadb", "socket": fields[0]}
        elif kind == "failed" and fields:
            log = channel.run(["journalctl", "-b", "-u", fields[0], "-n", "15", "--no-pager",
                               "-o", "cat"], timeout=60)
            checks[f"unit {fields[0]}"] = {"ok": False, "detail": "failed to start: "
                                           + log.text()[-1200:]}
    progress.event("found in the guest: " + (", ".join(sorted(targets)) or "no database"))
    if not targets:
        checks["applications"] = {"ok": True, "detail": "no PostgreSQL or MariaDB server "
                                  "runs in the booted image: nothing to check"}
    return targets


def _remove_stale_sandbox(session: VSphereSession, name: str, progress: Progress) -> None:
    """A sandbox left by an interrupted verify (only a VM carrying our sandbox mark)."""
    vm = rv.find_vm_by_name(session, name)
    if vm is None:
        return
    if SANDBOX_KEY not in rv.vm_extra_config(session, vm):
        raise StillpointError(f"a VM named {name} exists and is not a Stillpoint sandbox: "
                              "not touched; rename or remove it")
    progress.event(f"{name}: removing a sandbox left by an earlier verify")
    rv.destroy_vm(session, vm)


def profile_extra(profile: Profile) -> dict[str, Any]:
    if profile.path is None or not profile.path.exists():
        return {}
    try:
        return dict(json.loads(profile.path.read_text()))
    except (OSError, ValueError):
        return {}


def _summary(w: dict[str, Any]) -> str:
    keys = ("reason", "archive_recovery", "target_time", "binlog_file", "binlog_pos",
            "replayed")
    return ", ".join(f"{k}={w[k]}" for k in keys if w.get(k)) or "done"


def check_filesystems(repo: Repository, rp: RestorePoint,
                      progress: Progress) -> dict[str, dict[str, Any]]:
    """fsck -n of every file system on every disk. First on a read-only loop device; a file
    system the kernel must recover at mount (a journal or xfs log with changes not written
    home: cut without a freeze; orphan inodes: files deleted while open) is checked after
    the kernel did so on a writable attach of the private image, as at the guest's boot."""
    out: dict[str, dict[str, Any]] = {}
    for disk in rp.disks:
        with files.disk_image(repo, rp, disk.key) as raw:
            try:
                found, replay = _check_disk(raw, disk.label, writable=False)
            except files.ImageError as err:
                out[f"filesystem {disk.label}"] = {"ok": True, "detail": f"not checked: {err}"}
                continue
            if replay:
                replayed, _ = _check_disk(raw, disk.label, writable=True, only=replay)
                for label, result in replayed.items():
                    result["detail"] = (f"recovered by the kernel first ({replay[label]}), "
                                        "then " + result["detail"])
                    found[label] = result
            for label, result in found.items():
                progress.event(f"{label}: {'clean' if result['ok'] else 'ERRORS'}")
            out.update(found)
    return out


def _check_disk(raw: Path, disk_label: str, *, writable: bool,
                only: dict[str, str] | None = None,
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({label: result}, {label: why} of file systems the kernel must recover first)."""
    out: dict[str, dict[str, Any]] = {}
    replay: dict[str, str] = {}
    with files.mounted_filesystems(raw, writable=writable) as filesystems:
        # fsck wants the file system unmounted: unmount, keep the loop device.
        for fs in filesystems:
            subprocess.run(["umount", str(fs.root)], capture_output=True, check=False)
        for fs in filesystems:
            label = (f"filesystem {disk_label}"
                     + (f" partition {fs.partition}" if fs.partition else ""))
            if only is not None and label not in only:
                continue
            why = "" if writable else _recovery_pending(fs.device, fs.fstype)
            if why:
                replay[label] = why
                continue
            out[label] = _fsck(fs.device, fs.fstype)
    return out, replay


def _recovery_pending(device: str, fstype: str) -> str:
    """What the kernel would do first when mounting it (empty: nothing): replay a journal
    whose changes are not written home (cut without a freeze), or release the orphan inodes
    (files deleted while still open when cut, frozen or not: e2fsck -n cannot release them
    and reports them as errors)."""
    if fstype.startswith("ext"):
        got = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True,
                             check=False)
        lines = got.stdout.splitlines()
        features = next((line for line in lines if line.startswith("Filesystem features:")),
                        "")
        if "needs_recovery" in features:
            return "journal replayed: cut without a freeze"
        if "orphan_present" in features or any(line.startswith("First orphan inode:")
                                               for line in lines):
            return "orphan inodes released: files deleted while open when cut"
        return ""
    if fstype == "xfs":
        got = subprocess.run(["xfs_repair", "-n", device], capture_output=True, text=True,
                             check=False, timeout=1800)
        text = (got.stdout + got.stderr).lower()
        if got.returncode != 0 and "log" in text and "replay" in text:
            return "log replayed: cut without a freeze"
    return ""


def _fsck(device: str, fstype: str) -> dict[str, Any]:
    if fstype == "xfs":
        argv = ["xfs_repair", "-n", device]
    elif fstype.startswith("ext"):
        argv = ["e2fsck", "-fn", device]
    else:
        return {"ok": True, "detail": f"{fstype}: no checker here; it mounted cleanly"}
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    return {"ok": proc.returncode == 0,
            "detail": f"{' '.join(argv[:-1])}: exit {proc.returncode}"
            + ("" if proc.returncode == 0 else ": " + (proc.stdout + proc.stderr).strip()[-800:])}


def _check_postgresql(channel: Any, name: str, target: dict[str, Any],
                      progress: Progress) -> dict[str, Any]:
    sock, port, user = target["socket_dir"], target["port"], target["os_user"]
    pg_bin = f"/usr/lib/postgresql/{target['major']}/bin"
    ready = _wait(channel, ["runuser", "-u", user, "--", f"{pg_bin}/pg_isready", "-h", sock,
                            "-p", port], 120)
    if not ready.ok:
        return {"ok": False, "detail": f"PostgreSQL did not start: {ready.text()[-500:]}"}
    got = channel.run(["runuser", "-u", user, "--", f"{pg_bin}/pg_amcheck", "-h", sock, "-p",
                       port, "--all", "--install-missing", "--heapallindexed"], timeout=1800)
    progress.event(f"{name}: pg_amcheck exit {got.exit_code}")
    return {"ok": got.ok, "detail": "pg_amcheck --all: "
            + ("no corruption found" if got.ok else got.text()[-1200:])}


_MSG = re.compile(r"^(note|info|warning|error|status)\s*:\s*(.*)$", re.IGNORECASE)


def parse_mariadb_check(output: str) -> dict[str, list[tuple[str, str]]]:
    """mariadb-check's report per table: {"db.table": [(msg_type, text), ...]}. A table it
    found sound is one line "db.table   OK"; otherwise its name, then "type : text" lines
    (a MyISAM table that was open when cut: "warning : 1 client is using or hasn't closed
    the table properly", then "status : OK"; a crashed one: "error : ..." lines)."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in output.splitlines():
        if not line.strip():
            continue
        m = _MSG.match(line.strip())
        if m and current is not None:
            tables[current].append((m.group(1).lower(), m.group(2).strip()))
            continue
        parts = line.split()
        current = parts[0]
        tables[current] = [("status", " ".join(parts[1:]))] if len(parts) > 1 else []
    return tables


def _table_ok(messages: list[tuple[str, str]]) -> bool:
    """No error, and the last status OK (a table the engine cannot check has only a note)."""
    status = [text for kind, text in messages if kind == "status"]
    return not any(kind == "error" for kind, _ in messages) and (not status or status[-1] == "OK")


def _check_mariadb(channel: Any, name: str, target: dict[str, Any],
                   progress: Progress) -> dict[str, Any]:
    sock = target["socket"]
    ready = _wait(channel, ["mariadb-admin", f"--socket={sock}", "--connect-timeout=2",
                            "ping"], 120)
    if not ready.ok:
        return {"ok": False, "detail": f"MariaDB did not start: {ready.text()[-500:]}"}
    got = channel.run(["mariadb-check", f"--socket={sock}", "--all-databases", "--check"],
                      timeout=1800)
    tables = parse_mariadb_check(got.stdout.decode("utf-8", "replace"))
    bad = {t: m for t, m in tables.items() if not _table_ok(m)}
    warned = {t: m for t, m in tables.items() if t not in bad and len(m) > 1}
    progress.event(f"{name}: mariadb-check exit {got.exit_code}, {len(tables)} tables, "
                   f"{len(bad)} not OK")
    ok = got.ok and bool(tables) and not bad

    def lines(found: dict[str, list[tuple[str, str]]]) -> str:
        return "; ".join(f"{t}: " + ", ".join(f"{k}: {v}" for k, v in m)
                         for t, m in sorted(found.items()))

    if ok:
        detail = f"{len(tables)} tables OK" + (f" ({lines(warned)})" if warned else "")
    elif bad:
        detail = f"{len(bad)} of {len(tables)} tables not OK: {lines(bad)}"
    else:
        detail = got.text()[-800:] or "no tables checked"
    return {"ok": ok, "detail": "mariadb-check --all-databases: " + detail[-1500:],
            "tables": {t: ("OK" if t not in bad else "; ".join(v for _, v in m))
                       for t, m in sorted(tables.items())}}


def _wait(channel: Any, argv: list[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = channel.run(argv, timeout=30)
        if got.ok or time.monotonic() > deadline:
            return got
        time.sleep(1)
