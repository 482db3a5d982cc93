"""A raw disk image as a streamOptimized VMDK: what an OVF import's NFC lease takes.

    size = write_stream_optimized(raw_path, capacity, out_path, advance)

ESXi accepts a disk through an import lease (`ImportVApp` + `HttpNfcLease`, the path that works
on every datastore type, vSAN and vVols included) only in this format: VMware's "Virtual Disk
Format 5.0", section "Stream-Optimized Compressed Sparse Extents". Layout, in 512-byte sectors:

    0        sparse extent header (gdOffset = GD_AT_END: the real one is in the footer)
    1..20    the embedded descriptor (createType "streamOptimized")
    128...   for each grain (64 KiB) that is not all zeros: a grain marker (its LBA, the
             compressed size) and the zlib-compressed grain, padded to a sector;
             after every 512 grains (32 MiB): a grain-table marker and the grain table
             (each entry: the sector of that grain's marker, 0 for a grain of zeros)
    end      grain-directory marker + directory, footer marker + footer (the header with the
             directory's offset), end-of-stream marker

Holes of the raw image (SEEK_DATA) and grains of zeros are not written, so a restored disk's
stream is about the size of its compressed data. Every grain table is written, also an empty
one: readers that expect a table per directory entry find one. Grains are compressed on a few
threads (zlib releases the GIL), in order.
"""

from __future__ import annotations

import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from appliance.errors import TransportError

SECTOR = 512
GRAIN_SECTORS = 128                      # 64 KiB grains, as VMware writes them
GRAIN = GRAIN_SECTORS * SECTOR
GTES_PER_GT = 512
GT_SECTORS = GTES_PER_GT * 4 // SECTOR   # 4
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
OVERHEAD_SECTORS = GRAIN_SECTORS         # header + descriptor, padded to a grain
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MAGIC = 0x564D444B                       # "KDMV"
FLAGS = 0x1 | 0x10000 | 0x20000          # valid newline test, compressed grains, markers
COMPRESS_DEFLATE = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
BATCH_GRAINS = 64                        # grains compressed together (4 MiB)
COMPRESS_LEVEL = 1                       # zlib's fastest: the network is the other limit

_HEADER = struct.Struct("<IIIQQQQIQQQB4sH433x")
assert _HEADER.size == SECTOR


def _header(capacity_sectors: int, gd_offset: int) -> bytes:
    return _HEADER.pack(MAGIC, 3, FLAGS, capacity_sectors, GRAIN_SECTORS, DESCRIPTOR_OFFSET,
                        DESCRIPTOR_SECTORS, GTES_PER_GT, 0, gd_offset, OVERHEAD_SECTORS, 0,
                        b"\n \r\n", COMPRESS_DEFLATE)


def _marker(value: int, kind: int) -> bytes:
    """A metadata marker: one sector, `value` = the sectors of what follows."""
    return struct.pack("<QII", value, 0, kind).ljust(SECTOR, b"\0")


def descriptor(capacity_sectors: int, adapter: str = "lsilogic") -> bytes:
    heads, sectors = 255, 63
    cylinders = min(65535, max(1, capacity_sectors // (heads * sectors)))
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={secrets.randbits(32):08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "disk.vmdk"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{sectors}"\n'
    ).encode()
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise AssertionError("descriptor larger than its sectors")
    return text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0")


def _data_ranges(f: BinaryIO, size: int) -> list[tuple[int, int]]:
    """(start, end) of the image's data, grain-aligned; the whole file if SEEK_DATA is not
    supported."""
    fd = f.fileno()
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole is left
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            start, end = start // GRAIN * GRAIN, -(-end // GRAIN) * GRAIN
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
            else:
                ranges.append((start, end))
            pos = end
    except (AttributeError, OSError):
        return [(0, -(-size // GRAIN) * GRAIN)]
    return ranges


def _grains(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    """(grain index, 64 KiB) of every grain that may hold data; the last one zero-padded."""
    for start, end in _data_ranges(f, size):
        f.seek(start)
        for off in range(start, min(end, size), GRAIN):
            data = f.read(GRAIN)
            if len(data) < GRAIN:
                if off + len(data) < size:
                    raise TransportError(f"the image ended at {off + len(data)} of {size} bytes")
                data = data.ljust(GRAIN, b"\0")
            yield off // GRAIN, data


def _batches(grains: Iterator[tuple[int, bytes]]) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for item in grains:
        batch.append(item)
        if len(batch) == BATCH_GRAINS:
            yield batch
            batch = []
    if batch:
        yield batch


_ZERO_GRAIN = bytes(GRAIN)


def _compress(item: tuple[int, bytes]) -> tuple[int, bytes | None]:
    index, data = item
    if data == _ZERO_GRAIN:
        return index, None
    return index, zlib.compress(data, COMPRESS_LEVEL)


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sector = 0

    def write(self, data: bytes) -> int:
        """Write sector-padded `data`; returns the sector it starts at."""
        at = self.sector
        pad = -len(data) % SECTOR
        self.out.write(data)
        if pad:
            self.out.write(b"\0" * pad)
        self.sector += (len(data) + pad) // SECTOR
        return at


def write_stream_optimized(source: Path, capacity: int, target: Path,
                           advance: Callable[[int], None] = lambda _n: None,
                           workers: int = 3) -> int:
    """Write the raw image `source` (`capacity` bytes, a whole number of sectors) to
    `target` as a streamOptimized VMDK; returns its size in bytes."""
    if capacity <= 0 or capacity % SECTOR:
        raise TransportError(f"a disk of {capacity} bytes is not a whole number of sectors")
    size = source.stat().st_size
    if size != capacity:
        raise TransportError(f"{source}: {size} bytes, the disk has {capacity}")
    capacity_sectors = capacity // SECTOR
    n_grains = -(-capacity // GRAIN)
    n_tables = -(-n_grains // GTES_PER_GT)
    directory = [0] * n_tables
    table = [0] * GTES_PER_GT
    table_index = 0
    done = 0

    with open(source, "rb") as src, open(target, "wb") as dst, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmdk-zlib") as pool:
        w = _Writer(dst)
        w.write(_header(capacity_sectors, GD_AT_END))
        w.write(descriptor(capacity_sectors))
        w.write(b"\0" * (OVERHEAD_SECTORS - w.sector) * SECTOR)

        def close_tables_before(index: int) -> None:
            nonlocal table, table_index
            while table_index < index // GTES_PER_GT:
                w.write(_marker(GT_SECTORS, MARKER_GT))
                directory[table_index] = w.write(struct.pack(f"<{GTES_PER_GT}I", *table))
                table = [0] * GTES_PER_GT
                table_index += 1

        for batch in _batches(_grains(src, capacity)):
            for index, packed in pool.map(_compress, batch):
                close_tables_before(index)
                if packed is not None:
                    lba = index * GRAIN_SECTORS
                    table[index % GTES_PER_GT] = w.write(
                        struct.pack("<QI", lba, len(packed)) + packed)
            covered = min(capacity, (batch[-1][0] + 1) * GRAIN)
            advance(covered - done)
            done = covered
        close_tables_before(n_tables * GTES_PER_GT)
        advance(capacity - done)

        gd_sectors = -(-n_tables * 4 // SECTOR)
        w.write(_marker(gd_sectors, MARKER_GD))
        gd_offset = w.write(struct.pack(f"<{n_tables}I", *directory))
        w.write(_marker(1, MARKER_FOOTER))
        w.write(_header(capacity_sectors, gd_offset))
        w.write(_marker(0, MARKER_EOS))
        dst.flush()
        os.fsync(dst.fileno())
        return w.sector * SECTOR
