"""Helpers for backup tests: write known blocks into a VM's disk, record what the lab
captured for each snapshot, and run backups through the job API."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.jobs import environment
from appliance.jobs.backup import BackupOptions, VMResult, run_backup
from appliance.jobs.consistency import ConsistencyPolicy
from appliance.profile import load_profile
from appliance.progress import NullProgress
from appliance.transport.datastore_http import DatastoreHTTPReader
from appliance.transport.nbdkit import nbd_reader_from_profile
from appliance.datastore import SnapshotDisk

BLOCK = 64 * 1024


def flat_file(lab: Any, vm: str, disk: int = 0) -> Path:
    return Path(lab.vcsim.vms[vm].disks[disk].flat_file)


def write_blocks(path: Path, blocks: list[int], seed: int) -> None:
    """Overwrite whole 64 KiB blocks with seeded random bytes."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))


def scattered(nblocks: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(nblocks), count))


@dataclass
class CapturingReader:
    """Wraps a DiskReader: keeps a copy of each snapshot disk's captured flat file as the
    lab made it, while the snapshot exists — the expected image of the restore point."""

    inner: Any
    datastore_dir: Path
    keep_dir: Path
    captured: dict[int, Path] = field(default_factory=dict)
    streams: list[Any] = field(default_factory=list)

    def open(self, disk: SnapshotDisk) -> Any:
        descriptor = self.datastore_dir / disk.path
        flat = descriptor.with_name(descriptor.name.replace(".vmdk", "-flat.vmdk"))
        self.keep_dir.mkdir(parents=True, exist_ok=True)
        copy = self.keep_dir / f"{disk.key}-{len(self.captured)}.img"
        shutil.copyfile(flat, copy)
        self.captured[disk.key] = copy
        stream = self.inner.open(disk)
        self.streams.append(stream)
        return stream


def backup(profile_path: Path, lab: Any, vm: str, keep_dir: Path, *, full: bool = False,
           app_aware: str = "off", transport: str = "datastore-http",
           **policy: Any) -> tuple[VMResult, CapturingReader]:
    profile = load_profile(profile_path)
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile)
    try:
        inner = (DatastoreHTTPReader(session) if transport == "datastore-http"
                 else nbd_reader_from_profile(profile, session))
        reader = CapturingReader(inner, lab.vcsim.datastore_dir, keep_dir)
        opts = BackupOptions(targets=(vm,), full=full,
                             policy=ConsistencyPolicy(app_aware=app_aware, **policy))
        [result] = run_backup(opts, profile, session, repo, reader, NullProgress())
    finally:
        session.close()
    return result, reader


def restored_equals(profile_path: Path, rp_id: str, disk_key: int, expected: Path,
                    out: Path) -> bool:
    repo = environment.open_repository(load_profile(profile_path))
    repo.restore_disk_to(rp_id, disk_key, out)
    return files_equal(out, expected)


def files_equal(a: Path, b: Path, chunk: int = 4 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
