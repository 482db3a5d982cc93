"""Read dirty bitmaps that QEMU's NBD server exports, with libnbd.

An NBD export made with `block-export-add ... bitmaps=[A, B]` offers the metadata contexts
`qemu:dirty-bitmap:A` and `qemu:dirty-bitmap:B`; NBD_CMD_BLOCK_STATUS then answers, per
context, runs of (length, flags) where flag bit 0 means dirty. One request covers at most
what the server chooses to answer (and never more than 4 GiB), so `dirty_extents` loops.

Debian's `python3-libnbd` (`import nbd`) is imported lazily: it exists only for the system
Python (the lab venv sees it through system site packages).
"""

from __future__ import annotations

import contextlib
from typing import Any

from stillpoint_lab.qemu.cbt import Extent, merge, union_from_block_status

CONTEXT_PREFIX = "qemu:dirty-bitmap:"
MAX_REQUEST = 1 << 31   # below NBD's 32-bit length limit, block aligned


class NBDBitmapError(Exception):
    """libnbd failed, or the export lacks one of the bitmaps."""


def dirty_extents(socket_path: str, export: str, bitmaps: list[str], start: int,
                  end: int) -> list[Extent]:
    """The union of the named bitmaps' dirty areas in [start, end), merged, 64 KiB aligned."""
    try:
        import nbd  # type: ignore[import-not-found]
    except ImportError as err:  # pragma: no cover - environment problem
        raise NBDBitmapError("python3-libnbd (import nbd) is not installed") from err
    contexts = [CONTEXT_PREFIX + b for b in bitmaps]
    h = nbd.NBD()
    try:
        h.set_export_name(export)
        for ctx in contexts:
            h.add_meta_context(ctx)
        h.connect_unix(socket_path)
        for ctx in contexts:
            if not h.can_meta_context(ctx):
                raise NBDBitmapError(f"export {export!r} does not offer {ctx}")
        end = min(end, h.get_size())
        out: list[Extent] = []
        pos = start
        while pos < end:
            count = min(end - pos, MAX_REQUEST)
            reply: dict[str, list[int]] = {}

            def collect(ctx: str, offset: int, entries: list[int], err: Any,
                        reply: dict[str, list[int]] = reply) -> int:
                reply.setdefault(ctx, []).extend(entries)
                return 0

            h.block_status(count, pos, collect)
            missing = [c for c in contexts if c not in reply]
            if missing:
                raise NBDBitmapError(f"no block status for {missing} at offset {pos}")
            dirty, covered = union_from_block_status(reply, pos)
            if covered <= 0:
                raise NBDBitmapError(f"empty block status reply at offset {pos}")
            out.extend(dirty)
            pos += min(covered, count)
        return merge(out, end=end)
    except nbd.Error as err:
        raise NBDBitmapError(f"NBD {socket_path} {export!r}: {err}") from err
    finally:
        with contextlib.suppress(Exception):   # a connection that never opened
            h.shutdown()
        del h  # libnbd 1.14 has no close(): dropping the handle closes it
