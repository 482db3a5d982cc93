"""Distrust CBT: re-read blocks CBT says did not change and compare them with the base.

Every Nth incremental of a VM (BackupOptions.cbt_verify_every), before a disk is copied, a
random sample of the blocks outside CBT's changed areas is read from the snapshot and
compared with the base restore point, which holds what those blocks were. They must be
equal; a block that differs is a write CBT missed (ESXi's CBT bugs, KB2090639 and
KB2136854, lost changes exactly so). Then the disk is copied in full in this very backup
(the snapshot is still open: the restore point is right), CBT is reset once the snapshot is
gone, and a vCenter event names the VM and the disk.

A sample can miss a wrong block; it cannot report a good disk as bad. The chance to catch
k wrong blocks among U unchanged ones with s samples is 1 - C(U-k, s) / C(U, s).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.transport.base import DiskReader
from appliance.datastore import SnapshotDisk

CHECK_KEY = "cbt_check"            # restore point metadata: {"since": incrementals unchecked}


@dataclass
class DiskVerification:
    key: int
    label: str
    sampled: int                   # blocks read from the snapshot and compared
    unchanged_blocks: int          # blocks CBT called unchanged (the population)
    mismatched: list[int] = field(default_factory=list)   # byte offsets that differ
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def describe(self) -> str:
        if self.ok:
            return (f"CBT verified: {self.sampled} of {self.unchanged_blocks} unchanged "
                    f"blocks re-read, all equal to the base")
        return (f"CBT was wrong: {len(self.mismatched)} of {self.sampled} blocks CBT called "
                f"unchanged differ from the base (first at offset {self.mismatched[0]})")


def due(base_metadata: dict[str, Any] | None, every: int) -> bool:
    """Is this incremental the Nth since the last check (or the last full)?"""
    if every <= 0:
        return False
    since = int(((base_metadata or {}).get(CHECK_KEY) or {}).get("since", 0))
    return since + 1 >= every


def next_count(base_metadata: dict[str, Any] | None, checked_or_full: bool) -> dict[str, int]:
    """This restore point's CHECK_KEY entry."""
    if checked_or_full:
        return {"since": 0}
    return {"since": int(((base_metadata or {}).get(CHECK_KEY) or {}).get("since", 0)) + 1}


def unchanged_blocks(capacity: int, block_size: int,
                     changed: list[tuple[int, int]]) -> list[int]:
    """Indexes of the blocks no changed area touches."""
    blocks = -(-capacity // block_size)
    touched = bytearray(blocks)
    for offset, length in changed:
        for index in range(offset // block_size, -(-(offset + length) // block_size)):
            touched[index] = 1
    return [i for i in range(blocks) if not touched[i]]


def verify_disk(reader: DiskReader, disk: SnapshotDisk, block_size: int,
                base_block: Callable[[int], bytes], changed: list[tuple[int, int]],
                sample: int, rng: random.Random | None = None) -> DiskVerification:
    started = time.monotonic()
    population = unchanged_blocks(disk.capacity, block_size, changed)
    chosen = sorted((rng or random.SystemRandom()).sample(population,
                                                         min(sample, len(population))))
    result = DiskVerification(disk.key, disk.label, len(chosen), len(population))
    stream = reader.open(disk)
    try:
        for index in chosen:
            offset = index * block_size
            length = min(block_size, disk.capacity - offset)
            if stream.read(offset, length) != base_block(index):
                result.mismatched.append(offset)
    finally:
        stream.close()
    result.seconds = round(time.monotonic() - started, 3)
    return result
