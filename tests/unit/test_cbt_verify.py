"""Distrusting CBT: the sample, the comparison, and when it is due (issue 13, item 4)."""

from __future__ import annotations

import random
from typing import Any

from appliance.jobs import cbt_verify
from appliance.datastore import SnapshotDisk

MIB = 1 << 20


class Stream:
    def __init__(self, image: bytearray) -> None:
        self.image, self.reads = image, []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        return bytes(self.image[offset:offset + length])

    def close(self) -> None:
        pass


class Reader:
    def __init__(self, image: bytearray) -> None:
        self.stream = Stream(image)

    def open(self, disk: Any) -> Stream:
        return self.stream


def disk(capacity: int) -> SnapshotDisk:
    return SnapshotDisk(key=2000, label="Hard disk 1", capacity=capacity,
                        file_name="[ds] x/x.vmdk", change_id="52 aa/3", datastore="ds",
                        datacenter="DC0")


def test_unchanged_blocks_leave_out_every_block_an_area_touches() -> None:
    changed = [(0, 10), (3 * MIB - 1, 2)]      # touches block 0, and blocks 2 and 3
    assert cbt_verify.unchanged_blocks(6 * MIB, MIB, changed) == [1, 4, 5]
    assert cbt_verify.unchanged_blocks(MIB + 1, MIB, []) == [0, 1]   # a short last block


def test_a_write_cbt_missed_is_found_and_named() -> None:
    base = bytearray(random.Random(1).randbytes(16 * MIB))
    now = bytearray(base)
    now[5 * MIB:5 * MIB + 10] = b"X" * 10         # changed: CBT says so
    now[9 * MIB + 7] ^= 0xFF                      # changed: CBT missed it
    changed = [(5 * MIB, 10)]
    reader = Reader(now)
    check = cbt_verify.verify_disk(reader, disk(16 * MIB), MIB,
                                   lambda i: bytes(base[i * MIB:(i + 1) * MIB]), changed, 100)
    assert not check.ok and check.mismatched == [9 * MIB]
    assert check.sampled == check.unchanged_blocks == 15       # all of them: 100 > 15
    assert 5 * MIB not in reader.stream.reads                  # changed areas are not sampled
    assert "1 of 15 blocks CBT called unchanged differ" in check.describe()


def test_a_right_cbt_passes_whatever_the_sample() -> None:
    base = bytearray(random.Random(2).randbytes(8 * MIB))
    now = bytearray(base)
    now[2 * MIB:3 * MIB] = bytes(MIB)
    for seed in range(5):
        check = cbt_verify.verify_disk(Reader(now), disk(8 * MIB), MIB,
                                       lambda i: bytes(base[i * MIB:(i + 1) * MIB]),
                                       [(2 * MIB, MIB)], 3, random.Random(seed))
        assert check.ok and check.sampled == 3 and check.unchanged_blocks == 7


def test_the_check_is_due_every_nth_incremental() -> None:
    meta: dict[str, Any] | None = None        # after a full: since = 0
    meta = {cbt_verify.CHECK_KEY: cbt_verify.next_count(meta, checked_or_full=True)}
    seen = []
    for _ in range(7):
        due = cbt_verify.due(meta, every=3)
        seen.append(due)
        meta = {cbt_verify.CHECK_KEY: cbt_verify.next_count(meta, checked_or_full=due)}
    assert seen == [False, False, True, False, False, True, False]
    assert not cbt_verify.due({}, every=0)
    assert cbt_verify.due({}, every=1)
