"""`Repository`: open/init a repository on a backend, and the verbs the jobs and CLI use."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.errors import NotFound, RepositoryError, UsageError
from appliance.repository import format as F
from appliance.repository.backend import Backend, ObjectNotFound
from appliance.repository.check import CheckReport, check
from appliance.repository.chunkstore import ChunkStore
from appliance.repository.crypto import Keys
from appliance.repository.lock import break_lock
from appliance.repository.prune import PruneReport, prune
from appliance.repository.reader import block_reader, load_map, read_disk, restore_disk_to
from appliance.repository.restorepoint import DiskRecord, RestorePoint, VmRef
from appliance.repository.retention import forget, forget_points
from appliance.repository.writer import RestorePointWriter


def _check_version(config: dict[str, Any]) -> None:
    version = config.get("version")
    if version not in F.SUPPORTED_VERSIONS:
        raise RepositoryError(
            f"repository format version {version!r} is not supported by this Stillpoint "
            f"(supported: {sorted(F.SUPPORTED_VERSIONS)})")


class Repository:
    """An open repository. Build with `Repository.init` or `Repository.open`."""

    def __init__(self, backend: Backend, config: dict[str, Any], keys: Keys) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.chunk_size = int(config["chunk_size"])
        self.pack_size = int(config["pack_size"])
        self.store = ChunkStore(backend, keys)

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, passphrase: str | None, *, encryption: bool = True,
             chunk_size: int = F.DEFAULT_CHUNK_SIZE, pack_size: int = F.DEFAULT_PACK_SIZE,
             kdf: dict[str, Any] | None = None,
             retention_lock_days: int = 0) -> Repository:
        """Create a new repository. Unencrypted only with encryption=False. `kdf` overrides
        the key derivation ({"name": "argon2id", "iterations", "lanes", "memory_kib"} or
        {"name": "scrypt", "n", "r", "p"}); the default is Argon2id, 64 MiB, 3 passes.
        `retention_lock_days` > 0: no restore point younger than that is ever forgotten; it
        is part of the config that the key wrap authenticates, so it cannot be lowered by
        editing the config."""
        if chunk_size % F.CHUNK_ALIGN or not F.MIN_CHUNK_SIZE <= chunk_size <= F.MAX_CHUNK_SIZE:
            raise UsageError(f"chunk size must be a multiple of {F.CHUNK_ALIGN} "
                             f"between {F.MIN_CHUNK_SIZE} and {F.MAX_CHUNK_SIZE}")
        if pack_size < F.MIN_PACK_SIZE:
            raise UsageError(f"pack size must be at least {F.MIN_PACK_SIZE}")
        if not 0 <= retention_lock_days <= F.MAX_RETENTION_LOCK_DAYS:
            raise UsageError(f"retention lock must be 0-{F.MAX_RETENTION_LOCK_DAYS} days")
        config: dict[str, Any] = {
            "version": F.FORMAT_VERSION, "id": secrets.token_hex(16),
            "chunk_size": chunk_size, "pack_size": pack_size, "compression": "zstd",
        }
        if retention_lock_days:
            config[F.RETENTION_LOCK_DAYS] = int(retention_lock_days)
        keys = Keys.create(config, passphrase, encryption, kdf)
        backend.create()
        backend.store(F.CONFIG, json.dumps(config, sort_keys=True, indent=1).encode())
        return cls(backend, config, keys)

    @classmethod
    def open(cls, backend: Backend, passphrase: str | None) -> Repository:
        """Open an existing repository; refuses unknown format versions before anything else."""
        backend.open()
        try:
            raw = backend.load(F.CONFIG)
        except ObjectNotFound as err:
            raise NotFound("no Stillpoint repository there (config not found)") from err
        try:
            config = json.loads(raw)
        except ValueError as err:
            raise RepositoryError(f"repository config is unreadable: {err}") from err
        if not isinstance(config, dict):
            raise RepositoryError("repository config is not a JSON object")
        _check_version(config)
        return cls(backend, config, Keys.unlock(config, passphrase))

    @property
    def id(self) -> str:
        return str(self.config["id"])

    @property
    def retention_lock_days(self) -> int:
        """Restore points younger than this many days cannot be forgotten (0: no lock)."""
        return int(self.config.get(F.RETENTION_LOCK_DAYS, 0) or 0)

    @property
    def encrypted(self) -> bool:
        return self.keys.encrypted

    def break_lock(self) -> dict[str, Any] | None:
        """Remove a lock left behind (the operator decides the holder is gone)."""
        return break_lock(self.backend)

    # -- writing ------------------------------------------------------------------------

    def writer(self, vm: str, *, moref: str = "", uuid: str = "", instance_uuid: str = "",
               vcenter: str = "", folder: str = "", time: datetime | None = None,
               workers: int | None = None) -> RestorePointWriter:
        """Start a restore point of one VM; takes the lock (RepositoryLocked if held)."""
        return RestorePointWriter(self, VmRef(vm, moref, uuid, instance_uuid, vcenter, folder),
                                  time, workers)

    def store_restore_point(self, rp: RestorePoint) -> None:
        """Commit a restore point: its (sealed) object is what makes it exist; the writer
        calls this last, after every pack and index it refers to is stored."""
        name = F.RESTOREPOINT_PREFIX + rp.id
        self.backend.store(name, self.keys.seal(F.AAD_RESTOREPOINT + rp.id.encode(), rp.to_json()))

    # -- reading ------------------------------------------------------------------------

    def load_restore_point(self, rp_id: str) -> RestorePoint:
        """A restore point by its exact id (ObjectNotFound if there is none); `get` takes
        prefixes."""
        name = F.RESTOREPOINT_PREFIX + rp_id
        raw = self.keys.open(F.AAD_RESTOREPOINT + rp_id.encode(), self.backend.load(name), name)
        rp = RestorePoint.from_json(raw, name)
        if rp.id != rp_id:
            raise RepositoryError(f"{name}: names restore point {rp.id}")
        return rp

    def restore_point_ids(self) -> list[str]:
        return sorted(i.name[len(F.RESTOREPOINT_PREFIX):]
                      for i in self.backend.list(F.RESTOREPOINT_PREFIX))

    def list_restore_points(self, vm: str | None = None) -> list[RestorePoint]:
        """Restore points, oldest first; `vm` matches the VM name, moref, uuid or instance
        uuid."""
        out = []
        for rp_id in self.restore_point_ids():
            try:
                rp = self.load_restore_point(rp_id)
            except ObjectNotFound:
                continue  # forgotten while we listed
            if vm is None or vm in (rp.vm.name, rp.vm.moref, rp.vm.uuid, rp.vm.instance_uuid):
                out.append(rp)
        return sorted(out, key=lambda r: (r.time, r.id))

    def get(self, ref: str | RestorePoint) -> RestorePoint:
        """A restore point by id or unique id prefix."""
        if isinstance(ref, RestorePoint):
            return ref
        matches = [i for i in self.restore_point_ids() if i.startswith(ref)] if ref else []
        if not matches:
            raise NotFound(f"no restore point {ref!r}")
        if len(matches) > 1:
            raise UsageError(f"restore point prefix {ref!r} is ambiguous ({len(matches)} match)")
        return self.load_restore_point(matches[0])

    def block_map(self, rp: RestorePoint, disk: DiskRecord) -> bytes:
        """One disk's block map: a block id (32 bytes, zeros for a hole) per block, in order."""
        return load_map(self.store, rp, disk)

    def read_disk(self, rp: str | RestorePoint, key: int) -> Iterator[tuple[int, bytes | None]]:
        """(offset, bytes) per block in order; None for a hole (reads as zeros)."""
        point = self.get(rp)
        return read_disk(self.store, point, point.disk(key))

    def block_reader(self, rp: str | RestorePoint, key: int) -> Callable[[int], bytes]:
        """bytes of one block of a disk by index (zeros for a hole), each chunk verified."""
        point = self.get(rp)
        return block_reader(self.store, point, point.disk(key))

    def restore_disk_to(self, rp: str | RestorePoint, key: int, path: str | os.PathLike[str],
                        format: str = "raw") -> list[Path]:
        """Restore one disk to a sparse raw file, or format="vmdk" (monolithicFlat)."""
        point = self.get(rp)
        return restore_disk_to(self.store, point, point.disk(key), path, format)

    # -- maintenance --------------------------------------------------------------------

    def check(self, read_data: bool = False) -> CheckReport:
        return check(self, read_data)

    def forget(self, *, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
               keep_monthly: int = 0, vm: str | None = None,
               dry_run: bool = False) -> list[RestorePoint]:
        return forget(self, keep_last=keep_last, keep_daily=keep_daily, keep_weekly=keep_weekly,
                      keep_monthly=keep_monthly, vm=vm, dry_run=dry_run)

    def forget_points(self, refs: list[str], dry_run: bool = False) -> list[RestorePoint]:
        return forget_points(self, refs, dry_run)

    def prune(self) -> PruneReport:
        return prune(self)

