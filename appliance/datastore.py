"""What the vSphere layer and the transports both speak, so neither imports the other: a
virtual disk as a snapshot captured it, and a datastore file's address on vCenter's
`/folder/` HTTP interface."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode


@dataclass(frozen=True)
class SnapshotDisk:
    """One virtual disk as captured by a snapshot."""

    key: int  # device key (QueryChangedDiskAreas' deviceKey)
    label: str
    capacity: int  # bytes
    file_name: str  # "[datastore] dir/name.vmdk" of the point-in-time disk
    change_id: str | None  # CBT changeId at the snapshot, None when CBT is off
    datastore: str  # datastore name (dsName= on /folder/ URLs)
    datacenter: str  # datacenter inventory path (dcPath= on /folder/ URLs)
    vm_moref: str = ""  # the VM and snapshot it belongs to (VDDK opens disks by these)
    snapshot_moref: str = ""

    @property
    def path(self) -> str:
        """The file's path inside its datastore: 'dir/name.vmdk'."""
        return self.file_name.split("]", 1)[1].strip() if "]" in self.file_name else self.file_name


def folder_url(path: str, datacenter: str, datastore: str) -> str:
    """The request target of a datastore file: /folder/<path>?dcPath=..&dsName=.."""
    return f"/folder/{quote(path)}?" + urlencode({"dcPath": datacenter, "dsName": datastore})
