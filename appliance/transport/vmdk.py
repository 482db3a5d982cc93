"""Just enough of the VMDK descriptor format to find a disk's flat extent.

A descriptor is a small text file:
    # Disk DescriptorFile
    version=1
    createType="vmfs"
    # Extent description
    RW 2097152 VMFS "name-flat.vmdk"          (access, size in 512-byte sectors, type,
    RW 2097152 FLAT "name-flat.vmdk" 0         file, [offset in sectors])
Only single-extent FLAT/VMFS disks can be read as raw bytes over HTTP; sparse formats
(SPARSE, VMFSSPARSE, SESPARSE, monolithic "KDMV") need NBD/VDDK.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass

from appliance.errors import TransportError

__all__ = ["SECTOR", "VmdkExtent", "flat_extent", "is_descriptor", "parse_descriptor"]

SECTOR = 512
RAW_TYPES = {"FLAT", "VMFS"}
_EXTENT = re.compile(r"^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(.*)$")


@dataclass(frozen=True)
class VmdkExtent:
    access: str
    sectors: int
    kind: str
    file: str | None
    offset_sectors: int = 0


def is_descriptor(head: bytes) -> bool:
    return head.lstrip().startswith(b"# Disk DescriptorFile")


def parse_descriptor(text: str) -> list[VmdkExtent]:
    """The extent lines of a descriptor, in order."""
    out = []
    for line in text.splitlines():
        m = _EXTENT.match(line)
        if not m:
            continue
        rest = shlex.split(m.group(4))
        file = rest[0] if rest else None
        offset = int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else 0
        out.append(VmdkExtent(m.group(1), int(m.group(2)), m.group(3).upper(), file, offset))
    return out


def flat_extent(descriptor_path: str, text: str) -> tuple[str, int, int]:
    """(flat file path in the datastore, byte offset in it, size in bytes) of a
    single-extent raw disk; TransportError for anything else."""
    extents = parse_descriptor(text)
    if len(extents) != 1:
        raise TransportError(
            f"{descriptor_path}: {len(extents)} extents; only single-extent flat disks can be "
            f"read over datastore HTTP (use NBD)"
        )
    ext = extents[0]
    if ext.kind not in RAW_TYPES or not ext.file:
        raise TransportError(
            f"{descriptor_path}: {ext.kind} extent; only flat disks can be read over datastore "
            f"HTTP (use NBD)"
        )
    path = posixpath.join(posixpath.dirname(descriptor_path), ext.file)
    return path, ext.offset_sectors * SECTOR, ext.sectors * SECTOR
