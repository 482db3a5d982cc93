"""One backup job, top to bottom (DESIGN.md "The backup flow").

For each VM:
    find it; remove stale stillpoint-* snapshots; make sure CBT is on
    deploy the agent (if the VM has guest access and the policy wants it)
      gather writer metadata
      consistency attempts: prepare -> freeze -> snapshot -> thaw  (retried)
      copy the disks (changed areas) into a restore point; commit it    <- last write
      remove the snapshot                                               <- always
      backup-complete(success) -> the applications truncate their logs
    remove the agent from the live guest                                <- always
    post the outcome as an event on the VM
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from appliance.checkpoints import reached
from appliance.errors import StillpointError, UsageError
from appliance.guest.deploy import DEFAULT_INSTALL_DIR, deploy_agent
from appliance.guest.session import DeployedAgent
from appliance.jobs import cbt_verify, consistency, copy, environment
from appliance.jobs.point_metadata import PointMetadata
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.jobs.vmlock import vm_job_lock
from appliance.profile import Profile
from appliance.progress import Progress
from appliance.repository import Repository, RestorePoint
from appliance.transport.base import DiskReader
from appliance.vsphere import cbt, events, inventory, snapshots
from appliance.vsphere.session import VSphereSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupOptions:
    targets: tuple[str, ...]
    full: bool = False
    transport: str = "datastore-http"      # or "nbd"
    policy: ConsistencyPolicy = field(default_factory=ConsistencyPolicy)
    truncate_logs: bool = True             # False: copy-only, another tool owns the log chain
    job_id: str = ""
    cbt_verify_every: int = 10             # every Nth incremental re-reads unchanged blocks
    cbt_verify_blocks: int = 64            # how many (1 MiB blocks, random) per disk


@dataclass
class VMResult:
    vm: str
    ok: bool
    restore_point: str | None = None
    consistency: str | None = None
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_new: int = 0
    disks: list[dict[str, Any]] = field(default_factory=list)
    truncation: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)   # the run succeeded, but look here
    cbt_wrong: list[str] = field(default_factory=list)  # disks whose CBT missed writes


def new_job_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def run_backup(opts: BackupOptions, profile: Profile, session: VSphereSession,
               repo: Repository, reader: DiskReader, progress: Progress) -> list[VMResult]:
    """Back up every VM the targets name; one VM's failure does not stop the others."""
    if not opts.targets:
        raise UsageError("name at least one VM (name, inventory path, moref, or folder)")
    job_id = opts.job_id or new_job_id()
    vms = inventory.resolve_targets(session, opts.targets)
    results = []
    for vm in vms:
        results.append(backup_vm(vm, opts, job_id, profile, session, repo, reader, progress))
    return results


def backup_vm(vm: Any, opts: BackupOptions, job_id: str, profile: Profile,
              session: VSphereSession, repo: Repository, reader: DiskReader,
              progress: Progress) -> VMResult:
    started = time.monotonic()
    info = inventory.vm_info(session, vm)
    result = VMResult(vm=info.name, ok=False)
    progress.event(f"{info.name}: backup job {job_id} starting", vm=info.name, job=job_id)
    try:
        # One job per VM: a second one would remove this one's snapshot as "stale".
        # Keyed by vCenter and VM: two vCenters may well have a vm-42 (or equal uuids).
        with vm_job_lock(f"{session.host}_{session.port}_{info.instance_uuid or info.moref}",
                         info.name):
            _backup_vm(vm, info, opts, job_id, profile, session, repo, reader, progress,
                       result)
        result.ok = True
    except StillpointError as err:
        result.error, result.exit_code = str(err), err.exit_code
        # The reason is in the event's fields and, once, in the command's result line.
        progress.event(f"{info.name}: backup failed", vm=info.name, error=str(err))
    result.seconds = round(time.monotonic() - started, 3)
    _post_outcome(session, vm, job_id, result)
    return result


def _backup_vm(vm: Any, info: inventory.VMInfo, opts: BackupOptions, job_id: str,
               profile: Profile, session: VSphereSession, repo: Repository,
               reader: DiskReader, progress: Progress, result: VMResult) -> None:
    _refuse_unreadable_datastores(session, info, opts.transport)
    _remove_stale_snapshots(session, vm, info.name, progress)
    if cbt.enable_cbt(session, vm):
        progress.event(f"{info.name}: Changed Block Tracking enabled")
    base = _latest_restore_point(repo, info, session.instance_uuid)
    policy = _effective_policy(opts.policy, profile, info.name)
    with _agent_for(profile, info.name, policy, progress) as agent:
        writer_metadata = agent.client.gather_metadata() if agent else None
        taken = consistency.take_snapshot(session, vm, f"stillpoint-{job_id}",
                                          agent.client if agent else None, policy, progress)
        progress.event(f"{info.name}: snapshot {taken.snapshot.name} taken "
                       f"({taken.consistency}-consistent)")
        if agent and not taken.by_agent:      # app_aware=try fell back
            _warn(progress, info.name, result,
                  f"this restore point is {taken.consistency}-consistent, not "
                  f"application-consistent: {taken.reasons[0]}")
        reached("snapshot-taken")
        try:
            point = _copy_and_commit(vm, info, taken, base, opts, job_id, writer_metadata,
                                     session, repo, reader, progress, result)
        except BaseException:
            try:
                if agent and taken.by_agent:
                    _tell_agent(agent, success=False, restore_point=None, truncate=False)
            finally:
                snapshots.remove_snapshot(session, taken.snapshot)
                progress.event(f"{info.name}: snapshot {taken.snapshot.name} removed")
            raise
        _remove_after_commit(session, info.name, taken.snapshot, progress, result)
        reached("snapshot-removed")
        if result.cbt_wrong:
            _reset_wrong_cbt(session, vm, info.name, progress, result)
        if agent and taken.by_agent:      # a crash fallback: the agent has nothing to finish
            result.truncation = _tell_agent(agent, success=True, restore_point=point.id,
                                            truncate=opts.truncate_logs,
                                            targets=_windows_targets(taken, opts, progress,
                                                                     info.name, result))
            reached("truncated")
    result.restore_point, result.consistency = point.id, point.consistency
    progress.event(f"{info.name}: restore point {point.id[:12]} committed "
                   f"({point.consistency}-consistent, {result.bytes_read} bytes read, "
                   f"{result.bytes_new} new bytes stored)")


def _distrust_cbt(session: VSphereSession, vm: Any, info: inventory.VMInfo,
                  taken: consistency.ConsistentSnapshot, disk: Any, base: RestorePoint,
                  opts: BackupOptions, reader: DiskReader, repo: Repository,
                  areas: list[tuple[int, int]], progress: Progress, result: VMResult,
                  checks: dict[str, Any], planned: tuple[str, str],
                  ) -> tuple[str, str, list[tuple[int, int]]]:
    """Re-read a sample of what CBT calls unchanged (jobs/cbt_verify.py); a mismatch makes
    this disk a full in this very backup, and CBT is reset after the snapshot is gone."""
    base_disk = base.disk(disk.key)
    check = cbt_verify.verify_disk(reader, disk, base_disk.block_size,
                                   repo.block_reader(base, disk.key), areas,
                                   opts.cbt_verify_blocks)
    checks[str(disk.key)] = asdict(check)
    progress.event(f"{info.name}: {disk.label}: {check.describe()}")
    if check.ok:
        return planned[0], planned[1], areas
    message = (f"Stillpoint: Changed Block Tracking of {info.name} {disk.label} missed writes: "
               f"{check.describe()}; the disk is copied in full and CBT is reset")
    try:
        events.post_vm_event(session, vm, message, "error")
    except StillpointError as err:
        log.warning("could not post the CBT event on %s: %s", info.name, err)
    result.cbt_wrong.append(disk.label)
    _warn(progress, info.name, result, message)
    return "full", check.describe(), cbt.changed_areas(session, vm, taken.snapshot, disk.key,
                                                       disk.capacity, "*")


def _reset_wrong_cbt(session: VSphereSession, vm: Any, name: str, progress: Progress,
                     result: VMResult) -> None:
    try:
        cbt.reset_cbt(session, vm)
        progress.event(f"{name}: CBT reset (it was wrong for {', '.join(result.cbt_wrong)}); "
                       "the next backup of every disk is a full")
    except StillpointError as err:
        _warn(progress, name, result, f"resetting CBT failed: {err}; the next backup must "
              "be a full (--full) until it is reset")


def _remove_after_commit(session: VSphereSession, name: str, snapshot: Any,
                         progress: Progress, result: VMResult) -> None:
    """Remove the snapshot of a committed restore point. Its failure (a consolidation that
    could not write the base disk, say) is a warning, not a failed backup: the restore point
    is complete, and the next run removes a snapshot left behind or consolidates first."""
    try:
        snapshots.remove_snapshot(session, snapshot)
    except StillpointError as err:      # a failed task, a timeout, a lost session
        _warn(progress, name, result,
              f"removing snapshot {snapshot.name} failed after the restore point was "
              f"committed: {err}; the next run removes or consolidates it first")
        return
    progress.event(f"{name}: snapshot {snapshot.name} removed")


def _copy_and_commit(vm: Any, info: inventory.VMInfo, taken: consistency.ConsistentSnapshot,
                     base: RestorePoint | None, opts: BackupOptions, job_id: str,
                     writer_metadata: dict[str, Any] | None, session: VSphereSession,
                     repo: Repository, reader: DiskReader, progress: Progress,
                     result: VMResult) -> RestorePoint:
    disks = snapshots.snapshot_disks(session, taken.snapshot)
    with repo.writer(info.name, moref=info.moref, uuid=info.uuid,
                     instance_uuid=info.instance_uuid, vcenter=session.instance_uuid,
                     folder=inventory.folder_path(session, vm)) as rp:
        verify = base is not None and cbt_verify.due(base.metadata, opts.cbt_verify_every)
        checks: dict[str, Any] = {}
        for disk in disks:
            mode, why, areas = copy.plan_areas(session, vm, taken.snapshot, disk, base,
                                               opts.full)
            if verify and mode == "incremental":
                assert base is not None
                mode, why, areas = _distrust_cbt(session, vm, info, taken, disk, base, opts,
                                                 reader, repo, areas, progress, result,
                                                 checks, (mode, why))
            progress.event(f"{info.name}: {disk.label}: {mode} ({why})")
            done = copy.copy_disk(reader, rp, disk, mode, why, areas, base, progress)
            result.disks.append(asdict(done))
            result.bytes_read += done.bytes_read
        all_full = all(d["mode"] == "full" for d in result.disks)
        reached("disks-copied")
        point = rp.commit(
            consistency=taken.consistency, reasons=taken.reasons,
            metadata=PointMetadata(
                job_id=job_id,
                vm_config=info.config,
                guest_id=info.guest_id,
                writer_metadata=writer_metadata,
                writer_results=taken.writer_results,
                writer_status=taken.writer_status,
                attempts=[asdict(a) for a in taken.attempts],
                disks=result.disks,
                transport=opts.transport,
                snapshot_window=_window(taken.window),
                cbt_verification=checks,
                cbt_check=cbt_verify.next_count(base.metadata if base else None,
                                                verify or all_full),
            ).to_dict())
    reached("committed")
    result.bytes_new = point.stats.bytes_written_new
    return point


def _window(window: tuple[float, float]) -> dict[str, Any]:
    """When the point in time was cut (UTC ISO 8601), and how long the snapshot ran before
    the disks were copied out of it (production runs on the snapshot all along)."""
    requested, created = window
    return {"requested": _iso(requested), "created": _iso(created),
            "create_s": round(created - requested, 3),
            "open_s": round(time.time() - created, 3)}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class _NoAgent:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _agent_for(profile: Profile, vm_name: str, policy: ConsistencyPolicy,
               progress: Progress) -> Any:
    """The deployed agent as a context manager that always removes it; or no agent."""
    if policy.app_aware == "off":
        return _NoAgent()
    access = environment.guest_access(profile, vm_name)
    if access is None:
        if policy.app_aware == "require":
            raise UsageError(f"{vm_name}: application-aware backup required but the profile "
                             "has no guest access for this VM")
        return _NoAgent()
    channel = environment.open_guest_channel(access)
    progress.event(f"{vm_name}: deploying the agent to {access.host} over {access.transport}")
    agent: DeployedAgent
    try:
        if access.transport == "winrm":
            from appliance.guest import winrm_deploy

            agent = winrm_deploy.deploy_windows_agent(
                channel,  # type: ignore[arg-type]
                access.install_dir or winrm_deploy.DEFAULT_INSTALL_DIR,
                config=policy.agent_config)
        else:
            agent = deploy_agent(channel, access.install_dir or DEFAULT_INSTALL_DIR,
                                 config=policy.agent_config)
    except BaseException:
        channel.close()
        raise
    return _ChannelClosing(agent, channel)


class _ChannelClosing:
    """Leaving removes the agent from the live guest, then closes the channel."""

    def __init__(self, agent: DeployedAgent, channel: Any) -> None:
        self.agent, self.channel = agent, channel

    def __enter__(self) -> DeployedAgent:
        return self.agent

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.agent.__exit__(exc_type, exc, tb)
        finally:
            self.channel.close()


def _effective_policy(policy: ConsistencyPolicy, profile: Profile,
                      vm_name: str) -> ConsistencyPolicy:
    access = environment.guest_access(profile, vm_name)
    app_aware = policy.app_aware
    if app_aware == "auto":
        app_aware = "require" if access is not None else "off"
    agent_config = dict(access.agent) if access is not None else {}
    agent_config.update(policy.agent_config)
    agent_config.setdefault("freeze_timeout_s", policy.freeze_limit_s)
    return ConsistencyPolicy(app_aware=app_aware, quiesce=policy.quiesce,
                             attempts=policy.attempts, backoff_s=policy.backoff_s,
                             freeze_limit_s=policy.freeze_limit_s,
                             snapshot_budget_s=policy.snapshot_budget_s,
                             agent_config=agent_config)


def _tell_agent(agent: DeployedAgent, *, success: bool, restore_point: str | None,
                truncate: bool, targets: dict[str, Any] | None = None) -> dict[str, Any] | None:
    try:
        if targets is not None:   # Windows: the appliance decides what may be truncated
            return agent.client.request("backup-complete", {
                "success": success, "restore_point": restore_point, "truncate": truncate,
                "targets": targets})
        return agent.client.backup_complete(success, restore_point, truncate)
    except StillpointError as err:
        if success:
            raise
        log.warning("telling the agent the backup failed also failed: %s", err)
        return None


def _warn(progress: Progress, name: str, result: VMResult, warning: str) -> None:
    """The run succeeded, degraded: said now, kept in the result (the CLI's warning exit
    code, serve's history, the vCenter event)."""
    result.warnings.append(warning)
    progress.event(f"{name}: WARNING: {warning}", vm=name, warning=warning)


def _windows_targets(taken: consistency.ConsistentSnapshot, opts: BackupOptions,
                     progress: Progress, name: str,
                     result: VMResult) -> dict[str, Any] | None:
    """For a VSS snapshot: which SQL Server / Exchange logs may be truncated (msdb decides
    whether another tool owns a log chain); None for Linux guests."""
    if not taken.windows_vss:
        return None
    from appliance.guest.winrm_vss import TruncationPolicy, truncation_plan

    policy = TruncationPolicy(sql=opts.truncate_logs)
    plan = truncation_plan(taken.writer_results, policy)
    for reason in plan.skipped:
        log.info("log truncation skipped: %s", reason)
    for reason in plan.failed:
        _warn(progress, name, result, f"log truncation skipped: {reason}")
    return plan.targets()


def _refuse_unreadable_datastores(session: VSphereSession, info: inventory.VMInfo,
                                  transport: str) -> None:
    """datastore-http reads the disks' flat files, which vSAN and vVols do not have: said
    before anything is frozen or snapshotted."""
    if transport != "datastore-http":
        return
    kinds = inventory.datastore_types(session)
    for disk in info.disks:
        kind = kinds.get(disk.datastore, "")
        if kind in inventory.OBJECT_DATASTORE_TYPES:
            raise UsageError(f"{info.name}: {disk.label} is on datastore {disk.datastore} "
                             f"({kind}), which has no flat files for the "
                             "datastore-http transport to read: back it up with --transport nbd")


def _remove_stale_snapshots(session: VSphereSession, vm: Any, name: str,
                            progress: Progress) -> None:
    for stale in snapshots.find_snapshots(session, vm):
        progress.event(f"{name}: removing stale snapshot {stale.name} left by an earlier run")
        snapshots.remove_snapshot(session, stale)
    if snapshots.consolidate_if_needed(session, vm):
        progress.event(f"{name}: disks consolidated")


def _latest_restore_point(repo: Repository, info: inventory.VMInfo,
                          vcenter: str) -> RestorePoint | None:
    """The base of the next incremental: this VM's own newest point (a clone shares the BIOS
    UUID, a namesake the name; neither is this VM)."""
    points = [p for p in repo.list_restore_points()
              if p.vm.is_vm(vcenter, info.instance_uuid, info.moref)]
    return points[-1] if points else None


def _post_outcome(session: VSphereSession, vm: Any, job_id: str, result: VMResult) -> None:
    if result.ok and result.warnings:
        message = (f"Stillpoint backup {job_id} succeeded with {len(result.warnings)} "
                   f"warning(s): restore point {(result.restore_point or '')[:12]}, "
                   f"{result.consistency}-consistent; " + "; ".join(result.warnings))
        level = "warning"
    elif result.ok:
        message = (f"Stillpoint backup {job_id} succeeded: restore point "
                   f"{(result.restore_point or '')[:12]}, {result.consistency}-consistent")
        level = "info"
    else:
        message = f"Stillpoint backup {job_id} failed: {result.error}"
        level = "error"
    try:
        events.post_vm_event(session, vm, message, level)  # type: ignore[arg-type]
    except StillpointError as err:
        log.warning("could not post the outcome event on %s: %s", result.vm, err)
