"""One firing of one job, as `serve` runs it: its VMs in parallel within the limits, each
VM's outcome in the job history, then retention (forget + prune) per the job's policy.

Each VM worker has its own vCenter session and its own Repository object (pyVmomi stubs and
the repository's caches are not shared between threads); writers into the same repository
take turns through the process-wide gate (serve_limits.GatedRepository).

On stop (SIGTERM) no further VM is started; a VM backup already running goes on to its end,
which is a safe point by construction of jobs/backup.py (the snapshot is removed in a
`finally`, the agent thaws and is removed, the restore point is committed last or not at
all). The VMs that were not started are recorded as skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from appliance.errors import StillpointError
from appliance.jobs import environment
from appliance.jobs.backup import BackupOptions, VMResult, backup_vm
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.jobs.history import History, VMRecord, now_iso
from appliance.jobs.schedule import JobDefinition, resolve_vms
from appliance.jobs.serve_limits import GatedRepository, Limits, repository_gate
from appliance.profile import Profile
from appliance.progress import Progress
from appliance.repository import LocalBackend, Repository
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.vsphere.props import retrieve

log = logging.getLogger(__name__)
_UNLOCK = threading.Lock()


@dataclass
class RunContext:
    """What every job run of the service shares."""

    profile: Profile
    history: History
    limits: Limits
    stop: threading.Event
    progress: Progress


@dataclass(frozen=True)
class _Placement:
    moref: str
    name: str
    host: str
    datastores: tuple[str, ...]


def run_firing(ctx: RunContext, defn: JobDefinition, run_id: int, job_id: str) -> str:
    """Run the job; record everything in the history; return the run's final status."""
    try:
        placements = _placements(ctx.profile, defn)
    except StillpointError as err:
        ctx.progress.event(f"job {defn.name}: cannot list its VMs: {err}", job=defn.name)
        ctx.history.finish(run_id, "failed", f"cannot list the job's VMs: {err}")
        return "failed"
    ctx.progress.event(f"job {defn.name} ({job_id}): {len(placements)} VM(s): "
                       + ", ".join(p.name for p in placements), job=defn.name)
    try:
        # Unlocked (passphrase -> key) once per run: the KDF is deliberately slow, and two
        # Argon2id derivations at once in one process hang (cryptography 4x/OpenSSL 3), so
        # jobs starting together take turns.
        with _UNLOCK:
            base_repo = environment.open_repository(ctx.profile, create=True)
    except StillpointError as err:
        ctx.progress.event(f"job {defn.name}: cannot open the repository: {err}", job=defn.name)
        ctx.history.finish(run_id, "failed", f"cannot open the repository: {err}")
        return "failed"
    work: queue.Queue[_Placement] = queue.Queue()
    for p in placements:
        work.put(p)
    outcomes: list[tuple[str, str]] = []  # (VM name, outcome)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                p = work.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = _one_vm(ctx, defn, p, run_id, job_id, base_repo)
            except Exception as err:  # a bug below must not lose the VM's record
                log.exception("backup of %s crashed", p.name)
                ctx.history.add_vm(run_id, VMRecord(p.name, "failed", now_iso(), now_iso(), 0.0,
                                                    error=f"internal error: {err!r}"))
                outcome = (p.name, "failed")
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, name=f"job-{defn.name}-{i}", daemon=True)
               for i in range(min(len(placements), ctx.limits.settings.max_vms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    done = sorted(name for name, o in outcomes if o in ("ok", "warning"))
    kinds = {o for _name, o in outcomes}
    retention = _retention(ctx, defn, done, base_repo) if done else None
    if ctx.stop.is_set() and "skipped" in kinds:
        status, message = "interrupted", "the service stopped; VMs not started were skipped"
    elif kinds == {"ok"}:
        status, message = "ok", ""
    elif kinds == {"ok", "warning"} or kinds == {"warning"}:
        status, message = "warning", "backed up, with warnings (see the VMs)"
    elif done:
        status, message = "partial", "some VMs failed"
    else:
        status, message = "failed", "no VM was backed up" if outcomes else "the job has no VMs"
    ctx.history.finish(run_id, status, message, retention)
    ctx.progress.event(f"job {defn.name} ({job_id}): {status}", job=defn.name, status=status)
    return status


def _placements(profile: Profile, defn: JobDefinition) -> list[_Placement]:
    session = environment.open_vcenter(profile)
    try:
        vms = resolve_vms(session, defn)
        props = retrieve(session, vms, ["name", "runtime.host", "datastore"])
    finally:
        session.close()
    out = []
    for vm in vms:
        p = props.get(vm._moId, {})
        host = p.get("runtime.host")
        out.append(_Placement(vm._moId, p.get("name", vm._moId),
                              host._moId if host is not None else "",
                              tuple(sorted(d._moId for d in p.get("datastore", [])))))
    return out


def _one_vm(ctx: RunContext, defn: JobDefinition, p: _Placement, run_id: int,
            job_id: str, base_repo: Repository) -> tuple[str, str]:
    started = now_iso()
    with ctx.limits.slot(p.host, p.datastores, ctx.stop) as got:
        if not got:
            ctx.history.add_vm(run_id, VMRecord(p.name, "skipped", started, now_iso(), 0.0,
                                                error="the service stopped before this VM"))
            return p.name, "skipped"
        started = now_iso()
        result = _backup(ctx, defn, p, job_id, base_repo)
    outcome = "failed" if not result.ok else "warning" if result.warnings else "ok"
    ctx.history.add_vm(run_id, VMRecord(
        vm=result.vm or p.name, outcome=outcome, started=started,
        finished=now_iso(), seconds=result.seconds, bytes_read=result.bytes_read,
        bytes_new=result.bytes_new, consistency=result.consistency,
        restore_point=result.restore_point,
        error=result.error or ("; ".join(result.warnings) or None)))
    return result.vm or p.name, outcome


def _backup(ctx: RunContext, defn: JobDefinition, p: _Placement, job_id: str,
            base_repo: Repository) -> VMResult:
    opts = BackupOptions(targets=(p.moref,), job_id=job_id,
                         truncate_logs=not defn.copy_only,
                         policy=ConsistencyPolicy(app_aware=defn.app_aware))
    try:
        repo = _repository(ctx.profile, base_repo)
        session = environment.open_vcenter(ctx.profile)
    except StillpointError as err:
        return VMResult(vm=p.name, ok=False, error=str(err), exit_code=err.exit_code)
    try:
        reader = DatastoreHTTPReader(session)
        vm = vim.VirtualMachine(p.moref, session.si._stub)
        return backup_vm(vm, opts, job_id, ctx.profile, session, repo, reader, ctx.progress)
    except StillpointError as err:  # backup_vm catches its own; this is vm_info etc.
        return VMResult(vm=p.name, ok=False, error=str(err), exit_code=err.exit_code)
    finally:
        session.close()


def _repository(profile: Profile, base: Repository) -> Any:
    """This thread's own Repository object (own chunk store cache), sharing the unlocked
    keys, behind the process-wide writer gate."""
    backend = LocalBackend(profile.repository_path())
    backend.open()
    repo = Repository(backend, base.config, base.keys)
    return GatedRepository(repo, repository_gate(profile.repository_path()))


def _retention(ctx: RunContext, defn: JobDefinition, vms: list[str],
               repo: Repository) -> dict[str, Any] | None:
    """forget per the job's keep policy for the VMs backed up now, then prune; under the
    gate (forget and prune take the repository's exclusive lock)."""
    policy = defn.keep_policy
    if not policy:
        return None
    done: dict[str, Any] = {"policy": policy, "forgot": [], "prune": None}
    try:
        with repository_gate(ctx.profile.repository_path()):
            for vm in vms:
                gone = repo.forget(vm=vm, keep_last=defn.keep.get("last", 0),
                                   keep_daily=defn.keep.get("daily", 0),
                                   keep_weekly=defn.keep.get("weekly", 0),
                                   keep_monthly=defn.keep.get("monthly", 0))
                done["forgot"].extend(rp.id for rp in gone)
            if done["forgot"]:
                done["prune"] = str(repo.prune())
    except StillpointError as err:
        done["error"] = str(err)
        ctx.progress.event(f"job {defn.name}: retention failed: {err}", job=defn.name)
        return done
    ctx.progress.event(f"job {defn.name}: retention forgot {len(done['forgot'])} restore "
                       f"point(s)" + (f"; prune: {done['prune']}" if done["prune"] else ""),
                       job=defn.name)
    return done
