"""The consistency attempt: writers prepared and frozen, the snapshot cut, writers thawed.

One attempt, in order (DESIGN.md "The backup flow", steps 4-7):

    prepare -> freeze (agent watchdog: FREEZE_LIMIT) -> snapshot (budget: SNAPSHOT_BUDGET
    from "frozen") -> thaw -> writers' status

Any failed writer or a blown budget removes the snapshot and fails the attempt; the whole
attempt is retried (tenacity, exponential backoff). After the last try the job fails with
the writer's own message — or, by policy, falls back to a crash-consistent snapshot that is
recorded as such. Without an agent the snapshot is crash-consistent, or file-system
consistent when VMware Tools quiesces it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import tenacity

from appliance.checkpoints import reached

from appliance.errors import GuestError, StillpointError, VSphereError
from appliance.guest.client import AgentClient
from appliance.progress import Progress
from appliance.vsphere import snapshots
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.snapshots import SnapshotRef
from appliance.vsphere.tasks import TaskTimeout

log = logging.getLogger(__name__)

FREEZE_LIMIT_S = 60.0      # VSS's limit; the agent's watchdog thaws by itself at this point
SNAPSHOT_BUDGET_S = 10.0   # VSS's commit window, from "frozen" to "snapshot done"
# Windows: VMware Tools drives VSS inside CreateSnapshotEx_Task, so the task's time includes
# the writers' preparation (a SQL Server checkpoint, Exchange's): it gets a total of its own.
# VSS enforces its own 10 s flush-and-hold window and 60 s writer freeze inside the guest
# (a miss is a failed writer, seen by the agent's re-check after the snapshot, and retried).
VSS_TASK_TIMEOUT_S = 900.0
ABANDONED_SNAPSHOT_WAIT_S = 60.0   # for an abandoned snapshot task to end (then left)


@dataclass(frozen=True)
class ConsistencyPolicy:
    app_aware: str = "auto"          # "require" | "try" | "off" | "auto" (= require with a guest)
    quiesce: bool = False            # VMware Tools quiesce when no agent drives consistency
    attempts: int = 3
    backoff_s: float = 2.0
    freeze_limit_s: float = FREEZE_LIMIT_S
    snapshot_budget_s: float = SNAPSHOT_BUDGET_S
    vss_task_timeout_s: float = VSS_TASK_TIMEOUT_S
    agent_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttemptRecord:
    number: int
    ok: bool
    error: str | None = None
    writer: str | None = None
    durations_ms: dict[str, int] = field(default_factory=dict)


@dataclass
class ConsistentSnapshot:
    snapshot: SnapshotRef
    consistency: str                  # "application" | "filesystem" | "crash"
    reasons: list[str]
    attempts: list[AttemptRecord]
    writer_results: dict[str, Any]    # per writer, what the restore needs (backup_label...)
    writer_status: dict[str, Any]
    windows_vss: bool = False         # VMware Tools drove VSS (a Windows guest)
    # Wall-clock bounds of the point in time: CreateSnapshot asked .. done (Unix seconds).
    # Whatever the guest acknowledged before `requested` is in the image.
    window: tuple[float, float] = (0.0, 0.0)
    # The agent's attempt made this snapshot (it froze and thawed): only then is it told of
    # the backup's outcome, and may truncate logs. False for a crash fallback under "try".
    by_agent: bool = False


class AttemptFailed(GuestError):
    """A consistency attempt failed (a writer, the freeze deadline or the snapshot budget)."""

    def __init__(self, message: str, writer: str | None = None) -> None:
        super().__init__(message)
        self.writer = writer


def take_snapshot(session: VSphereSession, vm: Any, name: str, agent: AgentClient | None,
                  policy: ConsistencyPolicy, progress: Progress) -> ConsistentSnapshot:
    """Cut the snapshot as consistently as the policy and the guest allow."""
    if agent is None:
        return _plain_snapshot(session, vm, name, policy, [], [])
    attempts: list[AttemptRecord] = []
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, policy.attempts)),
        wait=tenacity.wait_exponential(multiplier=policy.backoff_s, max=60),
        retry=tenacity.retry_if_exception_type(AttemptFailed),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                progress.event(f"consistency attempt {number}/{policy.attempts}: "
                               "prepare, freeze, snapshot, thaw")
                return _agent_attempt(session, vm, name, agent, policy, number, attempts)
    except AttemptFailed as err:
        if policy.app_aware != "try":
            raise AttemptFailed(
                f"application-consistent snapshot failed after {len(attempts)} attempts: {err}",
                err.writer) from err
        progress.event(f"application consistency failed ({err}); falling back to a "
                       "crash-consistent snapshot as the policy allows")
        return _plain_snapshot(session, vm, name, policy, attempts,
                               [f"fell back after {len(attempts)} failed attempts: {err}"])
    raise AssertionError("unreachable: tenacity either returns or raises")


def _agent_attempt(session: VSphereSession, vm: Any, name: str, agent: AgentClient,
                   policy: ConsistencyPolicy, number: int,
                   attempts: list[AttemptRecord]) -> ConsistentSnapshot:
    record = AttemptRecord(number, ok=False)
    attempts.append(record)
    try:
        agent.prepare(policy.agent_config or None)
        frozen = agent.freeze(timeout_s=policy.freeze_limit_s)
    except GuestError as err:
        _fail(record, err)
    # On Windows the agent only checks the writers: VSS, driven by VMware Tools, freezes.
    windows_vss = (frozen.get("quiesce") or {}).get("by") == "vmware-tools-vss"
    # The budget counts from the freeze itself: the agent says how long its first writer
    # had been holding when it answered (the reply's transit is counted against us too).
    frozen_at = time.monotonic() - float(frozen.get("held_ms") or 0) / 1000
    reached("frozen")
    snap: SnapshotRef | None = None
    snapshot_error: StillpointError | None = None
    requested = time.time()
    try:
        left = policy.snapshot_budget_s - (time.monotonic() - frozen_at)
        if windows_vss:     # not our budget to apply: see VSS_TASK_TIMEOUT_S
            snap = snapshots.create_snapshot(session, vm, name, "Stillpoint backup",
                                             quiesce=True, memory=False,
                                             timeout=policy.vss_task_timeout_s,
                                             windows_vss=True)
        elif left <= 0:
            snapshot_error = AttemptFailed(
                f"not asked for: the freeze's reply came after the whole "
                f"{policy.snapshot_budget_s:g} s snapshot budget")
        else:
            snap = snapshots.create_snapshot(session, vm, name, "Stillpoint backup",
                                             memory=False, timeout=left)
    except TaskTimeout as err:
        snapshot_error = err
    except VSphereError as err:
        snapshot_error = err
    finally:
        snapshot_ms = int((time.monotonic() - frozen_at) * 1000)
        created = time.time()
        thaw_error: GuestError | None = None
        try:
            status = agent.thaw()
        except GuestError as err:
            thaw_error, status = err, {}
    record.durations_ms = dict(status.get("durations", {}), snapshot_ms=snapshot_ms)
    if thaw_error is not None and snap is None and not isinstance(snapshot_error, TaskTimeout):
        _fail(record, thaw_error)   # the agent's failure (it died, say) says more than ours
    if isinstance(snapshot_error, TaskTimeout):
        budget = (f"the VMware Tools quiesced snapshot was not done within "
                  f"{policy.vss_task_timeout_s:g} s" if windows_vss else
                  f"the snapshot was not done within {policy.snapshot_budget_s:g} s of the "
                  "freeze")
        try:
            snapshots.remove_abandoned_snapshot(session, vm, snapshot_error.task_id,
                                                ABANDONED_SNAPSHOT_WAIT_S)
        except TaskTimeout as err:
            # A task that never ends must not hold the job: leave it; whatever snapshot
            # it makes is a stale stillpoint-* snapshot that the next run removes.
            log.warning("abandoned snapshot task still running: %s", err)
            _fail(record, AttemptFailed(
                f"{budget}; abandoned (thawed); its task was still running in vCenter "
                f"{ABANDONED_SNAPSHOT_WAIT_S:g} s later: the next run removes the snapshot "
                "it leaves"))
        _fail(record, AttemptFailed(f"{budget}; abandoned (thawed, snapshot removed)"))
    if snapshot_error is not None:
        _fail(record, AttemptFailed(f"snapshot failed while frozen: {snapshot_error}"))
    assert snap is not None
    if thaw_error is not None:
        _remove_quietly(session, snap)
        _fail(record, thaw_error)
    record.ok = True
    consistency, reasons = _windows_level(status) if windows_vss else _level(status)
    return ConsistentSnapshot(snap, consistency, reasons, attempts,
                              writer_results=dict(status.get("results") or {}),
                              writer_status=dict(status.get("writers") or {}),
                              windows_vss=windows_vss, window=(requested, created),
                              by_agent=True)


def _plain_snapshot(session: VSphereSession, vm: Any, name: str, policy: ConsistencyPolicy,
                    attempts: list[AttemptRecord], reasons: list[str]) -> ConsistentSnapshot:
    """Without our agent: crash-consistent, or VMware Tools-quiesced (file system)."""
    started, requested = time.monotonic(), time.time()
    snap = snapshots.create_snapshot(session, vm, name, "Stillpoint backup",
                                     quiesce=policy.quiesce, memory=False)
    window = (requested, time.time())
    attempts.append(AttemptRecord(len(attempts) + 1, ok=True, durations_ms={
        "snapshot_ms": int((time.monotonic() - started) * 1000)}))
    if policy.quiesce:
        level, why = "filesystem", "quiesced by VMware Tools, no application writers"
    else:
        level, why = "crash", "no guest agent: the snapshot is crash-consistent"
    return ConsistentSnapshot(snap, level, [*reasons, why], attempts, {}, {}, window=window)


def _level(status: dict[str, Any]) -> tuple[str, list[str]]:
    """application: every writer done; filesystem: only file systems were frozen."""
    writers = status.get("writers") or {}
    reasons: list[str] = []
    kinds = {str((status.get("results") or {}).get(n, {}).get("kind", n)) for n in writers}
    apps = {k for k in kinds if k not in ("filesystem", "hooks")}
    if not writers:
        return "crash", [*reasons, "the agent found no writer to freeze"]
    if apps:
        return "application", [*reasons, "writers: " + ", ".join(sorted(writers))]
    return "filesystem", [*reasons, "no application writer found; file systems frozen"]


def _windows_level(status: dict[str, Any]) -> tuple[str, list[str]]:
    """VSS quiesced every writer (the agent re-checked them after the snapshot)."""
    apps = sorted((status.get("results") or {}).keys())
    return "application", ["VMware Tools VSS snapshot (copy), all VSS writers stable before "
                           "and after it" + (": " + ", ".join(apps) if apps else "")]


def _fail(record: AttemptRecord, err: GuestError) -> None:
    record.error = str(err)
    record.writer = getattr(err, "writer", None)
    log.warning("consistency attempt %d failed: %s", record.number, err)
    if isinstance(err, AttemptFailed):
        raise err
    raise AttemptFailed(str(err), record.writer) from err


def _remove_quietly(session: VSphereSession, snap: SnapshotRef) -> None:
    try:
        snapshots.remove_snapshot(session, snap)
    except StillpointError as err:
        log.error("removing snapshot %s after a failed attempt failed: %s", snap.name, err)
