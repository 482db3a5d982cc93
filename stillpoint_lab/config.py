"""The lab's shape and where its state lives.

A lab has an id (0-9, from STILLPOINT_LAB_ID, default 0) so that several labs can run side
by side: every name and address it creates is derived from the id here, so that `lab down`
can find and remove all of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
GO_SOURCES = REPO_ROOT / "tests" / "lab" / "vcsim"


@dataclass(frozen=True)
class DiskSpec:
    size_bytes: int            # a whole number of 512-byte sectors, as a virtual disk has

    @classmethod
    def mib(cls, n: int) -> DiskSpec:
        return cls(n << 20)


@dataclass(frozen=True)
class VMSpec:
    name: str
    folder: str = ""                              # below the datacenter's VM folder: "prod/db"
    guest_id: str = "debian12_64Guest"          # or e.g. "windows2019srv_64Guest"
    tools_running: bool = True
    # A Linux VM's disk 0 is the guest image (its size at least); more disks are data disks
    # (the first one is mounted on /data by the image).
    disks: tuple[DiskSpec, ...] = (DiskSpec.mib(4096), DiskSpec.mib(512))
    has_guest: bool = True                        # a QEMU VM booting the guest image
    # "" (auto): "qemu" for a VM with a guest, else "files"; "qemu" with has_guest=False: a
    # QEMU VM without an OS (its disks are whatever the caller puts in them: the bench's).
    hypervisor: str = ""
    apps: tuple[str, ...] = ("postgresql", "mariadb")
    memory_mib: int = 1024
    cpus: int = 2


@dataclass(frozen=True)
class LabConfig:
    lab_id: int = 0
    vms: tuple[VMSpec, ...] = (VMSpec("lab-vm1"),)
    user: str = "administrator@vsphere.local"
    cbt_span_cap_mib: int = 1024   # QueryChangedDiskAreas covers at most this much per reply
    datastore_type: str = ""       # "vsan": LocalDS_0 has no flat files over /folder/ (nfc.go)
    # Read once, when the config is made: a lab's names must not change under it.
    lab_root: str = field(default_factory=lambda: os.environ.get(
        "STILLPOINT_LAB_DIR", "/var/lib/stillpoint-lab"))

    # --- derived names: everything the lab creates is named from here -----------------
    @property
    def state_dir(self) -> Path:
        return Path(self.lab_root) / str(self.lab_id)

    @property
    def bridge(self) -> str:
        return f"spbr{self.lab_id}"

    @property
    def subnet_prefix(self) -> str:
        return f"10.77.{self.lab_id}"

    @property
    def host_ip(self) -> str:
        """The host's address on the lab bridge: guests reach the simulator here."""
        return f"{self.subnet_prefix}.1"

    def guest_ip(self, index: int) -> str:
        return f"{self.subnet_prefix}.{10 + index}"

    def netns(self, vm_name: str) -> str:
        return f"sp{self.lab_id}-{vm_name}"

    @property
    def profile_path(self) -> Path:
        return self.state_dir / "profile.json"


def lab_id_from_env() -> int:
    raw = os.environ.get("STILLPOINT_LAB_ID", "0")
    if not raw.isdigit() or not 0 <= int(raw) <= 9:
        raise UsageError(f"STILLPOINT_LAB_ID must be a digit 0-9, not {raw!r}")
    return int(raw)


def default_config(vms: int = 1, lab_id: int | None = None) -> LabConfig:
    """`vms` Linux guests lab-vm1..N, plus one Windows VM without a guest (lab-win1)."""
    specs = [VMSpec(f"lab-vm{i + 1}") for i in range(vms)]
    specs.append(
        VMSpec("lab-win1", guest_id="windows2019srv_64Guest", has_guest=False, apps=(),
               disks=(DiskSpec.mib(64),))
    )
    return LabConfig(lab_id=lab_id_from_env() if lab_id is None else lab_id, vms=tuple(specs))


__all__ = ["DiskSpec", "VMSpec", "LabConfig", "default_config", "lab_id_from_env", "field"]
