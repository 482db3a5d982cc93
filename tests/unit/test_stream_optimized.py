"""streamOptimized VMDKs written by appliance/transport/stream_optimized.py, read back by an
independent reader: QEMU's (`qemu-img convert -f vmdk`), byte for byte, and checked by
`qemu-img check`."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from appliance.errors import TransportError
from appliance.transport import stream_optimized as so

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    # install-deps installs qemu-utils: a missing qemu-img is a broken set-up, not a skip.
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is missing (Debian's qemu-utils; make test installs it)")


def _image(path: Path, capacity: int, writes: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(capacity)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


def _roundtrip(tmp_path: Path, raw: Path, capacity: int) -> tuple[Path, int]:
    vmdk = tmp_path / "disk.vmdk"
    seen: list[int] = []
    size = so.write_stream_optimized(raw, capacity, vmdk, seen.append)
    assert size == vmdk.stat().st_size
    assert sum(seen) == capacity, "progress covers the whole disk exactly once"
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(vmdk), str(back)],
                   check=True, capture_output=True)
    assert back.read_bytes() == raw.read_bytes()
    checked = subprocess.run(["qemu-img", "check", "-f", "vmdk", str(vmdk)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    info = subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)],
                          capture_output=True, text=True, check=True).stdout
    assert '"create-type": "streamOptimized"' in info or '"streamOptimized"' in info
    return vmdk, size


def test_scattered_data_across_grain_tables_and_holes(tmp_path: Path) -> None:
    capacity = 100 * MiB   # four grain tables; the second and third hold nothing
    writes = [(0, os.urandom(3 * so.GRAIN + 17)), (5 * MiB + 4096, b"x" * 5000),
              (31 * MiB + 65000, os.urandom(2000)),   # across the first table's last grain
              (99 * MiB, os.urandom(MiB))]
    raw = _image(tmp_path / "disk.raw", capacity, writes)
    _vmdk, size = _roundtrip(tmp_path, raw, capacity)
    assert size < 4 * MiB, "holes and zero grains are not written"


def test_a_disk_that_ends_inside_a_grain(tmp_path: Path) -> None:
    capacity = 3 * so.GRAIN + 7 * so.SECTOR
    raw = _image(tmp_path / "disk.raw", capacity, [(capacity - 3000, os.urandom(3000))])
    _roundtrip(tmp_path, raw, capacity)


def test_an_all_zero_disk_is_metadata_only(tmp_path: Path) -> None:
    capacity = 64 * MiB
    raw = _image(tmp_path / "disk.raw", capacity, [(MiB, bytes(so.GRAIN))])  # written zeros
    _vmdk, size = _roundtrip(tmp_path, raw, capacity)
    assert size < 200 * 1024


def test_header_and_footer_say_what_vmware_readers_look_for(tmp_path: Path) -> None:
    capacity = 8 * MiB
    raw = _image(tmp_path / "disk.raw", capacity, [(0, os.urandom(1000))])
    vmdk = tmp_path / "disk.vmdk"
    so.write_stream_optimized(raw, capacity, vmdk)
    data = vmdk.read_bytes()
    magic, version, flags, sectors, grain, *_ = struct.unpack_from("<IIIQQ", data)
    assert (magic, version, flags, sectors, grain) == (so.MAGIC, 3, 0x30001, capacity // 512, 128)
    gd_offset_in_header = struct.unpack_from("<Q", data, 56)[0]
    assert gd_offset_in_header == so.GD_AT_END
    footer = data[-1024:-512]
    assert footer[:4] == b"KDMV" and struct.unpack_from("<Q", footer, 56)[0] != so.GD_AT_END
    assert data[-512:] == bytes(512), "the stream ends with an end-of-stream marker"
    assert b'createType="streamOptimized"' in data[512:512 * 21]


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    raw = _image(tmp_path / "disk.raw", MiB, [])
    with pytest.raises(TransportError, match="whole number of sectors"):
        so.write_stream_optimized(raw, MiB + 1, tmp_path / "x.vmdk")
    with pytest.raises(TransportError, match="the disk has"):
        so.write_stream_optimized(raw, 2 * MiB, tmp_path / "x.vmdk")
