"""`verify --boot`: prove that a restore point restores, then record the verdict.

    file systems: every disk's file systems checked read-only (e2fsck -fn / xfs_repair -n)
      on a private image, by the appliance
    sandbox: the restore point restored as a new VM "<vm>-verify-<id>", marked with
      extraConfig stillpoint.sandbox (an isolated network: NICs mapped to the profile's
      verify.network when set; the lab isolates such VMs itself), powered on
    post-restore: the agent in the image runs each writer's procedure at first boot;
      its result is read from the guest
    applications: each writer's own check in the running sandbox
      postgresql: pg_amcheck --all (heap and B-tree indexes)    mariadb: mariadb-check --all
    verdict: pass/fail per writer; stored next to the repository; sandbox destroyed

The repository API has no objects besides restore points and their data (and restore
points are immutable), so verdicts are kept in `<repository>.verify/<restore point>.json`
(0600, a directory beside the repository), newest run last.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import StillpointError
from appliance.jobs import environment, files, restore
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
    report: dict[str, Any] = {"restore_point": rp.id, "vm": rp.vm.name,
                              "time": datetime.now(UTC).isoformat(), "ok": False, "checks": {}}
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
        progress.event(f"{sandbox}: booting; waiting for the post-restore result")
        status = restore.wait_for_status(profile_loader, sandbox, opts.timeout_s,
                                         source_vm=None)
        writers = (status.get("result") or {}).get("writers") or {}
        for name, w in sorted(writers.items()):
            checks[f"{name} post-restore"] = {
                "ok": bool(w.get("ok")),
                "detail": w.get("error") or _summary(w)}
        access = restore.guest_access_for(profile_loader(), sandbox)
        channel = environment.open_guest_channel(access)
        try:
            for name, res in restore.restorable_writers(rp).items():
                kind = res.get("kind")
                if kind == "postgresql":
                    checks[name] = _check_postgresql(channel, rp, name, res, progress)
                elif kind == "mariadb":
                    checks[name] = _check_mariadb(channel, res, progress)
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
    """fsck -n of every file system on every disk (read-only loop devices)."""
    out: dict[str, dict[str, Any]] = {}
    for disk in rp.disks:
        with files.disk_image(repo, rp, disk.key) as raw:
            try:
                attached = files.mounted_filesystems(raw)
                filesystems = attached.__enter__()
            except files.ImageError as err:
                out[f"filesystem {disk.label}"] = {"ok": True, "detail": f"not checked: {err}"}
                continue
            try:
                # fsck wants the file system unmounted: unmount, keep the loop device.
                for fs in filesystems:
                    subprocess.run(["umount", str(fs.root)], capture_output=True, check=False)
                for fs in filesystems:
                    label = (f"filesystem {disk.label}"
                             + (f" partition {fs.partition}" if fs.partition else ""))
                    out[label] = _fsck(fs.device, fs.fstype)
                    progress.event(f"{label}: {'clean' if out[label]['ok'] else 'ERRORS'}")
            finally:
                attached.__exit__(None, None, None)
    return out


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


def _check_postgresql(channel: Any, rp: RestorePoint, name: str, res: dict[str, Any],
                      progress: Progress) -> dict[str, Any]:
    version = int(res.get("version") or 0)
    major = version // 10000 if version >= 100000 else version // 100
    comp = {}
    for w in (rp.metadata.get("writer_metadata") or {}).get("writers", []):
        if w.get("name") == name and w.get("components"):
            comp = w["components"][0]
    sock = comp.get("socket_dir") or "/run/postgresql"
    port = str(comp.get("port") or 5432)
    user = res.get("os_user") or "postgres"
    pg_bin = f"/usr/lib/postgresql/{major}/bin"
    ready = _wait(channel, ["runuser", "-u", user, "--", f"{pg_bin}/pg_isready", "-h", sock,
                            "-p", port], 120)
    if not ready.ok:
        return {"ok": False, "detail": f"PostgreSQL did not start: {ready.text()[-500:]}"}
    got = channel.run(["runuser", "-u", user, "--", f"{pg_bin}/pg_amcheck", "-h", sock, "-p",
                       port, "--all", "--install-missing", "--heapallindexed"], timeout=1800)
    progress.event(f"{name}: pg_amcheck exit {got.exit_code}")
    return {"ok": got.ok, "detail": "pg_amcheck --all: "
            + ("no corruption found" if got.ok else got.text()[-1200:])}


def _check_mariadb(channel: Any, res: dict[str, Any], progress: Progress) -> dict[str, Any]:
    sock = res.get("socket") or "/run/mysqld/mysqld.sock"
    ready = _wait(channel, ["mariadb-admin", f"--socket={sock}", "--connect-timeout=2",
                            "ping"], 120)
    if not ready.ok:
        return {"ok": False, "detail": f"MariaDB did not start: {ready.text()[-500:]}"}
    got = channel.run(["mariadb-check", f"--socket={sock}", "--all-databases", "--check"],
                      timeout=1800)
    lines = got.stdout.decode("utf-8", "replace").splitlines()
    bad = [line for line in lines if line.strip() and not line.rstrip().endswith("OK")
           and not line.startswith(("note", "Note", "status"))]
    progress.event(f"mariadb: mariadb-check exit {got.exit_code}, {len(bad)} problem line(s)")
    ok = got.ok and not bad
    return {"ok": ok, "detail": "mariadb-check --all-databases: "
            + (f"{len(lines)} tables OK" if ok else "\n".join(bad)[-1200:] or got.text()[-800:])}


def _wait(channel: Any, argv: list[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = channel.run(argv, timeout=30)
        if got.ok or time.monotonic() > deadline:
            return got
        time.sleep(1)
