"""Changed block tracking, the pure parts: changeIds, extent lists, paging, allocated areas.

changeId grammar (what `HostVM.snapshot_create` hands out and `cbt_query` takes):

    change_id := "*" | EPOCH "/" SEQ
    EPOCH     := 1*HEX            a random token; a CBT reset starts a new one
    SEQ       := 1*DIGIT          the snapshot's sequence number (never reused by a VM)

Bitmap `stillpoint-cbt-<SEQ>` (BITMAP_PREFIX) records the writes since snapshot SEQ, so
"changes since <EPOCH>/<k>" seen from snapshot m is the union of bitmaps k .. m-1.

An extent list is a list of `(offset, length)` pairs, sorted, non-overlapping, with
adjacent extents merged, every boundary a multiple of BLOCK (64 KiB: the bitmaps'
granularity and ESXi's CBT block), except that the last extent ends at the disk's capacity
when that is not a multiple of BLOCK.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BLOCK = 64 * 1024
BITMAP_PREFIX = "stillpoint-cbt-"
ALL = "*"
_CHANGE_ID = re.compile(r"^([0-9a-f]{1,32})/([0-9]{1,12})$")

Extent = tuple[int, int]


@dataclass(frozen=True)
class ChangeId:
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}/{self.seq}"


def parse_change_id(text: str) -> ChangeId | None:
    """`"<epoch>/<seq>"` → ChangeId; `"*"` → None; anything else → ValueError."""
    if text == ALL:
        return None
    m = _CHANGE_ID.match(text or "")
    if not m:
        raise ValueError(f"not a changeId: {text!r}")
    return ChangeId(m.group(1), int(m.group(2)))


def bitmap_name(seq: int) -> str:
    return f"{BITMAP_PREFIX}{seq}"


def bitmap_seq(name: str) -> int | None:
    """The sequence number of one of our bitmaps, None for anyone else's."""
    if not name.startswith(BITMAP_PREFIX):
        return None
    rest = name[len(BITMAP_PREFIX):]
    return int(rest) if rest.isdigit() else None


def align_out(offset: int, length: int, block: int = BLOCK) -> Extent:
    """The smallest block-aligned extent that covers [offset, offset+length)."""
    start = offset - offset % block
    end = offset + length
    end += -end % block
    return start, end - start


def merge(extents: Iterable[Extent], *, block: int = BLOCK, end: int | None = None,
          ) -> list[Extent]:
    """Sort, align out to `block`, and merge overlapping or adjacent extents; drops empty
    ones; clipped to `end` (a capacity that is not a multiple of the block) if given."""
    spans = sorted(align_out(o, n, block) for o, n in extents if n > 0)
    out: list[list[int]] = []
    for off, n in spans:
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    merged = [(o, n) for o, n in out]
    return merged if end is None else clip(merged, 0, end)


def clip(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """The parts of sorted extents inside [start, end)."""
    out = []
    for off, n in extents:
        lo, hi = max(off, start), min(off + n, end)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def window(start_offset: int, capacity: int, span_cap: int | None) -> tuple[int, int]:
    """The [start, end) one QueryChangedDiskAreas reply covers: at most `span_cap` bytes
    (rounded down to whole blocks, at least one block), never past the capacity."""
    if start_offset < 0 or start_offset >= capacity:
        raise ValueError(f"start offset {start_offset} outside the disk (capacity {capacity})")
    span = capacity - start_offset
    if span_cap is not None:
        span = min(span, max(BLOCK, span_cap - span_cap % BLOCK))
    return start_offset, start_offset + span


def page(extents: Iterable[Extent], start_offset: int, capacity: int,
         span_cap: int | None) -> dict[str, object]:
    """One reply: `{start_offset, length, areas}` for the window at `start_offset`,
    areas merged, aligned and clipped to the window and the capacity."""
    lo, hi = window(start_offset, capacity, span_cap)
    areas = clip(merge(extents), lo, hi)
    return {"start_offset": lo, "length": hi - lo, "areas": [[o, n] for o, n in areas]}


def allocated_extents(path: str | Path, start: int = 0, end: int | None = None) -> list[Extent]:
    """The data (non-hole) areas of a file in [start, end), by SEEK_DATA/SEEK_HOLE, merged
    and aligned out to BLOCK; a file system without SEEK_DATA reports everything."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if end is None else min(end, size)
        out: list[Extent] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:      # no data after pos
                    break
                if err.errno == errno.EINVAL:     # no SEEK_DATA: all of it is data
                    return merge([(start, end - start)]) if end > start else []
                raise
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, end) - data))
            pos = hole
        return clip(merge(out), start, end)
    finally:
        os.close(fd)


def union_from_block_status(per_context: dict[str, list[int]], offset: int,
                            dirty_flag: int = 1) -> tuple[list[Extent], int]:
    """Fold one NBD block-status reply (context name → [length, flags, length, flags, …],
    all starting at `offset`) into (dirty extents, covered length). The covered length is
    the shortest of the contexts' answers: past it some context said nothing yet."""
    covered: int | None = None
    dirty: list[Extent] = []
    for entries in per_context.values():
        pos = offset
        for i in range(0, len(entries) - 1, 2):
            length, flags = entries[i], entries[i + 1]
            if flags & dirty_flag:
                dirty.append((pos, length))
            pos += length
        covered = pos - offset if covered is None else min(covered, pos - offset)
    covered = covered or 0
    return clip(sorted(dirty), offset, offset + covered), covered
