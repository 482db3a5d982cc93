"""Jobs whose definition and schedule live in vCenter, as scheduled tasks.

A job NAME is the vCenter scheduled task named ``stillpoint: NAME`` on the entity it
protects (its first VM, its folder, or the root folder for a tag job). The task's
*scheduler* is the job's schedule; the task's *description* holds the job's definition.
Stillpoint keeps no local copy of either: `serve` re-reads both from vCenter at every
firing, so a schedule or definition an administrator changes in the vSphere Client is
what runs next.

The description (docs/deploy.md "How a job is stored in vCenter") is free text for people,
then one line that is the definition, the last line that starts with the marker:

    Stillpoint backup job nightly: lab-raw1, lab-raw2; keep last 7.
    Fired by vCenter; the Stillpoint appliance runs the backup. ...
    stillpoint-job/1 {"targets":["vm-43","vm-44"],"keep":{"last":7},"app_aware":"auto"}

Definition fields (JSON object, version 1): ``targets`` (list; a VM moref such as "vm-43",
an inventory path, a unique VM name, "folder:<inventory path>" or "tag:[category/]name"),
``keep`` ({"last","daily","weekly","monthly"}: retention after each run; empty keeps all),
``app_aware`` ("auto" | "require" | "try" | "off"), ``copy_only`` (bool: truncate no
application logs). Unknown fields are refused, so a typo made in vCenter is reported by
`job list` instead of being ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pyVmomi import vim

from appliance.errors import NotFound, UsageError
from appliance.vsphere import inventory, scheduled_tasks
from appliance.vsphere.scheduled_tasks import DAYS, Schedule, ScheduledTaskState
from appliance.vsphere.session import VSphereSession

TASK_PREFIX = "stillpoint: "
MARKER = "stillpoint-job/1 "
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
APP_AWARE = ("auto", "require", "try", "off")
KEEP_KEYS = ("last", "daily", "weekly", "monthly")
_FIELDS = {"targets", "keep", "app_aware", "copy_only"}


@dataclass(frozen=True)
class JobDefinition:
    name: str
    targets: tuple[str, ...]
    keep: dict[str, int] = field(default_factory=dict)
    app_aware: str = "auto"
    copy_only: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise UsageError(f"job name {self.name!r}: use letters, digits, '.', '_', '-' "
                             "(at most 64, starting with a letter or digit)")
        if not self.targets:
            raise UsageError(f"job {self.name}: no targets (give --vm, --folder or --tag)")
        if self.app_aware not in APP_AWARE:
            raise UsageError(f"job {self.name}: app_aware must be one of {', '.join(APP_AWARE)}")
        for key, value in self.keep.items():
            if key not in KEEP_KEYS or not isinstance(value, int) or value < 0:
                raise UsageError(f"job {self.name}: keep.{key} must be a count >= 0 "
                                 f"(keys: {', '.join(KEEP_KEYS)})")

    @property
    def keep_policy(self) -> dict[str, int]:
        """keep_last=... keyword arguments for Repository.forget (only non-zero ones)."""
        return {f"keep_{k}": v for k, v in self.keep.items() if v}

    def to_json(self) -> str:
        doc: dict[str, Any] = {"targets": list(self.targets), "keep": {k: v for k, v in self.keep.items() if v},
               "app_aware": self.app_aware}
        if self.copy_only:
            doc["copy_only"] = True
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Job:
    """A job as vCenter has it now: its definition (or why it cannot be read) and task."""

    name: str
    definition: JobDefinition | None
    problem: str | None
    task: ScheduledTaskState


# --- encoding --------------------------------------------------------------------------

def encode_description(defn: JobDefinition, target_names: list[str] | None = None) -> str:
    shown = ", ".join(target_names or list(defn.targets))
    keep = ", ".join(f"{k} {v}" for k, v in defn.keep.items() if v) or "everything"
    return (f"Stillpoint backup job {defn.name}: {shown}; keep {keep}.\n"
            "Fired by vCenter; the Stillpoint appliance runs the backup (this task's own "
            "action only refreshes vCenter's view and changes nothing). Edit the schedule "
            "here freely; the last line is the job's definition.\n"
            f"{MARKER}{defn.to_json()}")


def decode_description(name: str, text: str) -> JobDefinition:
    """The definition in a task's description; UsageError saying what is wrong."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip().startswith(MARKER)]
    if not lines:
        raise UsageError(f"job {name}: the task's description has no '{MARKER.strip()}' line")
    try:
        doc = json.loads(lines[-1][len(MARKER):])
    except ValueError as err:
        raise UsageError(f"job {name}: the definition is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise UsageError(f"job {name}: the definition must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise UsageError(f"job {name}: unknown field(s) {', '.join(sorted(unknown))}")
    targets = doc.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise UsageError(f"job {name}: targets must be a list of VM/folder/tag selectors")
    keep = doc.get("keep") or {}
    if not isinstance(keep, dict):
        raise UsageError(f"job {name}: keep must be an object")
    return JobDefinition(name=name, targets=tuple(targets), keep=dict(keep),
                         app_aware=str(doc.get("app_aware", "auto")),
                         copy_only=bool(doc.get("copy_only", False)))


def job_name_of(task_name: str) -> str | None:
    return task_name[len(TASK_PREFIX):] if task_name.startswith(TASK_PREFIX) else None


def job_of(task: ScheduledTaskState) -> Job | None:
    """The job a scheduled task is, or None when the task is not Stillpoint's."""
    name = job_name_of(task.name)
    if name is None:
        return None
    try:
        return Job(name, decode_description(name, task.description), None, task)
    except UsageError as err:
        return Job(name, None, str(err), task)


# --- schedules from the command line's words ----------------------------------------------

def parse_schedule(*, daily: str | None = None, weekly: str | None = None,
                   hourly: int | None = None, minute: int = 0,
                   once: str | None = None) -> Schedule:
    """Exactly one of: daily "HH:MM"; weekly "mon,thu@HH:MM"; hourly N (every N hours, at
    `minute`); once ISO time ("2026-01-31T02:00Z", or "+SECONDS" from now). Times UTC."""
    given = [x for x in (daily, weekly, hourly, once) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one schedule: --daily HH:MM, --weekly DAYS@HH:MM, "
                         "--hourly N or --once TIME")
    if daily is not None:
        h, m = _hhmm(daily)
        return Schedule("daily", h, m)
    if weekly is not None:
        days_part, _, at = weekly.partition("@")
        h, m = _hhmm(at or "00:00")
        days = []
        for word in days_part.split(","):
            full = [d for d in DAYS if d.startswith(word.strip().lower()[:3])]
            if len(word.strip()) < 3 or len(full) != 1:
                raise UsageError(f"--weekly: {word!r} is not a day (mon, tue, ... sun)")
            days.append(full[0])
        return Schedule("weekly", h, m, days=tuple(d for d in DAYS if d in days))
    if hourly is not None:
        if hourly < 1:
            raise UsageError("--hourly N: N is at least 1")
        return Schedule("hourly", 0, minute, interval=hourly)
    assert once is not None
    if once.startswith("+"):
        try:
            seconds = float(once[1:])
        except ValueError as err:
            raise UsageError(f"--once: {once!r} is not +SECONDS") from err
        return Schedule("once", run_at=datetime.now(UTC) + timedelta(seconds=seconds))
    try:
        when = datetime.fromisoformat(once)
    except ValueError as err:
        raise UsageError(f"--once: {once!r} is not an ISO time") from err
    return Schedule("once", run_at=when if when.tzinfo else when.replace(tzinfo=UTC))


def _hhmm(text: str) -> tuple[int, int]:
    m = re.match(r"^(\d{1,2}):(\d{2})$", text.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise UsageError(f"{text!r} is not a time of day HH:MM (UTC)")
    return int(m.group(1)), int(m.group(2))


# --- targets ---------------------------------------------------------------------------

def normalize_targets(session: VSphereSession, vms: tuple[str, ...], folders: tuple[str, ...],
                      tags: tuple[str, ...]) -> tuple[list[str], list[str], Any]:
    """(stored selectors, names for people, the entity the task goes on). VMs are stored
    by moref so that renaming a VM does not break its job."""
    targets: list[str] = []
    names: list[str] = []
    entity: Any = None
    for selector in vms:
        vm = inventory.find_vm(session, selector)
        targets.append(vm._moId)
        names.append(_name(session, vm))
        entity = entity or vm
    for path in folders:
        found = session.content.searchIndex.FindByInventoryPath(path.strip().lstrip("/"))
        if not isinstance(found, (vim.Folder, vim.Datacenter)):
            raise NotFound(f"no folder at inventory path {path}")
        targets.append(f"folder:{path.strip().lstrip('/')}")
        names.append(f"folder {path}")
        entity = entity or found
    for tag in tags:
        targets.append(f"tag:{tag}")
        names.append(f"tag {tag}")
        entity = entity or session.content.rootFolder
    if entity is None:
        raise UsageError("give at least one --vm, --folder or --tag")
    return targets, names, entity


def _name(session: VSphereSession, obj: Any) -> str:
    from appliance.vsphere.props import retrieve_one

    return str(retrieve_one(session, obj, ["name"]).get("name", obj._moId))


def resolve_vms(session: VSphereSession, defn: JobDefinition) -> list[Any]:
    """The job's VMs now (folders and tags are expanded at every run), without duplicates."""
    vms: list[Any] = []
    seen: set[str] = set()
    for target in defn.targets:
        if target.startswith("folder:"):
            found = inventory.find_vms_in_folder(session, target[len("folder:"):])
        elif target.startswith("tag:"):
            from appliance.vsphere.tags import find_vms_by_tag

            found = find_vms_by_tag(session, target[len("tag:"):])
        else:
            found = [inventory.find_vm(session, target)]
        for vm in found:
            if vm._moId not in seen:
                seen.add(vm._moId)
                vms.append(vm)
    return vms


# --- the verbs --------------------------------------------------------------------------

def list_jobs(session: VSphereSession) -> list[Job]:
    return [j for j in (job_of(t) for t in scheduled_tasks.list_tasks(session)) if j]


def find_job(session: VSphereSession, name: str) -> Job:
    for job in list_jobs(session):
        if job.name == name:
            return job
    raise NotFound(f"no job {name!r} (no scheduled task '{TASK_PREFIX}{name}' in vCenter)")


def create_job(session: VSphereSession, defn: JobDefinition, schedule: Schedule,
               vms: tuple[str, ...], folders: tuple[str, ...], tags: tuple[str, ...],
               enabled: bool = True) -> Job:
    targets, names, entity = normalize_targets(session, vms, folders, tags)
    defn = JobDefinition(defn.name, tuple(targets), defn.keep, defn.app_aware, defn.copy_only)
    if any(j.name == defn.name for j in list_jobs(session)):
        raise UsageError(f"job {defn.name!r} exists already (edit or delete it)")
    task = scheduled_tasks.create_task(session, entity, TASK_PREFIX + defn.name,
                                       encode_description(defn, names), schedule, enabled)
    job = job_of(task)
    assert job is not None
    return job


def edit_job(session: VSphereSession, name: str, *, schedule: Schedule | None = None,
             keep: dict[str, int] | None = None, app_aware: str | None = None,
             enabled: bool | None = None) -> Job:
    """Change parts of a job in vCenter; what is not given stays as vCenter has it."""
    job = find_job(session, name)
    description = None
    if keep is not None or app_aware is not None:
        if job.definition is None:
            raise UsageError(f"{job.problem}; fix the description in vCenter or recreate the job")
        old = job.definition
        new = JobDefinition(name, old.targets, keep if keep is not None else old.keep,
                            app_aware or old.app_aware, old.copy_only)
        description = encode_description(new)
    task = scheduled_tasks.reconfigure_task(session, job.task, description=description,
                                            schedule=schedule, enabled=enabled)
    edited = job_of(task)
    assert edited is not None
    return edited


def delete_job(session: VSphereSession, name: str) -> None:
    scheduled_tasks.remove_task(session, find_job(session, name).task)


def fire_job(session: VSphereSession, name: str) -> Job:
    """vCenter's "Run now" on the job's task: `serve` runs the job as for a scheduled firing."""
    job = find_job(session, name)
    scheduled_tasks.run_task(session, job.task)
    return job
