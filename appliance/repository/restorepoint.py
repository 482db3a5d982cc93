"""Restore point records: what the backup job committed, as stored (JSON in an envelope)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.errors import IntegrityError, NotFound
from appliance.repository import format as F


@dataclass
class WriteStats:
    """What a write did. `bytes_written_new` counts sealed bytes of chunks new to the
    repository (what the storage grew by, before pack overhead)."""

    bytes_in: int = 0           # bytes the caller passed to write()
    blocks_written: int = 0     # blocks hashed in this session
    blocks_new: int = 0         # ... of which were new chunks
    blocks_dedup: int = 0       # ... of which already existed (any VM, any restore point)
    blocks_hole: int = 0        # ... of which were all zeros (stored as holes)
    blocks_inherited: int = 0   # blocks taken unchanged from the base restore point
    bytes_new_raw: int = 0
    bytes_written_new: int = 0

    def add(self, other: WriteStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class DiskRecord:
    key: int
    label: str
    capacity: int
    change_id: str | None
    block_size: int
    map_chunks: list[bytes]
    stats: WriteStats = field(default_factory=WriteStats)

    @property
    def blocks(self) -> int:
        return -(-self.capacity // self.block_size)


@dataclass
class VmRef:
    """Which VM a restore point is of. A chain (the base of the next incremental, retention)
    is keyed by vCenter instance + VM instance UUID: clones share BIOS UUIDs, names repeat
    across folders, morefs repeat across vCenters. Points written before these fields were
    recorded fall back to the moref."""

    name: str
    moref: str = ""
    uuid: str = ""              # BIOS UUID (config.uuid): shown, never a key
    instance_uuid: str = ""     # config.instanceUuid, unique within a vCenter
    vcenter: str = ""           # the vCenter's about.instanceUuid
    folder: str = ""            # inventory path of the VM's folder, e.g. DC0/vm/prod

    def chain_key(self) -> str:
        if self.instance_uuid:
            return f"{self.vcenter}/{self.instance_uuid}"
        return f"{self.vcenter}/moref:{self.moref}" if self.moref else f"name:{self.name}"

    def is_vm(self, vcenter: str, instance_uuid: str, moref: str) -> bool:
        """Is this the VM so identified (a chain's own, never a clone or a namesake)?"""
        if self.vcenter and vcenter and self.vcenter != vcenter:
            return False
        if self.instance_uuid and instance_uuid:
            return self.instance_uuid == instance_uuid
        return bool(self.moref) and self.moref == moref


@dataclass
class RestorePoint:
    id: str
    vm: VmRef
    time: datetime
    consistency: str
    reasons: list[str]
    metadata: dict[str, Any]
    disks: list[DiskRecord]
    stats: WriteStats = field(default_factory=WriteStats)

    def disk(self, key: int) -> DiskRecord:
        for d in self.disks:
            if d.key == key:
                return d
        raise NotFound(f"restore point {self.id} has no disk with key {key}")

    def to_json(self) -> bytes:
        doc = {
            "version": F.FORMAT_VERSION,
            "id": self.id,
            "vm": asdict(self.vm),
            "time": self.time.astimezone(UTC).isoformat(),
            "consistency": self.consistency,
            "reasons": list(self.reasons),
            "metadata": self.metadata,
            "stats": asdict(self.stats),
            "disks": [{
                "key": d.key, "label": d.label, "capacity": d.capacity,
                "change_id": d.change_id, "block_size": d.block_size,
                "map": [c.hex() for c in d.map_chunks], "stats": asdict(d.stats),
            } for d in self.disks],
        }
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, what: str) -> RestorePoint:
        try:
            doc = json.loads(raw)
            if doc.get("version") not in F.SUPPORTED_VERSIONS:
                raise IntegrityError(f"{what}: unsupported restore point version {doc.get('version')}")
            return cls(
                id=doc["id"], vm=VmRef(**doc["vm"]), time=datetime.fromisoformat(doc["time"]),
                consistency=doc["consistency"], reasons=list(doc["reasons"]),
                metadata=doc["metadata"], stats=WriteStats(**doc.get("stats", {})),
                disks=[DiskRecord(
                    key=d["key"], label=d["label"], capacity=d["capacity"],
                    change_id=d["change_id"], block_size=d["block_size"],
                    map_chunks=[bytes.fromhex(c) for c in d["map"]],
                    stats=WriteStats(**d.get("stats", {}))) for d in doc["disks"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"{what}: malformed restore point ({err})") from err
