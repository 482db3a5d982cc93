"""Backup and repository commands: init, backup, list, show, restore disk, check, forget, prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from appliance.errors import WARNING_EXIT_CODE, IntegrityError, UsageError
from appliance.profile import Profile, load_profile
from appliance.progress import Progress, human_bytes


def _profile(ctx: click.Context) -> Profile:
    return load_profile(ctx.obj.get("profile") if ctx.obj else None)


def _reader(transport: str, session: Any, profile: Profile) -> Any:
    if transport == "datastore-http":
        from appliance.transport.datastore_http import DatastoreHTTPReader

        return DatastoreHTTPReader(session)
    if transport == "nbd":
        from appliance.transport.nbdkit import nbd_reader_from_profile

        return nbd_reader_from_profile(profile, session)
    raise UsageError(f"unknown transport {transport!r}: use datastore-http or nbd")


@click.command("init", help="Create the profile's repository (encrypted unless the profile "
               "says encryption: false).")
@click.pass_context
def init_command(ctx: click.Context) -> None:
    from appliance.jobs import environment

    profile = _profile(ctx)
    if environment.repository_exists(profile):
        raise UsageError(f"a repository already exists at {profile.repository_path()}")
    repo = environment.open_repository(profile, create=True)
    click.echo(f"repository {repo.id} created at {profile.repository_path()} "
               f"({'encrypted' if repo.encrypted else 'NOT encrypted'})")


@click.command("backup", help="Back up VMs (by name, inventory path, moref, folder:PATH or tag:[CATEGORY/]TAG).")
@click.argument("targets", nargs=-1, required=True)
@click.option("--full", is_flag=True, help="Copy all allocated areas, not only the changes.")
@click.option("--transport", type=click.Choice(["datastore-http", "nbd"]),
              default="datastore-http", show_default=True)
@click.option("--app-aware", type=click.Choice(["auto", "require", "try", "off"]),
              default="auto", show_default=True,
              help="auto: require when the profile has guest access for the VM.")
@click.option("--quiesce", is_flag=True, help="VMware Tools quiesce when no agent is used.")
@click.option("--attempts", default=3, show_default=True, type=click.IntRange(1, 10),
              help="Consistency attempts before the job fails (or falls back with 'try').")
@click.option("--freeze-limit", default=60.0, show_default=True, type=click.FloatRange(1, 60),
              help="Seconds the guest may stay frozen; the agent thaws by itself after it.")
@click.option("--snapshot-budget", default=10.0, show_default=True,
              type=click.FloatRange(0.5, 60),
              help="Seconds from 'frozen' to 'snapshot done' before the attempt is abandoned "
                   "(Linux guests; on Windows VSS enforces its own 10 s commit window).")
@click.option("--copy-only", is_flag=True, help="Truncate no logs (another tool owns them).")
@click.option("--cbt-verify-every", default=10, show_default=True, type=click.IntRange(0),
              help="Every Nth incremental re-reads a sample of the blocks CBT calls unchanged "
                   "and compares them with the previous restore point (0: never).")
@click.option("--cbt-verify-blocks", default=64, show_default=True, type=click.IntRange(1),
              help="How many blocks (1 MiB) per disk that check re-reads.")
@click.option("--thumbprint", help="Pin vCenter's certificate by SHA-256 thumbprint.")
@click.option("--verify-boot", is_flag=True,
              help="After each successful backup, boot its restore point in a sandbox and run "
                   "the applications' own checks (as 'stillpoint verify --boot').")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.pass_context
def backup_command(ctx: click.Context, targets: tuple[str, ...], full: bool, transport: str,
                   app_aware: str, quiesce: bool, attempts: int, freeze_limit: float,
                   snapshot_budget: float, copy_only: bool, cbt_verify_every: int,
                   cbt_verify_blocks: int,
                   thumbprint: str | None, verify_boot: bool, as_json: bool) -> None:
    from appliance.jobs import environment
    from appliance.jobs.backup import BackupOptions, run_backup
    from appliance.jobs.consistency import ConsistencyPolicy

    profile = _profile(ctx)
    progress = Progress("json" if as_json else "auto", stream=sys.stdout if as_json else None)
    opts = BackupOptions(targets=targets, full=full, transport=transport,
                         truncate_logs=not copy_only, cbt_verify_every=cbt_verify_every,
                         cbt_verify_blocks=cbt_verify_blocks,
                         policy=ConsistencyPolicy(app_aware=app_aware, quiesce=quiesce,
                                                  attempts=attempts,
                                                  freeze_limit_s=freeze_limit,
                                                  snapshot_budget_s=snapshot_budget))
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile, thumbprint)
    try:
        results = run_backup(opts, profile, session, repo, _reader(transport, session, profile),
                             progress)
        if verify_boot:
            _verify_each(ctx, results, repo, session, progress)
    finally:
        session.close()
    for r in results:
        if as_json:
            click.echo(json.dumps({"result": r.__dict__}, default=str))
        elif r.ok:
            click.echo(f"{r.vm}: OK restore point {r.restore_point} ({r.consistency}), "
                       f"read {human_bytes(r.bytes_read)}, stored {human_bytes(r.bytes_new)} "
                       f"new, {r.seconds:.1f} s"
                       + (f"; {len(r.warnings)} warning(s), above" if r.warnings else ""))
        else:
            click.echo(f"{r.vm}: FAILED: {r.error}", err=True)
    code = exit_code_of(results)
    if code:
        sys.exit(code)


def exit_code_of(results: list[Any]) -> int:
    """A failure's own code (the highest), else the warning tier when any VM was degraded."""
    failed = [r for r in results if not r.ok]
    if failed:
        return max(r.exit_code for r in failed) or 1
    return WARNING_EXIT_CODE if any(r.warnings for r in results) else 0


def _verify_each(ctx: click.Context, results: list[Any], repo: Any, session: Any,
                 progress: Progress) -> None:
    """The verification policy: a backup whose restore point does not boot is a failure."""
    from appliance.errors import GuestError
    from appliance.jobs.verify import VerifyOptions, run_verify

    for r in results:
        if not r.ok:
            continue
        report = run_verify(VerifyOptions(r.restore_point), lambda: _profile(ctx), repo,
                            session, progress)
        if not report["ok"]:
            failed = [n for n, c in report["checks"].items() if not c["ok"]]
            r.ok, r.exit_code = False, GuestError.exit_code
            r.error = (f"restore point {r.restore_point[:12]} did not verify: "
                       + ", ".join(failed))


@click.command("list", help="List restore points.")
@click.option("--vm", help="Only this VM (name, moref or uuid).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_command(ctx: click.Context, vm: str | None, as_json: bool) -> None:
    from appliance.jobs import environment

    from appliance.jobs.verify import last_verdict

    profile = _profile(ctx)
    repo = environment.open_repository(profile)
    points = repo.list_restore_points(vm=vm)
    summaries = []
    for p in points:
        verdict = last_verdict(profile, p.id)
        summaries.append(dict(_summary(p), verified=None if verdict is None
                              else ("pass" if verdict.get("ok") else "FAIL")))
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    labels = vm_labels([p.vm for p in points])
    width = max([16, *(len(label) + 2 for label in labels.values())])
    click.echo(f"{'ID':<14}{'VM':<{width}}{'TIME (UTC)':<22}{'CONSISTENCY':<13}{'SIZE':>11}"
               f"{'NEW DATA':>11}  VERIFIED")
    for p, s in zip(points, summaries):
        click.echo(f"{p.id[:12]:<14}{labels[p.vm.chain_key()]:<{width}}{s['time'][:19]:<22}"
                   f"{p.consistency:<13}{human_bytes(s['size']):>11}"
                   f"{human_bytes(s['new_bytes']):>11}  {s['verified'] or '-'}")


def vm_labels(vms: list[Any]) -> dict[str, str]:
    """chain key -> what `list` shows: the name, and where two different VMs share it, what
    tells them apart (the folder, else the moref, else the instance UUID)."""
    by_name: dict[str, dict[str, Any]] = {}
    for vm in vms:
        by_name.setdefault(vm.name, {})[vm.chain_key()] = vm
    labels = {}
    for name, chains in by_name.items():
        for key, vm in chains.items():
            if len(chains) == 1:
                labels[key] = name
                continue
            others = [o for k, o in chains.items() if k != key]
            if vm.folder and all(o.folder != vm.folder for o in others):
                labels[key] = f"{name} [{vm.folder}]"
            elif vm.moref and all(o.moref != vm.moref for o in others):
                labels[key] = f"{name} [{vm.moref}]"
            else:
                labels[key] = f"{name} [{(vm.instance_uuid or vm.uuid)[:8] or key}]"
    return labels


@click.command("show", help="Show a restore point: disks, changeIds, attempts, VM config.")
@click.argument("restore_point")
@click.pass_context
def show_command(ctx: click.Context, restore_point: str) -> None:
    from appliance.jobs import environment

    repo = environment.open_repository(_profile(ctx))
    p = repo.get(restore_point)
    doc = _summary(p)
    doc["reasons"] = p.reasons
    doc["disks"] = [{"key": d.key, "label": d.label, "capacity": d.capacity,
                     "change_id": d.change_id} for d in p.disks]
    doc["metadata"] = p.metadata
    click.echo(json.dumps(doc, indent=2, default=str))


@click.group("restore", help="Restore from a restore point.")
def restore_group() -> None:
    pass


@restore_group.command("disk", help="Write one disk of a restore point to a raw or VMDK file.")
@click.argument("restore_point")
@click.option("--disk", "disk_index", default=0, show_default=True,
              help="Disk index (0 = first) or device key (2000...).")
@click.option("--to", "target", required=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["raw", "vmdk"]), default="raw",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
def restore_disk_command(ctx: click.Context, restore_point: str, disk_index: int, target: str,
                         fmt: str, force: bool) -> None:
    from appliance.jobs import environment

    repo = environment.open_repository(_profile(ctx))
    p = repo.get(restore_point)
    disk = _pick_disk(p, disk_index)
    if Path(target).exists() and not force:
        raise UsageError(f"{target} exists: choose another path or pass --force")
    written = repo.restore_disk_to(p, disk.key, target, format=fmt)
    click.echo(f"restored {disk.label} ({human_bytes(disk.capacity)}) of {p.id[:12]} to "
               + ", ".join(str(w) for w in written))


@click.command("check", help="Check the repository's structure; --read-data re-hashes all data.")
@click.option("--read-data", is_flag=True)
@click.pass_context
def check_command(ctx: click.Context, read_data: bool) -> None:
    from appliance.jobs import environment

    repo = environment.open_repository(_profile(ctx))
    report = repo.check(read_data=read_data)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if not report.ok:
        damaged = sorted(report.damaged_restore_points)
        raise IntegrityError(f"check found {len(report.problems)} problem(s); damaged restore "
                             f"points: {', '.join(d[:12] for d in damaged) or 'none'}")
    click.echo("check: no problems found" + (" (all data re-read)" if read_data else ""))


@click.command("forget", help="Remove the named restore points, or those a retention policy "
               "(--keep-*) does not keep; then run prune. The retention lock still holds.")
@click.argument("restore_points", nargs=-1)
@click.option("--keep-last", default=0, type=click.IntRange(0))
@click.option("--keep-daily", default=0, type=click.IntRange(0))
@click.option("--keep-weekly", default=0, type=click.IntRange(0))
@click.option("--keep-monthly", default=0, type=click.IntRange(0))
@click.option("--vm")
@click.option("--dry-run", is_flag=True)
@click.pass_context
def forget_command(ctx: click.Context, restore_points: tuple[str, ...], keep_last: int,
                   keep_daily: int, keep_weekly: int, keep_monthly: int, vm: str | None,
                   dry_run: bool) -> None:
    from appliance.jobs import environment

    rules = any((keep_last, keep_daily, keep_weekly, keep_monthly))
    if restore_points and (rules or vm):
        raise UsageError("name restore points or give --keep-* rules, not both")
    if not restore_points and not rules:
        raise UsageError("name restore points or give at least one --keep-* option "
                         "(forget never removes everything)")
    repo = environment.open_repository(_profile(ctx))
    if restore_points:
        gone = repo.forget_points(list(restore_points), dry_run=dry_run)
    else:
        gone = repo.forget(keep_last=keep_last, keep_daily=keep_daily,
                           keep_weekly=keep_weekly, keep_monthly=keep_monthly, vm=vm,
                           dry_run=dry_run)
    for p in gone:
        click.echo(f"{'would forget' if dry_run else 'forgot'} {p.id[:12]} {p.vm.name} "
                   f"{p.time.isoformat()}")


@click.command("prune", help="Free the space of data no restore point uses.")
@click.pass_context
def prune_command(ctx: click.Context) -> None:
    from appliance.jobs import environment

    repo = environment.open_repository(_profile(ctx))
    report = repo.prune()
    click.echo(f"prune: {report.packs_deleted} pack(s) deleted, {report.packs_rewritten} "
               f"rewritten into {report.packs_written} new, {report.orphan_packs_deleted} "
               f"orphan pack(s) removed; {report.chunks_removed} chunk(s) removed, "
               f"{human_bytes(max(0, report.bytes_freed))} freed")


def _pick_disk(p: Any, index_or_key: int) -> Any:
    if 0 <= index_or_key < len(p.disks):
        return p.disks[index_or_key]
    for d in p.disks:
        if d.key == index_or_key:
            return d
    raise UsageError(f"restore point {p.id[:12]} has disks "
                     + ", ".join(f"{i} (key {d.key})" for i, d in enumerate(p.disks)))


def _summary(p: Any) -> dict[str, Any]:
    return {"id": p.id, "vm": p.vm.name, "moref": p.vm.moref, "folder": p.vm.folder,
            "instance_uuid": p.vm.instance_uuid, "vcenter": p.vm.vcenter,
            "time": p.time.isoformat(),
            "consistency": p.consistency, "size": sum(d.capacity for d in p.disks),
            "new_bytes": p.stats.bytes_written_new}


COMMANDS = [init_command, backup_command, list_command, show_command, restore_group,
            check_command, forget_command, prune_command]
