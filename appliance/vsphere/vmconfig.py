"""A JSON-able dump of a VM's configuration, kept with each restore point.

Enough to re-create the VM in a full-VM restore: guest OS, firmware, CPU, memory, every
device (disks, NICs, controllers, ...) serialized generically from its vmodl data object
with its type name under "_type", and extraConfig minus anything that looks like a secret
and minus guestinfo.* (runtime guest state, often cloud-init data with credentials).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

from pyVmomi.VmomiSupport import DataObject, ManagedObject

__all__ = ["CONFIG_FORMAT", "RESTORABLE_EXTRA_CONFIG", "config_dump", "is_secret_key",
           "restorable_extra_config", "to_jsonable"]

CONFIG_FORMAT = 1
_SECRET = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|credential|private|\bkey\b|_key\b|\.key\b)", re.IGNORECASE
)


# What a VM re-created from a restore point takes from the saved extraConfig: settings that
# are the VM's configuration (hardening, tools and time sync, NUMA and CPU features, hot
# add, scheduling shares), by key prefix. Everything else stays behind, above all what is
# the source's identity or placement on a real vCenter: viv.moid (a token vCenter issued for
# the source), eam.* (ESX Agent Manager), sched.swap.derivedName (the source's path), nvram,
# migrate.*, scsi*.sasWWID, pciBridge*.pciSlotNumber, featMask.*, *.ctkFileName, and
# Stillpoint's own restore marks (stillpoint.*), which each restore sets afresh.
RESTORABLE_EXTRA_CONFIG = (
    "isolation.", "tools.", "time.synchronize.", "numa.", "cpuid.", "hypervisor.cpuid.",
    "vhv.", "vpmc.", "svga.", "mks.", "RemoteDisplay.", "keyboard.", "disk.EnableUUID",
    "devices.hotplug", "vcpu.hotadd", "mem.hotadd", "sched.mem.", "sched.cpu.",
    "log.keepOld", "log.rotateSize", "monitor_control.", "smbios.reflectHost",
)


def restorable_extra_config(extra: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(kept, left behind) of a saved extraConfig for a VM re-created from it."""
    kept = {k: v for k, v in extra.items() if k.startswith(RESTORABLE_EXTRA_CONFIG)}
    return kept, sorted(k for k in extra if k not in kept)


def is_secret_key(key: str) -> bool:
    """True for extraConfig keys that must not be copied into a restore point."""
    return key.lower().startswith("guestinfo.") or bool(_SECRET.search(key))


def to_jsonable(value: Any, depth: int = 0) -> Any:
    """vmodl data objects, managed object refs, lists, enums, datetimes -> JSON types."""
    if depth > 12:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, ManagedObject):
        return {"_moref": value._moId, "_type": type(value).__name__}
    if isinstance(value, DataObject):
        out: dict[str, Any] = {"_type": type(value).__name__}
        for prop in value._GetPropertyList():
            if prop.name in ("dynamicType", "dynamicProperty"):
                continue
            v = getattr(value, prop.name, None)
            if v is None or (isinstance(v, list) and not v):
                continue
            out[prop.name] = to_jsonable(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, depth + 1) for v in value]
    return str(value)


def config_dump(session: Any, props: dict[str, Any], devices: list[Any]) -> dict[str, Any]:
    """The restore-relevant configuration from a vm_info() property read."""
    hw = props.get("config.hardware")
    extra = {
        o.key: str(o.value)
        for o in props.get("config.extraConfig") or []
        if not is_secret_key(o.key)
    }
    return {
        "format": CONFIG_FORMAT,
        "name": props.get("name"),
        "guestId": props.get("config.guestId"),
        "firmware": props.get("config.firmware"),
        "uuid": props.get("config.uuid"),
        "instanceUuid": props.get("config.instanceUuid"),
        "numCPU": getattr(hw, "numCPU", None),
        "numCoresPerSocket": getattr(hw, "numCoresPerSocket", None),
        "memoryMB": getattr(hw, "memoryMB", None),
        "devices": [to_jsonable(d) for d in devices],
        "extraConfig": extra,
    }
