"""Changed Block Tracking: enable it, and read changed areas as an invariant-checked algorithm.

`changed_areas()` pages QueryChangedDiskAreas by startOffset (vCenter caps the span of one
answer) and checks, like the Bareos plugin, everything the answer promises:
  * each page starts exactly where it was asked to start, and has a positive length;
  * pages are contiguous, and their lengths add up to the disk's capacity;
  * areas lie inside their page (hence inside the disk), are sorted and do not overlap.
A violation is a VSphereError("CBT invariant violated ..."): a silently wrong map would
mean a silently incomplete backup. A FileFault (unknown changeId, CBT reset, snapshot
taken without CBT) is a CBTResetError, on which the job falls back to a full ("*").

A changeId is "<uuid>/<sequence>"; when its UUID part differs from the previous restore
point's, CBT was reset in between and the previous changeId must not be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from appliance.errors import UsageError, VSphereError
from appliance.vsphere.props import retrieve_one
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.snapshots import SnapshotRef, create_snapshot, remove_snapshot
from appliance.vsphere.tasks import fault_message, wait_for_task

__all__ = [
    "ALL_ALLOCATED",
    "CBTResetError",
    "ChangeId",
    "Extent",
    "changed_areas",
    "check_page",
    "enable_cbt",
    "parse_change_id",
    "same_epoch",
]

ALL_ALLOCATED = "*"  # changeId asking for the allocated areas (a first full)
Extent = tuple[int, int]  # (offset, length) in bytes


class CBTResetError(VSphereError):
    """Changed block tracking cannot answer for this changeId: a full backup is needed."""


@dataclass(frozen=True)
class ChangeId:
    uuid: str  # the epoch: changes only when CBT is reset
    sequence: int

    def __str__(self) -> str:
        return f"{self.uuid}/{self.sequence}"


def parse_change_id(value: str) -> ChangeId:
    """'52 a6 ... 30-af ... 75/12' -> ChangeId(uuid='52 a6 ... 75', sequence=12)."""
    uuid, sep, seq = (value or "").strip().rpartition("/")
    if not sep or not uuid.strip() or not seq.isdigit():
        raise UsageError(f"not a CBT changeId ('<uuid>/<sequence>'): {value!r}")
    return ChangeId(uuid.strip().lower(), int(seq))


def same_epoch(previous: str | ChangeId, current: str | ChangeId) -> bool:
    """True when both changeIds come from the same CBT epoch (no reset in between), so that
    `previous` may be used as the base of an incremental read at `current`."""
    a = previous if isinstance(previous, ChangeId) else parse_change_id(previous)
    b = current if isinstance(current, ChangeId) else parse_change_id(current)
    return a.uuid == b.uuid and a.sequence <= b.sequence


def _violation(what: str, disk_key: int) -> VSphereError:
    return VSphereError(f"CBT invariant violated for disk {disk_key}: {what}")


def check_page(
    asked: int, start: int, length: int, areas: list[Extent], capacity: int, disk_key: int
) -> None:
    """Check one QueryChangedDiskAreas answer against what was asked (see module doc)."""
    if start != asked:
        raise _violation(f"asked for startOffset {asked}, got {start}", disk_key)
    if length <= 0:
        raise _violation(f"page at {start} has length {length}", disk_key)
    end = start + length
    if end > capacity:
        raise _violation(f"page [{start}, {end}) runs past the capacity {capacity}", disk_key)
    cursor = start
    for off, ln in areas:
        if ln <= 0:
            raise _violation(f"area at {off} has length {ln}", disk_key)
        if off < cursor:
            raise _violation(f"area at {off} is unsorted or overlaps the one before", disk_key)
        if off + ln > end:
            raise _violation(
                f"area [{off}, {off + ln}) lies outside its page [{start}, {end})", disk_key
            )
        cursor = off + ln


def changed_areas(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    snapshot: SnapshotRef,
    disk_key: int,
    capacity: int,
    change_id: str,
) -> list[Extent]:
    """The (offset, length) areas of disk `disk_key` that changed since `change_id` ("*":
    the allocated areas), as of `snapshot`, sorted, adjacent areas merged."""
    if capacity <= 0:
        raise UsageError(f"disk {disk_key}: capacity must be positive, not {capacity}")
    areas: list[Extent] = []
    offset = 0
    total = 0
    while offset < capacity:
        info = _query(vm, snapshot, disk_key, offset, change_id)
        page = [(int(a.start), int(a.length)) for a in (info.changedArea or [])]
        check_page(offset, int(info.startOffset), int(info.length), page, capacity, disk_key)
        for off, ln in page:
            if areas and areas[-1][0] + areas[-1][1] == off:
                areas[-1] = (areas[-1][0], areas[-1][1] + ln)
            else:
                areas.append((off, ln))
        total += int(info.length)
        offset = int(info.startOffset) + int(info.length)
    if total != capacity:
        raise _violation(f"page lengths add up to {total}, not the capacity {capacity}", disk_key)
    return areas


def _query(vm: Any, snapshot: SnapshotRef, disk_key: int, offset: int, change_id: str) -> Any:
    try:
        return vm.QueryChangedDiskAreas(
            snapshot=snapshot.snapshot, deviceKey=disk_key, startOffset=offset, changeId=change_id
        )
    except vim.fault.FileFault as err:
        raise CBTResetError(
            f"CBT cannot answer for disk {disk_key} of {vm._moId} since changeId "
            f"{change_id!r}: {fault_message(err)}; a full backup is needed"
        ) from err
    except vmodl.MethodFault as err:
        raise VSphereError(
            f"QueryChangedDiskAreas(disk {disk_key}, offset {offset}) on {vm._moId} failed: "
            f"{type(err).__name__}: {fault_message(err)}"
        ) from err


def enable_cbt(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    timeout: float = 600.0,
    stun_snapshot_name: str = "stillpoint-cbt-enable",
) -> bool:
    """Turn CBT on; False if it already was. Refused (UsageError) while the VM has
    snapshots: ESXi only starts tracking on a disk opened afresh, so a snapshot
    create+remove (the "stun cycle") follows the reconfiguration."""
    props = retrieve_one(session, vm, ["config.changeTrackingEnabled", "snapshot", "name"])
    if props.get("config.changeTrackingEnabled"):
        return False
    if props.get("snapshot") is not None and props["snapshot"].rootSnapshotList:
        raise UsageError(
            f"VM {props.get('name', vm._moId)} has snapshots; CBT can only be enabled on a VM "
            f"without snapshots: remove them first"
        )
    _switch_cbt(session, vm, True, stun_snapshot_name, timeout)
    return True


def _switch_cbt(session: VSphereSession, vm: vim.VirtualMachine, on: bool, stun_name: str,
                timeout: float) -> None:
    """changeTrackingEnabled on or off, then the stun cycle (a snapshot created and
    removed) after which ESXi reopens every disk with or without tracking."""
    what = f"{'enabling' if on else 'disabling'} CBT on {vm._moId}"
    try:
        task = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on))
    except vmodl.MethodFault as err:
        raise VSphereError(f"{what}: {fault_message(err)}") from err
    wait_for_task(session, task, timeout, what=what)
    stun = create_snapshot(session, vm, stun_name, f"CBT {'enable' if on else 'disable'} "
                           "stun cycle", quiesce=False, memory=False, timeout=timeout)
    remove_snapshot(session, stun, timeout=timeout)


def reset_cbt(
    session: VSphereSession,
    vm: vim.VirtualMachine,
    timeout: float = 600.0,
) -> None:
    """Reset CBT as VMware documents it (KB2139574): off, a stun cycle so that every disk is
    reopened without tracking, then on again (enable_cbt, with its own stun cycle). Every
    changeId of the VM is invalid afterwards: the next backup of each disk is a full. The VM
    must have no snapshots."""
    _switch_cbt(session, vm, False, "stillpoint-cbt-reset", timeout)
    enable_cbt(session, vm, timeout, stun_snapshot_name="stillpoint-cbt-reset-on")
