"""Events on vCenter objects: post the backup outcome on the VM, read recent events.

The outcome is posted with EventManager.PostEvent as a GeneralVm{Info,Warning,Error}Event,
so that it appears in the VM's Monitor > Events view with a matching severity (and vCenter
alarms can trigger on it). Reading goes through an EventHistoryCollector that is always
destroyed (vCenter keeps a small number per session).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pyVmomi import vim, vmodl

from appliance.errors import VSphereError
from appliance.vsphere.props import retrieve_one
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.tasks import fault_message

__all__ = ["EventRecord", "Level", "post_vm_event", "recent_events"]

Level = Literal["info", "warning", "error"]
_EVENT_TYPES = {
    "info": vim.event.GeneralVmInfoEvent,
    "warning": vim.event.GeneralVmWarningEvent,
    "error": vim.event.GeneralVmErrorEvent,
}


@dataclass(frozen=True)
class EventRecord:
    key: int
    created: datetime
    type_name: str  # e.g. "GeneralVmErrorEvent"
    message: str
    user: str | None


def post_vm_event(
    session: VSphereSession, vm: vim.VirtualMachine, message: str, level: Level = "info"
) -> None:
    """Post `message` as an event on the VM (e.g. "Stillpoint backup job-7 succeeded")."""
    if level not in _EVENT_TYPES:
        raise ValueError(f"level must be info, warning or error, not {level!r}")
    try:
        name = retrieve_one(session, vm, ["name"]).get("name", vm._moId)
        event = _EVENT_TYPES[level](
            key=0,
            chainId=0,
            createdTime=datetime.now().astimezone(),
            userName=session.endpoint.user,
            message=message,
            vm=vim.event.VmEventArgument(vm=vm, name=name),
        )
        session.content.eventManager.PostEvent(eventToPost=event)
    except vmodl.MethodFault as err:
        raise VSphereError(f"posting an event on {vm._moId} failed: {fault_message(err)}") from err


def recent_events(
    session: VSphereSession, entity: vim.ManagedEntity, since: datetime, limit: int = 1000
) -> list[EventRecord]:
    """Events on `entity` itself since `since` (aware datetime), oldest first."""
    spec = vim.event.EventFilterSpec(
        entity=vim.event.EventFilterSpec.ByEntity(entity=entity, recursion="self"),
        time=vim.event.EventFilterSpec.ByTime(beginTime=since),
    )
    manager = session.content.eventManager
    try:
        collector = manager.CreateCollectorForEvents(filter=spec)
    except vmodl.MethodFault as err:
        raise VSphereError(
            f"reading events of {entity._moId} failed: {fault_message(err)}"
        ) from err
    records: list[EventRecord] = []
    try:
        collector.RewindCollector()
        while len(records) < limit:
            page = collector.ReadNextEvents(maxCount=min(100, limit - len(records)))
            if not page:
                break
            for ev in page:
                records.append(
                    EventRecord(
                        key=int(ev.key),
                        created=ev.createdTime,
                        type_name=type(ev).__name__.rsplit(".", 1)[-1],
                        message=ev.fullFormattedMessage or getattr(ev, "message", "") or "",
                        user=ev.userName or None,
                    )
                )
    except vmodl.MethodFault as err:
        raise VSphereError(
            f"reading events of {entity._moId} failed: {fault_message(err)}"
        ) from err
    finally:
        try:
            collector.DestroyCollector()
        except vmodl.MethodFault:
            pass
    # ByTime is inclusive at second granularity on some servers: filter again here.
    return sorted((r for r in records if r.created >= since), key=lambda r: (r.created, r.key))
