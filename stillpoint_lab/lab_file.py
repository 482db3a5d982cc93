"""A lab described in a file: `stillpoint-lab up --config lab.toml`.

    # Every [[vm]] table is one VM; only `name` is required.
    [[vm]]
    name = "Datenbank Müller 1"      # vSphere's names: up to 80 characters, spaces, any script
    folder = "prod/db"               # below the datacenter's VM folder (default: the folder)
    guest = true                     # a QEMU VM booting the lab's Debian image (default);
                                     # false: a VM without an OS (its disks are plain files)
    disks = ["4 GiB", "512 MiB"]     # byte counts or sizes with a unit (B, KiB, MiB, GiB,
                                     # TiB; K, M, G, T mean the same); whole 512-byte sectors
    memory_mib = 1024
    cpus = 2
    apps = ["postgresql", "mariadb"] # the guest's databases the lab waits for
    guest_id = "debian12_64Guest"

A guest VM's first disk holds the guest image (it is made at least that large); its second
is mounted on /data. Errors name the file, the VM and the key, and exit 2.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from appliance.errors import UsageError
from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec

SECTOR = 512
MAX_GUESTS = 8                  # addresses and taps per lab
VM_NAME_MAX = 80                # vSphere's limit
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")
_KEYS = {"name", "folder", "guest", "disks", "memory_mib", "cpus", "apps", "guest_id"}
_APPS = {"postgresql", "mariadb"}


def parse_size(value: Any, where: str) -> int:
    """Bytes from an integer or a string such as "512 MiB"."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: a disk size is a number of bytes or e.g. \"4 GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m[2].lower() in _UNITS:
        size = int(m[1]) * _UNITS[m[2].lower()]
    else:
        raise UsageError(f"{where}: {value!r} is not a size (bytes, or e.g. \"512 MiB\")")
    if size <= 0 or size % SECTOR:
        raise UsageError(f"{where}: {value!r} must be a positive number of whole "
                         f"{SECTOR}-byte sectors")
    return size


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: name must be a non-empty string")
    if value != value.strip() or not value.isprintable() or len(value) > VM_NAME_MAX:
        raise UsageError(f"{where}: name {value!r} must be at most {VM_NAME_MAX} printable "
                         "characters without leading or trailing spaces")
    if bad := sorted(set(value) & set("/[]")):
        # vSphere keeps a "/" in a name as %2f; brackets delimit datastore paths.
        raise UsageError(f"{where}: name {value!r}: {' '.join(bad)} in a VM name is not "
                         "supported by the lab")
    return value


def _folder(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: folder must be a string such as \"prod/db\"")
    parts = value.strip("/").split("/") if value.strip("/") else []
    if any(not p.strip() or p != p.strip() or not p.isprintable() for p in parts):
        raise UsageError(f"{where}: folder {value!r} has an empty or unprintable part")
    return "/".join(parts)


def _vm(doc: Any, where: str) -> VMSpec:
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: each [[vm]] must be a table")
    if unknown := sorted(set(doc) - _KEYS):
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_KEYS))})")
    if "name" not in doc:
        raise UsageError(f"{where}: a VM needs a name")
    name = _name(doc["name"], where)
    where = f"{where} ({name})"
    guest = doc.get("guest", True)
    if not isinstance(guest, bool):
        raise UsageError(f"{where}: guest must be true or false")
    defaults = VMSpec(name)
    raw_disks = doc.get("disks")
    if raw_disks is None:
        disks = defaults.disks if guest else (DiskSpec.mib(64),)
    elif isinstance(raw_disks, list) and raw_disks:
        disks = tuple(DiskSpec(parse_size(d, f"{where}: disks[{i}]"))
                      for i, d in enumerate(raw_disks))
    else:
        raise UsageError(f"{where}: disks must be a non-empty list of sizes")
    apps = doc.get("apps", list(defaults.apps) if guest else [])
    if not isinstance(apps, list) or not set(apps) <= _APPS:
        raise UsageError(f"{where}: apps must be a list of {', '.join(sorted(_APPS))}")
    if apps and not guest:
        raise UsageError(f"{where}: apps need a guest (guest = true)")
    ints = {}
    for key, low, high in (("memory_mib", 256, 16384), ("cpus", 1, 8)):
        value = doc.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UsageError(f"{where}: {key} must be an integer from {low} to {high}")
        ints[key] = value
    guest_id = doc.get("guest_id", defaults.guest_id)
    if not isinstance(guest_id, str) or not guest_id:
        raise UsageError(f"{where}: guest_id must be a vSphere guest id such as "
                         "\"debian12_64Guest\"")
    return VMSpec(name, folder=_folder(doc.get("folder", ""), where), guest_id=guest_id,
                  disks=disks, has_guest=guest, apps=tuple(apps),
                  memory_mib=ints["memory_mib"], cpus=ints["cpus"])


def load_lab_file(path: Path, lab_id: int) -> LabConfig:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"lab file {path}: {err.strerror or err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"lab file {path}: not valid TOML: {err}") from err
    if unknown := sorted(set(doc) - {"vm"}):
        raise UsageError(f"lab file {path}: unknown table(s) {', '.join(unknown)} "
                         "(a lab file has [[vm]] tables)")
    tables = doc.get("vm")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"lab file {path}: no [[vm]] table")
    vms = tuple(_vm(t, f"{path}: vm {i + 1}") for i, t in enumerate(tables))
    names = [v.name for v in vms]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"lab file {path}: VM name(s) used twice: {', '.join(dupes)}")
    if (guests := sum(v.has_guest for v in vms)) > MAX_GUESTS:
        raise UsageError(f"lab file {path}: {guests} guest VMs; a lab runs at most {MAX_GUESTS}")
    return LabConfig(lab_id=lab_id, vms=vms)
