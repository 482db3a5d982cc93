"""Wait for vSphere tasks through PropertyCollector updates, never sleep loops.

Each wait uses its own short-lived PropertyCollector (so that concurrent waits in several
threads never steal each other's updates), destroyed in `finally`. A failed task raises
TaskFailed carrying the vim fault's class (`fault_name`, e.g. "vim.fault.FileFault") so
callers can react to a fault type without seeing pyVmomi types.
"""

from __future__ import annotations

import time
from typing import Any

from pyVmomi import vim, vmodl

from appliance.errors import VSphereError
from appliance.vsphere.props import retrieve_one
from appliance.vsphere.session import VSphereSession

__all__ = ["TaskFailed", "TaskTimeout", "fault_message", "fault_name", "wait_for_task"]

_PC = vmodl.query.PropertyCollector
_MAX_COLLECTOR_LOSSES = 3


class TaskFailed(VSphereError):
    """A vSphere task failed."""

    def __init__(self, message: str, fault_name: str, fault: Any = None) -> None:
        super().__init__(message)
        self.fault_name = fault_name
        self.fault = fault  # the vmodl fault object, for logging only


class TaskTimeout(VSphereError):
    """A vSphere task did not finish in time."""

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


def fault_name(fault: Any) -> str:
    """'vim.fault.FileFault' for a pyVmomi fault object."""
    return type(fault).__name__


def fault_message(fault: Any) -> str:
    msg = getattr(fault, "msg", "") or ""
    if not msg:
        for lm in getattr(fault, "faultMessage", None) or []:
            msg = lm.message or lm.key
            if msg:
                break
    return msg or fault_name(fault).rsplit(".", 1)[-1]


def wait_for_task(
    session: VSphereSession, task: vim.Task, timeout: float, what: str | None = None
) -> Any:
    """Block until `task` succeeds (returns info.result) or fails (TaskFailed), or
    `timeout` seconds pass (TaskTimeout; the task is left running)."""
    label = what or task._moId
    deadline = time.monotonic() + timeout
    for _ in range(_MAX_COLLECTOR_LOSSES):
        try:
            state, error = _wait_once(session, task, deadline, timeout, label)
            break
        except vmodl.fault.ManagedObjectNotFound as err:
            # Our collector belonged to a session that expired (the stub logged in again):
            # wait again with a new one -- unless it is the task that vanished.
            if getattr(err, "obj", None) is not None and err.obj._moId == task._moId:
                raise VSphereError(f"{label}: task {task._moId} no longer exists") from err
        except vmodl.MethodFault as err:
            raise VSphereError(
                f"{label}: waiting for task {task._moId} failed: {fault_message(err)}"
            ) from err
    else:
        raise VSphereError(f"{label}: lost the session {_MAX_COLLECTOR_LOSSES} times while waiting")
    if state == vim.TaskInfo.State.error:
        name = fault_name(error) if error is not None else "vmodl.MethodFault"
        raise TaskFailed(
            f"{label} failed: {name.rsplit('.', 1)[-1]}: "
            f"{fault_message(error) if error is not None else 'unknown'}",
            name,
            error,
        )
    # Only info.result is read (not all of info: some servers put a Snapshot in
    # info.entity, which pyVmomi refuses to deserialize).
    return retrieve_one(session, task, ["info.result"]).get("info.result")


def _wait_once(
    session: VSphereSession, task: vim.Task, deadline: float, timeout: float, label: str
) -> tuple[Any, Any]:
    """(final state, error) of the task, watched through a collector of our own."""
    pc = session.content.propertyCollector.CreatePropertyCollector()
    pfilter = None
    try:
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=task, skip=False)],
            propSet=[_PC.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error"])],
        )
        pfilter = pc.CreateFilter(spec, True)
        version = ""
        state, error = None, None
        while state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TaskTimeout(
                    f"{label}: task {task._moId} did not finish within {timeout:g} s", task._moId
                )
            opts = _PC.WaitOptions(maxWaitSeconds=max(1, min(int(remaining + 0.999), 60)))
            update = pc.WaitForUpdatesEx(version, opts)
            if update is None:  # maxWaitSeconds elapsed without change
                continue
            version = update.version
            for fs in update.filterSet:
                for obj in fs.objectSet:
                    for change in obj.changeSet:
                        if change.name == "info.state":
                            state = change.val
                        elif change.name == "info.error":
                            error = change.val
        return state, error
    finally:
        for destroy in (
            pfilter.DestroyPropertyFilter if pfilter is not None else None,
            pc.DestroyPropertyCollector,
        ):
            if destroy is None:
                continue
            try:
                destroy()
            except vmodl.MethodFault:
                pass  # gone with an expired session
