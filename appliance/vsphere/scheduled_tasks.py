"""vCenter scheduled tasks: the clock that triggers Stillpoint jobs.

A Stillpoint job is a vCenter ScheduledTask on the VM or folder it protects (jobs/schedule.py
decides what its name and description hold). This module only speaks vSphere:

    Schedule            -- hourly / daily / weekly / once, as vim.scheduler.*TaskScheduler
    harmless_action()   -- the MethodAction the task runs when it fires (changes nothing)
    create_task / reconfigure_task / remove_task / run_task / list_tasks / get_task
    TaskWatcher         -- WaitForUpdatesEx on every scheduled task's info (wakes on a firing)

Why the action is harmless: vCenter only lets a scheduled task invoke a method, and we need
the firing, not the method. On a VM we use `RefreshStorageInfo` (vCenter re-reads the VM's
file layout to update its storage usage numbers: no configuration change, no power change, no
snapshot, nothing in the guest); on any other entity (a folder) `Reload` (vCenter re-reads
the entity's state from its own inventory: a no-op when nobody edited files behind vCenter's
back). Either way, if the appliance is down when the task fires, nothing happens to the VMs.

All times are timezone-aware UTC. pyVmomi faults become appliance.errors here.
"""

from __future__ import annotations

import http.client
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pyVmomi import vim, vmodl

from appliance.errors import NotFound, StillpointError, UsageError, VSphereError
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.tasks import fault_message

__all__ = [
    "DAYS",
    "Schedule",
    "ScheduledTaskState",
    "TaskWatcher",
    "create_task",
    "get_task",
    "harmless_action",
    "list_tasks",
    "reconfigure_task",
    "remove_task",
    "run_task",
]

log = logging.getLogger(__name__)
_PC = vmodl.query.PropertyCollector

DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
INFO_PATHS = [
    "info.name",
    "info.description",
    "info.enabled",
    "info.scheduler",
    "info.entity",
    "info.nextRunTime",
    "info.prevRunTime",
    "info.state",
    "info.lastModifiedTime",
    "info.lastModifiedUser",
    "info.action",
]

Kind = Literal["hourly", "daily", "weekly", "once"]


@dataclass(frozen=True)
class Schedule:
    """When a job runs (UTC). hourly: at `minute` every `interval` hours; daily: at
    hour:minute every `interval` days; weekly: at hour:minute on `days` every `interval`
    weeks; once: at `run_at`."""

    kind: Kind
    hour: int = 0
    minute: int = 0
    interval: int = 1
    days: tuple[str, ...] = ()
    run_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("hourly", "daily", "weekly", "once"):
            raise UsageError(f"unknown schedule kind {self.kind!r}")
        if not (0 <= self.hour <= 23 and 0 <= self.minute <= 59):
            raise UsageError(f"time of day {self.hour}:{self.minute:02d} is out of range")
        if self.interval < 1:
            raise UsageError("a schedule's interval is at least 1")
        if self.kind == "weekly" and (not self.days or set(self.days) - set(DAYS)):
            raise UsageError("a weekly schedule needs days among " + ", ".join(DAYS))
        if self.kind == "once" and self.run_at is None:
            raise UsageError("a once schedule needs a time")

    def to_vim(self) -> vim.scheduler.TaskScheduler:
        if self.kind == "hourly":
            return vim.scheduler.HourlyTaskScheduler(minute=self.minute, interval=self.interval)
        if self.kind == "daily":
            return vim.scheduler.DailyTaskScheduler(
                hour=self.hour, minute=self.minute, interval=self.interval
            )
        if self.kind == "weekly":
            return vim.scheduler.WeeklyTaskScheduler(
                hour=self.hour,
                minute=self.minute,
                interval=self.interval,
                **{d: True for d in self.days},
            )
        return vim.scheduler.OnceTaskScheduler(runAt=self.run_at)

    @classmethod
    def from_vim(cls, s: Any) -> Schedule | None:
        """The schedule vCenter holds, or None for kinds Stillpoint does not model
        (monthly, after-startup): such a task still fires and runs its job."""
        interval = max(1, int(getattr(s, "interval", 1) or 1))
        if isinstance(s, vim.scheduler.WeeklyTaskScheduler):
            days = tuple(d for d in DAYS if getattr(s, d, False))
            return cls("weekly", s.hour, s.minute, interval, days)
        if isinstance(s, vim.scheduler.DailyTaskScheduler):
            return cls("daily", s.hour, s.minute, interval)
        if isinstance(s, vim.scheduler.HourlyTaskScheduler):
            return cls("hourly", 0, s.minute, interval)
        if isinstance(s, vim.scheduler.OnceTaskScheduler) and s.runAt is not None:
            return cls("once", run_at=_utc(s.runAt))
        return None

    def describe(self) -> str:
        at = f"{self.hour:02d}:{self.minute:02d} UTC"
        every = f"every {self.interval} " if self.interval > 1 else "every "
        if self.kind == "hourly":
            unit = "hours" if self.interval > 1 else "hour"
            return f"{every}{unit} at minute {self.minute}"
        if self.kind == "daily":
            return f"{every}{'days' if self.interval > 1 else 'day'} at {at}"
        if self.kind == "weekly":
            days = ",".join(d[:3] for d in self.days)
            return f"{every}{'weeks' if self.interval > 1 else 'week'} on {days} at {at}"
        assert self.run_at is not None
        return f"once at {self.run_at.isoformat(timespec='seconds')}"


@dataclass(frozen=True)
class ScheduledTaskState:
    """What vCenter says about one scheduled task right now."""

    moref: str
    name: str
    description: str
    enabled: bool
    entity: Any  # the vim.ManagedEntity it is attached to
    entity_moref: str
    schedule: Schedule | None
    next_run: datetime | None
    prev_run: datetime | None
    state: str  # queued / running / success / error
    last_modified: datetime | None
    last_modified_user: str
    action: str
    task: Any  # the vim.scheduler.ScheduledTask


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def _manager(session: VSphereSession) -> Any:
    stm = session.content.scheduledTaskManager
    if stm is None:
        raise VSphereError(
            f"{session.endpoint.address} has no scheduled task manager (an ESXi host, not vCenter?)"
        )
    return stm


def _fault(what: str, err: vmodl.MethodFault) -> StillpointError:
    if isinstance(err, vim.fault.DuplicateName):
        return UsageError(f"{what}: a scheduled task with that name already exists")
    if isinstance(err, vmodl.fault.ManagedObjectNotFound):
        return NotFound(f"{what}: the scheduled task no longer exists")
    if isinstance(err, vmodl.fault.InvalidArgument):
        prop = getattr(err, "invalidProperty", "") or ""
        return UsageError(f"{what}: vCenter refused the value of {prop or 'an argument'}")
    return VSphereError(f"{what}: {fault_message(err)}")


def harmless_action(entity: Any) -> vim.action.MethodAction:
    """The method a Stillpoint task runs when it fires (see the module docstring)."""
    # MethodAction.name is a vmodl method object (pyVmomi sends its wsdl name).
    if isinstance(entity, vim.VirtualMachine):
        return vim.action.MethodAction(name=vim.VirtualMachine.RefreshStorageInfo, argument=[])
    return vim.action.MethodAction(name=vim.ManagedEntity.Reload, argument=[])


def _spec(
    entity: Any, name: str, description: str, schedule: Schedule | Any, enabled: bool
) -> vim.scheduler.ScheduledTaskSpec:
    scheduler = schedule.to_vim() if isinstance(schedule, Schedule) else schedule
    return vim.scheduler.ScheduledTaskSpec(
        name=name,
        description=description,
        enabled=enabled,
        scheduler=scheduler,
        action=harmless_action(entity),
    )


def create_task(
    session: VSphereSession,
    entity: Any,
    name: str,
    description: str,
    schedule: Schedule,
    enabled: bool = True,
) -> ScheduledTaskState:
    """Create a scheduled task on `entity` (a VM or folder) and return its state."""
    try:
        task = _manager(session).CreateScheduledTask(
            entity, _spec(entity, name, description, schedule, enabled)
        )
    except vmodl.MethodFault as err:
        raise _fault(f"creating scheduled task {name!r}", err) from err
    except (OSError, http.client.HTTPException) as err:
        raise VSphereError(f"creating scheduled task {name!r}: {err}") from err
    return get_task(session, task._moId)


def reconfigure_task(
    session: VSphereSession,
    current: ScheduledTaskState,
    *,
    name: str | None = None,
    description: str | None = None,
    schedule: Schedule | None = None,
    enabled: bool | None = None,
) -> ScheduledTaskState:
    """Change what is given, keep the rest as vCenter has it now (an admin's edits too)."""
    raw = _read(session, [current.task]).get(current.moref)
    if raw is None:
        raise NotFound(f"scheduled task {current.name!r} no longer exists")
    spec = _spec(
        current.entity,
        name if name is not None else raw["info.name"],
        description if description is not None else raw.get("info.description", ""),
        schedule if schedule is not None else raw["info.scheduler"],
        enabled if enabled is not None else bool(raw.get("info.enabled")),
    )
    try:
        current.task.ReconfigureScheduledTask(spec)
    except vmodl.MethodFault as err:
        raise _fault(f"changing scheduled task {current.name!r}", err) from err
    return get_task(session, current.moref)


def remove_task(session: VSphereSession, current: ScheduledTaskState) -> None:
    try:
        current.task.RemoveScheduledTask()
    except vmodl.MethodFault as err:
        raise _fault(f"removing scheduled task {current.name!r}", err) from err


def run_task(session: VSphereSession, current: ScheduledTaskState) -> None:
    """vCenter's "Run now": the task fires (and so its job runs) without moving its schedule."""
    try:
        current.task.RunScheduledTask()
    except vim.fault.InvalidState as err:
        raise UsageError(f"scheduled task {current.name!r} is running already") from err
    except vmodl.MethodFault as err:
        raise _fault(f"running scheduled task {current.name!r}", err) from err


def _all_spec(session: VSphereSession) -> Any:
    traverse = _PC.TraversalSpec(
        name="tasks", type=vim.scheduler.ScheduledTaskManager, path="scheduledTask", skip=False
    )
    return _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=_manager(session), skip=True, selectSet=[traverse])],
        propSet=[_PC.PropertySpec(type=vim.scheduler.ScheduledTask, pathSet=INFO_PATHS)],
    )


def _read(session: VSphereSession, tasks: list[Any] | None) -> dict[str, dict[str, Any]]:
    """{moref: {path: value, "obj": task}} for the given tasks, or for all of them."""
    if tasks is None:
        spec = _all_spec(session)
    else:
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=t, skip=False) for t in tasks],
            propSet=[_PC.PropertySpec(type=vim.scheduler.ScheduledTask, pathSet=INFO_PATHS)],
        )
    pc = session.content.propertyCollector
    out: dict[str, dict[str, Any]] = {}
    try:
        result = pc.RetrievePropertiesEx([spec], _PC.RetrieveOptions())
        while result is not None:
            for oc in result.objects:
                props = {p.name: p.val for p in oc.propSet}
                props["obj"] = oc.obj
                out[oc.obj._moId] = props
            result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
    except vmodl.fault.ManagedObjectNotFound:
        return {}
    except vmodl.MethodFault as err:
        raise VSphereError(f"reading scheduled tasks failed: {fault_message(err)}") from err
    except (OSError, http.client.HTTPException) as err:
        raise VSphereError(f"reading scheduled tasks failed: {err}") from err
    return out


def _state(moref: str, p: dict[str, Any]) -> ScheduledTaskState:
    entity = p.get("info.entity")
    action = p.get("info.action")
    return ScheduledTaskState(
        moref=moref,
        name=p.get("info.name", ""),
        description=p.get("info.description") or "",
        enabled=bool(p.get("info.enabled")),
        entity=entity,
        entity_moref=entity._moId if entity is not None else "",
        schedule=Schedule.from_vim(p.get("info.scheduler")),
        next_run=_utc(p.get("info.nextRunTime")),
        prev_run=_utc(p.get("info.prevRunTime")),
        state=str(p.get("info.state") or ""),
        last_modified=_utc(p.get("info.lastModifiedTime")),
        last_modified_user=p.get("info.lastModifiedUser") or "",
        action=_method_name(getattr(action, "name", None)),
        task=p["obj"],
    )


def _method_name(method: Any) -> str:
    """A MethodAction's method as its wsdl name ("RefreshStorageInfo")."""
    info = getattr(method, "info", None)
    return str(getattr(info, "wsdlName", None) or method or "")


def list_tasks(session: VSphereSession) -> list[ScheduledTaskState]:
    """Every scheduled task vCenter has, in one PropertyCollector round trip."""
    raw = _read(session, None)
    return sorted((_state(m, p) for m, p in raw.items()), key=lambda s: s.name)


def get_task(session: VSphereSession, moref: str) -> ScheduledTaskState:
    task = vim.scheduler.ScheduledTask(moref, session.si._stub)
    raw = _read(session, [task]).get(moref)
    if raw is None:
        raise NotFound(f"no scheduled task {moref}")
    return _state(moref, raw)


class TaskWatcher:
    """Wakes when any scheduled task's info changes (a firing sets prevRunTime, an edit
    changes the scheduler...). Its own PropertyCollector, so it steals nobody's updates;
    destroyed by close(). Callers re-read list_tasks() after each wake: this keeps the
    watcher simple and correct even when an update is missed."""

    def __init__(self, session: VSphereSession) -> None:
        self.session = session
        self.version = ""
        try:
            self.collector = session.content.propertyCollector.CreatePropertyCollector()
            try:
                spec = _all_spec(session)
                spec.propSet[0].pathSet = [
                    "info.prevRunTime",
                    "info.state",
                    "info.scheduler",
                    "info.description",
                    "info.enabled",
                ]
                self.collector.CreateFilter(spec, partialUpdates=False)
                self._wait(0)  # the first call returns the current state
            except BaseException:
                self.collector.DestroyPropertyCollector()
                raise
        except vmodl.MethodFault as err:
            raise VSphereError(f"watching scheduled tasks failed: {fault_message(err)}") from err

    def _wait(self, seconds: int) -> bool:
        options = _PC.WaitOptions(maxWaitSeconds=seconds)
        update = self.collector.WaitForUpdatesEx(self.version, options)
        if update is None:
            return False
        self.version = update.version
        return bool(update.filterSet)

    def wait(self, seconds: int) -> bool:
        """Block up to `seconds` for a change; True if something changed."""
        try:
            return self._wait(seconds)
        except vmodl.MethodFault as err:
            raise VSphereError(f"watching scheduled tasks failed: {fault_message(err)}") from err
        except (OSError, http.client.HTTPException) as err:
            raise VSphereError(f"watching scheduled tasks failed: {err}") from err

    def close(self) -> None:
        try:
            self.collector.DestroyPropertyCollector()
        except (vmodl.MethodFault, OSError, http.client.HTTPException, VSphereError) as err:
            log.debug("destroying the scheduled-task collector failed: %s", err)
