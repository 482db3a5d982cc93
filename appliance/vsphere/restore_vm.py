"""Re-create a VM from the configuration saved with a restore point, and fill its disks.

    spec = build_config_spec(saved_config, name=..., datastore=..., network_map=...)
    vm = create_vm(session, spec, placement)          # CreateVM_Task
    for each disk: upload_disk(session, DatastoreFile, local raw file)   # datastore PUT
    set_extra_config(session, vm, {"guestinfo.stillpoint.restore": marker})
    power_on(session, vm)
    destroy_vm(session, vm)                            # on failure: never a half-made VM

The saved config (vmconfig.config_dump) holds every device with its vmodl type name under
"_type". Only what a new VM needs is rebuilt: storage controllers, disks (new files on the
target datastore), NICs (network mapped, MAC regenerated unless kept), guest OS, CPU,
memory, firmware, non-secret extraConfig. Default devices (IDE, PS/2, PCI, SIO, keyboard,
video, VMCI) are made by vSphere itself.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from appliance.errors import NotFound, TransportError, UsageError, VSphereError
from appliance.datastore import folder_url
from appliance.vsphere.names import datastore_folder, display_name, escape_name
from appliance.vsphere.props import retrieve_one, view_properties
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.tasks import wait_for_task
from appliance.vsphere.vmconfig import restorable_extra_config

__all__ = [
    "DatastoreFile",
    "Placement",
    "RestoredDisk",
    "build_config_spec",
    "create_vm",
    "destroy_vm",
    "find_placement",
    "find_vm_by_name",
    "flat_of",
    "hash_datastore_file",
    "power_off",
    "power_on",
    "rename_vm",
    "set_extra_config",
    "sha256_file",
    "upload_disk",
    "vm_disks",
    "vm_extra_config",
    "vm_power_state",
]

TASK_TIMEOUT_S = 600
UPLOAD_PIECE = 4 << 20
# Controllers the new VM needs for its disks; everything else default is made by vSphere.
_CONTROLLERS = (
    "ParaVirtualSCSIController",
    "VirtualLsiLogicController",
    "VirtualLsiLogicSASController",
    "VirtualBusLogicController",
    "VirtualAHCIController",
    "VirtualNVMEController",
)
_NICS = (
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualVmxnet3",
    "VirtualVmxnet2",
    "VirtualPCNet32",
    "VirtualVmxnet",
)


@dataclass(frozen=True)
class Placement:
    datacenter: Any
    datacenter_name: str
    folder: Any
    pool: Any
    host: Any | None
    datastore: str


@dataclass(frozen=True)
class DatastoreFile:
    datacenter: str
    datastore: str
    path: str  # inside the datastore, e.g. "vm/vm-flat.vmdk"


@dataclass
class RestoredDisk:
    key: int  # the device key in the saved config
    label: str
    capacity: int
    file_name: str  # "[ds] vm/vm.vmdk" of the new VM
    flat: DatastoreFile | None = None
    sha256: str = ""
    bytes_sent: int = 0
    verified: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _vtype(name: str) -> Any:
    short = name.rsplit(".", 1)[-1]
    try:
        return VmomiSupport.GetVmodlType(
            name if name.startswith("vim.") else f"vim.vm.device.{short}"
        )
    except (AttributeError, KeyError) as err:
        raise UsageError(f"saved VM config has an unknown device type {name}") from err


def _short(dev: dict[str, Any]) -> str:
    return str(dev.get("_type", "")).rsplit(".", 1)[-1]


def build_config_spec(
    saved: dict[str, Any],
    *,
    name: str,
    datastore: str,
    network_map: dict[str, str] | None = None,
    disconnect_nics: bool = False,
    keep_identity: bool = False,
    extra_config: dict[str, str] | None = None,
) -> tuple[vim.vm.ConfigSpec, list[RestoredDisk]]:
    """The CreateVM spec for `name` on `datastore`, and the disks it will have. A new VM gets
    new BIOS and instance UUIDs and MACs (vSphere generates them); `keep_identity` keeps the
    saved ones (an in-place restore, or --keep-identity). Of the saved extraConfig only the
    allow-list vmconfig.RESTORABLE_EXTRA_CONFIG is taken."""
    if not saved or "devices" not in saved:
        raise UsageError("the restore point holds no VM configuration (vm_config)")
    network_map = network_map or {}
    folder = datastore_folder(name)
    spec = vim.vm.ConfigSpec(
        name=escape_name(name),
        guestId=saved.get("guestId") or "otherGuest64",
        numCPUs=int(saved.get("numCPU") or 1),
        memoryMB=int(saved.get("memoryMB") or 1024),
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {folder}/{folder}.vmx"),
    )
    if saved.get("numCoresPerSocket"):
        spec.numCoresPerSocket = int(saved["numCoresPerSocket"])
    if saved.get("firmware"):
        spec.firmware = saved["firmware"]
    if keep_identity:
        if saved.get("uuid"):
            spec.uuid = saved["uuid"]
        if saved.get("instanceUuid"):
            spec.instanceUuid = saved["instanceUuid"]
    changes: list[Any] = []
    disks: list[RestoredDisk] = []
    devices = saved["devices"]
    for dev in devices:
        short = _short(dev)
        if short in _CONTROLLERS:
            ctl = _vtype(short)(key=int(dev["key"]), busNumber=int(dev.get("busNumber", 0)))
            if "sharedBus" in dev:
                ctl.sharedBus = dev["sharedBus"]
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=ctl))
    disk_no = 0
    for dev in devices:
        short = _short(dev)
        if short == "VirtualDisk":
            capacity = int(dev.get("capacityInBytes") or int(dev.get("capacityInKB", 0)) * 1024)
            file_name = (f"[{datastore}] {folder}/{folder}"
                         f"{'' if disk_no == 0 else f'_{disk_no}'}.vmdk")
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=file_name,
                diskMode=(dev.get("backing") or {}).get("diskMode") or "persistent",
                thinProvisioned=True,
            )
            disk = vim.vm.device.VirtualDisk(
                key=-(100 + disk_no),
                controllerKey=int(dev["controllerKey"]),
                unitNumber=int(dev.get("unitNumber", disk_no)),
                capacityInKB=capacity // 1024,
                capacityInBytes=capacity,
                backing=backing,
            )
            changes.append(
                vim.vm.device.VirtualDeviceSpec(
                    operation="add", fileOperation="create", device=disk
                )
            )
            label = (dev.get("deviceInfo") or {}).get("label") or f"Hard disk {disk_no + 1}"
            disks.append(RestoredDisk(int(dev["key"]), label, capacity, file_name))
            disk_no += 1
        elif short in _NICS:
            old = (dev.get("backing") or {}).get("deviceName", "")
            net = network_map.get(old, network_map.get("*", old))
            nic = _vtype(short)(
                key=-(200 + len(changes)),
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net),
            )
            if keep_identity and dev.get("macAddress"):
                nic.addressType, nic.macAddress = "manual", dev["macAddress"]
            else:
                nic.addressType = "generated"  # beside the original: never its MAC
            connected = not disconnect_nics
            nic.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=connected, connected=connected, allowGuestControl=True
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    spec.deviceChange = changes
    extra, _ = restorable_extra_config(dict(saved.get("extraConfig") or {}))
    extra.update(extra_config or {})
    spec.extraConfig = [
        vim.option.OptionValue(key=k, value=str(v)) for k, v in sorted(extra.items())
    ]
    return spec, disks


def _find_by_path(session: VSphereSession, path: str, kind: Any, what: str) -> Any:
    found = session.content.searchIndex.FindByInventoryPath(path.strip().lstrip("/"))
    if found is None or not isinstance(found, kind):
        raise NotFound(f"no {what} at inventory path {path}")
    return found


def find_placement(
    session: VSphereSession,
    *,
    source_vm: Any | None,
    datastore: str,
    folder: str | None = None,
    pool: str | None = None,
    host: str | None = None,
) -> Placement:
    """Where the new VM goes: explicit paths, else beside `source_vm`, else the first
    datacenter's VM folder and the first cluster's (or host's) root resource pool."""
    host_obj = None
    if host:
        host_obj = _find_by_path(session, host, vim.HostSystem, "host")
    if folder:
        folder_obj = _find_by_path(session, folder, vim.Folder, "folder")
    elif source_vm is not None:
        folder_obj = retrieve_one(session, source_vm, ["parent"]).get("parent")
    else:
        folder_obj = None
    if pool:
        pool_obj = _find_by_path(session, pool, vim.ResourcePool, "resource pool")
    elif host_obj is not None:
        pool_obj = retrieve_one(session, host_obj, ["parent"])["parent"].resourcePool
    elif source_vm is not None:
        pool_obj = retrieve_one(session, source_vm, ["resourcePool"]).get("resourcePool")
    else:
        pool_obj = None
    dcs = view_properties(
        session, session.content.rootFolder, vim.Datacenter, ["name", "vmFolder", "hostFolder"]
    )
    if not dcs:
        raise NotFound("vCenter has no datacenter")
    anchor = folder_obj or host_obj
    dc, dc_name = None, ""
    if anchor is not None:
        current: Any = anchor
        while current is not None and not isinstance(current, vim.Datacenter):
            current = retrieve_one(session, current, ["parent"]).get("parent")
        dc = current
    if dc is None:
        dc = min(dcs.values(), key=lambda p: p["name"])["obj"]
    dc_name = dcs[dc._moId]["name"]
    if folder_obj is None:
        folder_obj = dcs[dc._moId]["vmFolder"]
    if pool_obj is None:
        crs = view_properties(
            session, dcs[dc._moId]["hostFolder"], vim.ComputeResource, ["name", "resourcePool"]
        )
        if not crs:
            raise NotFound(f"datacenter {dc_name} has no cluster or host to run the VM")
        pool_obj = min(crs.values(), key=lambda p: p["name"])["resourcePool"]
    return Placement(dc, dc_name, folder_obj, pool_obj, host_obj, datastore)


def find_vm_by_name(session: VSphereSession, name: str) -> Any | None:
    for p in view_properties(
        session, session.content.rootFolder, vim.VirtualMachine, ["name"]
    ).values():
        if name in (p.get("name"), display_name(p.get("name") or "")):
            return p["obj"]
    return None


def create_vm(session: VSphereSession, spec: vim.vm.ConfigSpec, where: Placement) -> Any:
    try:
        task = where.folder.CreateVM_Task(config=spec, pool=where.pool, host=where.host)
    except vmodl.MethodFault as err:
        raise VSphereError(f"creating VM {spec.name} failed: "
                          f"{getattr(err, 'msg', '') or err}") from err
    return wait_for_task(session, task, TASK_TIMEOUT_S, f"create VM {spec.name}")


def vm_power_state(session: VSphereSession, vm: Any) -> str:
    return str(retrieve_one(session, vm, ["runtime.powerState"]).get("runtime.powerState", ""))


def vm_exists(session: VSphereSession, vm: Any) -> bool:
    """False once vCenter no longer knows the VM (destroyed, or an aborted import)."""
    try:
        retrieve_one(session, vm, ["name"])
    except NotFound:
        return False
    return True


def vm_extra_config(session: VSphereSession, vm: Any) -> dict[str, str]:
    opts = retrieve_one(session, vm, ["config.extraConfig"]).get("config.extraConfig") or []
    return {o.key: str(o.value) for o in opts}


def vm_disks(session: VSphereSession, vm: Any) -> list[tuple[int, str, int]]:
    """(key, "[ds] path.vmdk", capacity) of each disk of `vm`, in device order."""
    hw = retrieve_one(session, vm, ["config.hardware"]).get("config.hardware")
    return [
        (d.key, getattr(d.backing, "fileName", ""),
         int(d.capacityInBytes or d.capacityInKB * 1024))
        for d in (hw.device if hw else [])
        if isinstance(d, vim.vm.device.VirtualDisk) and hasattr(d.backing, "fileName")
    ]


def _call_task(
    session: VSphereSession, method: Callable[..., Any], what: str, **kwargs: Any
) -> Any:
    try:
        task = method(**kwargs)
    except vmodl.MethodFault as err:
        raise VSphereError(f"{what} failed: {getattr(err, 'msg', '') or err}") from err
    return wait_for_task(session, task, TASK_TIMEOUT_S, what)


def set_extra_config(session: VSphereSession, vm: Any, values: dict[str, str]) -> None:
    spec = vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in sorted(values.items())]
    )
    _call_task(session, vm.ReconfigVM_Task, "setting extraConfig", spec=spec)


def power_on(session: VSphereSession, vm: Any) -> None:
    if vm_power_state(session, vm) != "poweredOn":
        _call_task(session, vm.PowerOnVM_Task, "power on")


def power_off(session: VSphereSession, vm: Any) -> None:
    if vm_power_state(session, vm) == "poweredOn":
        _call_task(session, vm.PowerOffVM_Task, "power off")


def rename_vm(session: VSphereSession, vm: Any, name: str) -> None:
    _call_task(session, vm.Rename_Task, f"rename VM to {name}", newName=escape_name(name))


def destroy_vm(session: VSphereSession, vm: Any) -> None:
    """Power off and delete the VM with its files."""
    power_off(session, vm)
    _call_task(session, vm.Destroy_Task, "destroy VM")


# --- datastore HTTP upload and read-back --------------------------------------------------


def flat_of(file_name: str, datacenter: str) -> DatastoreFile:
    """'[ds] dir/name.vmdk' -> the flat extent's datastore file dir/name-flat.vmdk."""
    if not file_name.startswith("[") or "] " not in file_name:
        raise UsageError(f"not a datastore path: {file_name}")
    ds, path = file_name[1:].split("] ", 1)
    if not path.endswith(".vmdk"):
        raise UsageError(f"not a VMDK: {file_name}")
    return DatastoreFile(datacenter, ds, path[: -len(".vmdk")] + "-flat.vmdk")


def _conn(session: VSphereSession) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        session.host, session.port, context=session.ssl_context(), timeout=300
    )


def upload_disk(
    session: VSphereSession,
    target: DatastoreFile,
    source: Path,
    capacity: int,
    advance: Callable[[int], None] = lambda _n: None,
) -> str:
    """PUT the raw image `source` (exactly `capacity` bytes) to `target`; returns the
    SHA-256 of what was sent."""
    size = source.stat().st_size
    if size != capacity:
        raise TransportError(f"{source}: {size} bytes, the disk has {capacity}")
    digest = hashlib.sha256()
    session.ensure_logged_in()
    conn = _conn(session)
    url = folder_url(target.path, target.datacenter, target.datastore)
    try:
        conn.putrequest("PUT", url)
        conn.putheader("Cookie", session.cookie)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(capacity))
        conn.endheaders()
        with open(source, "rb") as f:
            while True:
                piece = f.read(UPLOAD_PIECE)
                if not piece:
                    break
                digest.update(piece)
                conn.send(piece)
                advance(len(piece))
        resp = conn.getresponse()
        body = resp.read()
        if resp.status not in (200, 201, 204):
            raise TransportError(
                f"PUT {target.path}: HTTP {resp.status} {body[:200].decode(errors='replace')}"
            )
    except (OSError, http.client.HTTPException) as err:
        raise TransportError(f"PUT {target.path} failed: {err}") from err
    finally:
        conn.close()
    return digest.hexdigest()


def hash_datastore_file(
    session: VSphereSession,
    target: DatastoreFile,
    length: int,
    advance: Callable[[int], None] = lambda _n: None,
) -> str:
    """SHA-256 of the first `length` bytes of a datastore file, read back over HTTP."""
    digest = hashlib.sha256()
    conn = _conn(session)
    url = folder_url(target.path, target.datacenter, target.datastore)
    try:
        conn.request(
            "GET", url, headers={"Cookie": session.cookie, "Range": f"bytes=0-{length - 1}"}
        )
        resp = conn.getresponse()
        if resp.status not in (200, 206):
            raise TransportError(f"GET {target.path}: HTTP {resp.status}")
        got = 0
        while got < length:
            piece = resp.read(min(UPLOAD_PIECE, length - got))
            if not piece:
                break
            digest.update(piece)
            got += len(piece)
            advance(len(piece))
        if got != length:
            raise TransportError(f"GET {target.path}: {got} bytes, expected {length}")
    except (OSError, http.client.HTTPException) as err:
        raise TransportError(f"reading back {target.path} failed: {err}") from err
    finally:
        conn.close()
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(UPLOAD_PIECE), b""):
            digest.update(piece)
    return digest.hexdigest()
