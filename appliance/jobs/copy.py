"""Copy a snapshot's disks into a restore point: changed areas only, through a transport.

Per disk, the areas come from CBT: "*" (allocated areas) for a full; the areas changed
since the previous restore point's changeId for an incremental. A full is forced when there
is no previous restore point with this disk, the changeId's UUID part changed (CBT was
reset), the disk was resized, vSphere answers FileFault, or the caller asks for it. The
repository fills unwritten blocks from the base restore point, so every restore point is a
complete block map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from appliance.checkpoints import reached
from appliance.errors import VSphereError
from appliance.progress import Progress
from appliance.repository import RestorePoint, RestorePointWriter
from appliance.transport.base import DiskReader
from appliance.vsphere import cbt
from appliance.vsphere.session import VSphereSession
from appliance.datastore import SnapshotDisk
from appliance.vsphere.snapshots import SnapshotRef

log = logging.getLogger(__name__)


@dataclass
class DiskCopy:
    key: int
    label: str
    capacity: int
    mode: str              # "full" | "incremental"
    why: str               # why this mode
    areas: int
    bytes_changed: int     # sum of the CBT areas
    bytes_read: int        # what the transport read


def plan_areas(session: VSphereSession, vm: Any, snap: SnapshotRef, disk: SnapshotDisk,
               base: RestorePoint | None, force_full: bool) -> tuple[str, str, list[tuple[int, int]]]:
    """(mode, why, areas) for one disk."""
    previous = _base_disk(base, disk.key)
    if disk.change_id is None:
        raise VSphereError(f"disk {disk.label} has no changeId: CBT is off on this VM")
    why = None
    if force_full:
        why = "full backup requested"
    elif previous is None:
        why = "no previous restore point with this disk"
    elif previous.change_id is None or not cbt.same_epoch(previous.change_id, disk.change_id):
        why = "CBT was reset since the previous restore point (changeId UUID changed)"
    elif previous.capacity != disk.capacity:
        why = f"disk resized from {previous.capacity} to {disk.capacity} bytes"
    if why is None:
        assert previous is not None and previous.change_id is not None
        try:
            areas = cbt.changed_areas(session, vm, snap, disk.key, disk.capacity,
                                      previous.change_id)
            return "incremental", f"changes since {previous.change_id}", areas
        except cbt.CBTResetError as err:
            why = f"vSphere cannot answer for the previous changeId ({err})"
    return "full", why, cbt.changed_areas(session, vm, snap, disk.key, disk.capacity, "*")


def copy_disk(reader: DiskReader, rp: RestorePointWriter, disk: SnapshotDisk, mode: str,
              why: str, areas: list[tuple[int, int]], base: RestorePoint | None,
              progress: Progress) -> DiskCopy:
    """Read `areas` of the snapshot disk and write them into the restore point."""
    base_id = base.id if (base is not None and mode == "incremental") else None
    writer = rp.disk(disk.key, disk.label, disk.capacity, base=base_id)
    changed = sum(length for _, length in areas)
    task = f"disk{disk.key}"
    progress.start(task, f"{disk.label} ({mode})", changed)
    stream = reader.open(disk)
    try:
        for n, (offset, data) in enumerate(stream.read_extents(areas)):
            writer.write(offset, data)
            progress.advance(task, len(data))
            if n == 0:
                reached("copy-started")
        bytes_read = stream.bytes_read
    finally:
        stream.close()
    writer.finish(change_id=disk.change_id)
    progress.finish(task)
    return DiskCopy(disk.key, disk.label, disk.capacity, mode, why, len(areas), changed,
                    bytes_read)


def _base_disk(base: RestorePoint | None, key: int) -> Any:
    if base is None:
        return None
    return next((d for d in base.disks if d.key == key), None)
