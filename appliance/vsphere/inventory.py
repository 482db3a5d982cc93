"""Find VMs and read what a backup needs to know about them.

Selectors: a moref ("vm-42"), an inventory path ("DC0/vm/folder/name", as vSphere's
SearchIndex spells it, a leading "/" allowed), or a name (must be unique: an ambiguous name
is a UsageError listing each candidate's moref and path). Folders select every VM below
them; tags need the vSphere Automation REST API (see tags.py).

`vm_info()` reads, in one PropertyCollector round trip, only the properties listed in
VM_PATHS; `VMInfo.config` is a JSON-able dump of the hardware for a later full-VM restore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Iterable
from typing import Any

from pyVmomi import vim, vmodl

from appliance.errors import NotFound, UsageError, VSphereError
from appliance.vsphere.names import display_name
from appliance.vsphere.props import retrieve, retrieve_one, view_properties
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.vmconfig import config_dump

__all__ = [
    "VM_PATHS",
    "DiskInfo",
    "SnapshotInfo",
    "VMInfo",
    "OBJECT_DATASTORE_TYPES",
    "datacenter_of",
    "datastore_types",
    "find_vm",
    "find_vms_in_folder",
    "flatten_snapshots",
    "inventory_path",
    "vm_info",
]

MOREF_RE = re.compile(r"^vm-\d+$")

VM_PATHS = [
    "name",
    "config.uuid",
    "config.instanceUuid",
    "config.guestId",
    "config.firmware",
    "config.changeTrackingEnabled",
    "config.hardware",
    "config.extraConfig",
    "guest.toolsRunningStatus",
    "guest.ipAddress",
    "guest.hostName",
    "snapshot",
    "runtime.host",
    "runtime.powerState",
    "runtime.consolidationNeeded",
    "datastore",
    "network",
]


@dataclass(frozen=True)
class DiskInfo:
    key: int
    label: str
    capacity: int  # bytes
    file_name: str  # "[datastore] dir/name.vmdk"
    datastore: str
    change_id: str | None = None


@dataclass(frozen=True)
class SnapshotInfo:
    moref: str
    name: str
    description: str
    create_time: datetime | None
    parent: str | None  # the parent snapshot's moref


@dataclass(frozen=True)
class VMInfo:
    moref: str
    name: str
    uuid: str
    instance_uuid: str
    guest_id: str
    tools_running: bool
    tools_running_status: str
    ip_address: str | None
    host_name: str | None
    cbt_enabled: bool
    power_state: str
    consolidation_needed: bool
    host: str | None  # host moref
    datastores: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    disks: list[DiskInfo] = field(default_factory=list)
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    vm: Any = field(default=None, repr=False, compare=False)  # the vim.VirtualMachine


def datastore_of(file_name: str) -> str:
    """'[ds1] vm/disk.vmdk' -> 'ds1'."""
    m = re.match(r"^\[([^\]]+)\]", file_name or "")
    return m.group(1) if m else ""


# Datastores without flat files: vSAN ("vsan", vSAN Max "vsanD"), vVols ("VVOL") and PMEM keep
# disk data in objects, which /folder/ cannot read or write: only VDDK/NBD reads them, and
# only an import lease (NFC) writes them. Every other type (VMFS, NFS, NFS41, ...) has the
# flat extent beside the descriptor.
OBJECT_DATASTORE_TYPES = frozenset({"vsan", "vsanD", "VVOL", "PMEM"})


def datastore_types(session: VSphereSession) -> dict[str, str]:
    """summary.type ("VMFS", "NFS", "vsan", "VVOL", ...) of every datastore, by name."""
    return {str(p.get("name")): str(p.get("summary.type") or "")
            for p in view_properties(session, session.content.rootFolder, vim.Datastore,
                                     ["name", "summary.type"]).values()}


def _vm_by_moref(session: VSphereSession, moref: str) -> vim.VirtualMachine:
    vm = vim.VirtualMachine(moref, session.si._stub)
    try:
        retrieve_one(session, vm, ["name"])
    except NotFound as err:
        raise NotFound(f"no VM with moref {moref}") from err
    return vm


def inventory_path(session: VSphereSession, entity: vim.ManagedEntity) -> str:
    """The SearchIndex inventory path of an entity, e.g. 'DC0/vm/F0/DC0_H0_VM0'."""
    parts: list[str] = []
    root = session.content.rootFolder._moId
    current: Any = entity
    while current is not None and current._moId != root:
        props = retrieve_one(session, current, ["name", "parent"])
        parts.append(props["name"])
        current = props.get("parent")
    return "/".join(reversed(parts))


def folder_path(session: VSphereSession, vm: vim.VirtualMachine) -> str:
    """The inventory path of the folder a VM is in, e.g. 'DC0/vm/prod' ('' if unknown)."""
    path = inventory_path(session, vm)
    return path.rsplit("/", 1)[0] if "/" in path else ""


def datacenter_of(session: VSphereSession, entity: vim.ManagedEntity) -> vim.Datacenter:
    current: Any = entity
    while current is not None:
        if isinstance(current, vim.Datacenter):
            return current
        current = retrieve_one(session, current, ["parent"]).get("parent")
    raise NotFound(f"{entity._moId} is not inside a datacenter")


def find_vm(session: VSphereSession, selector: str) -> vim.VirtualMachine:
    """A VM by moref, inventory path or unique name."""
    selector = selector.strip()
    if not selector:
        raise UsageError("empty VM selector")
    if MOREF_RE.match(selector):
        return _vm_by_moref(session, selector)
    if "/" in selector:
        found = session.content.searchIndex.FindByInventoryPath(selector.lstrip("/"))
        if found is not None and not isinstance(found, vim.VirtualMachine):
            raise UsageError(f"{selector} is a {type(found).__name__.rsplit('.', 1)[-1]}, not a VM")
        if found is not None:
            return found
    # By name, as shown ("web/db") or as stored ("web%2fdb").
    matches = [
        p["obj"]
        for p in view_properties(
            session, session.content.rootFolder, vim.VirtualMachine, ["name"]
        ).values()
        if selector in (p.get("name"), display_name(p.get("name") or ""))
    ]
    if not matches:
        if "/" in selector:
            raise NotFound(f"no VM at inventory path {selector}, and none named so (in a "
                           "path, a \"/\" in a name is written %2f)")
        raise NotFound(f"no VM named {selector}")
    if len(matches) > 1:
        listing = ", ".join(
            f"{vm._moId} ({inventory_path(session, vm)})"
            for vm in sorted(matches, key=lambda v: v._moId)
        )
        raise UsageError(
            f"{len(matches)} VMs are named {selector}: {listing}; select one by moref or path"
        )
    return matches[0]


def find_vms_in_folder(session: VSphereSession, folder_path: str) -> list[vim.VirtualMachine]:
    """Every VM below a folder (recursively), sorted by name then moref."""
    found = session.content.searchIndex.FindByInventoryPath(folder_path.strip().lstrip("/"))
    if found is None:
        raise NotFound(f"no folder at inventory path {folder_path}")
    if not isinstance(found, (vim.Folder, vim.Datacenter)):
        raise UsageError(f"{folder_path} is not a folder")
    props = view_properties(session, found, vim.VirtualMachine, ["name", "config.template"])
    vms = [p for p in props.values() if not p.get("config.template", False)]
    return [p["obj"] for p in sorted(vms, key=lambda p: (p.get("name", ""), p["obj"]._moId))]


def flatten_snapshots(tree: Any) -> list[SnapshotInfo]:
    """The snapshot tree (vim.vm.SnapshotInfo or None) as a list, parents first."""
    out: list[SnapshotInfo] = []

    def walk(nodes: Any, parent: str | None) -> None:
        for node in nodes or []:
            out.append(
                SnapshotInfo(
                    node.snapshot._moId, node.name, node.description or "", node.createTime, parent
                )
            )
            walk(node.childSnapshotList, node.snapshot._moId)

    walk(getattr(tree, "rootSnapshotList", None), None)
    return out


def _names(session: VSphereSession, mors: list[Any]) -> list[str]:
    by_type: dict[type, list[Any]] = {}
    for m in mors:
        by_type.setdefault(type(m), []).append(m)
    names: dict[str, str] = {}
    for objs in by_type.values():
        for moid, p in retrieve(session, objs, ["name"]).items():
            names[moid] = p.get("name", moid)
    return [names.get(m._moId, m._moId) for m in mors]


def vm_info(session: VSphereSession, vm: vim.VirtualMachine) -> VMInfo:
    """What Stillpoint needs to know about a VM, in one property read (plus names)."""
    try:
        p = retrieve_one(session, vm, VM_PATHS)
    except NotFound as err:
        raise NotFound(f"VM {vm._moId} not found") from err
    hardware = p.get("config.hardware")
    devices = list(hardware.device) if hardware is not None else []
    ds_names = _names(session, list(p.get("datastore", [])))
    net_names = _names(session, list(p.get("network", [])))
    disks = [
        DiskInfo(
            key=d.key,
            label=d.deviceInfo.label if d.deviceInfo else str(d.key),
            capacity=int(d.capacityInBytes or d.capacityInKB * 1024),
            file_name=getattr(d.backing, "fileName", ""),
            datastore=datastore_of(getattr(d.backing, "fileName", "")),
            change_id=getattr(d.backing, "changeId", None) or None,
        )
        for d in devices
        if isinstance(d, vim.vm.device.VirtualDisk) and hasattr(d.backing, "fileName")
    ]
    tools = str(p.get("guest.toolsRunningStatus") or "guestToolsNotRunning")
    host = p.get("runtime.host")
    try:
        config = config_dump(session, p, devices)
    except (vmodl.MethodFault, AttributeError) as err:
        raise VSphereError(f"cannot read the configuration of VM {vm._moId}: {err}") from err
    return VMInfo(
        moref=vm._moId,
        name=display_name(p.get("name", "")),
        uuid=p.get("config.uuid", ""),
        instance_uuid=p.get("config.instanceUuid", ""),
        guest_id=p.get("config.guestId", ""),
        tools_running=tools == "guestToolsRunning",
        tools_running_status=tools,
        ip_address=p.get("guest.ipAddress") or None,
        host_name=p.get("guest.hostName") or None,
        cbt_enabled=bool(p.get("config.changeTrackingEnabled")),
        power_state=str(p.get("runtime.powerState", "")),
        consolidation_needed=bool(p.get("runtime.consolidationNeeded")),
        host=host._moId if host is not None else None,
        datastores=ds_names,
        networks=net_names,
        disks=disks,
        snapshots=flatten_snapshots(p.get("snapshot")),
        config=config,
        vm=vm,
    )


def resolve_targets(session: VSphereSession, targets: Iterable[str]) -> list[vim.VirtualMachine]:
    """VMs named by backup targets, each once, in order: a VM (name, inventory path or
    moref), `folder:<path>` (every VM below it) or `tag:<[category/]tag>`."""
    vms: list[vim.VirtualMachine] = []
    seen: set[str] = set()
    for target in targets:
        if target.startswith("folder:"):
            found = find_vms_in_folder(session, target[len("folder:"):])
        elif target.startswith("tag:"):
            from appliance.vsphere.tags import find_vms_by_tag  # the REST API, on demand

            found = find_vms_by_tag(session, target[len("tag:"):])
        else:
            found = [find_vm(session, target)]
        for vm in found:
            if vm._moId not in seen:
                seen.add(vm._moId)
                vms.append(vm)
    return vms
