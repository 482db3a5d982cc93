"""Point-in-time restore: which logs to replay, from where, into the restored image.

The logs after a restore point's snapshot live on the VM's own disk (PostgreSQL's WAL
archive, MariaDB's binary logs) and so are inside the NEXT restore point's image: backup
N+1 holds the WAL archived and the binary logs written since backup N (the agent prunes
only what is older than the backup that just completed). Restoring "until T" with
backup N <= T <= backup N+1 therefore:

  1. restores backup N's disks to private raw images (the ones that will be uploaded);
  2. mounts backup N+1's disks read-only and copies the WAL archive / binary logs into
     backup N's image under <file system>/stillpoint-restore/<writer kind>/ (numeric owner
     and modes kept, so the database's own user can read them);
  3. adds "pitr" to each writer's entry of the restore marker, read by the agent at boot:
       postgresql: {"archive_dir", "target_time" | "target_lsn"}  -> restore_command,
                   recovery_target_*, promote (the archive also holds the segment with the
                   backup's end record, so backup_label is used; the later image's pg_wal
                   segments the archive lacks are added: the one being written at that
                   snapshot is archived only after it)
       mariadb:    {"binlog_dir", "stop_datetime"}  -> mariadb-binlog from the recorded
                   position up to stop_datetime (whole seconds, UTC), replayed before start
A time after the newest restore point is refused: those logs exist only on the live VM.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import NotFound, UsageError
from appliance.jobs import files
from appliance.jobs.point_metadata import PointMetadata
from appliance.repository import Repository, RestorePoint

LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
RESTORE_DIR = "stillpoint-restore"


@dataclass(frozen=True)
class Target:
    time: datetime | None = None
    lsn: str | None = None

    def describe(self) -> str:
        return self.lsn or (self.time.isoformat() if self.time else "")


@dataclass
class PitrPlan:
    target: Target
    source: RestorePoint                  # the later restore point whose logs are replayed
    copies: list[dict[str, Any]] = field(default_factory=list)   # what to copy, per writer
    marker: dict[str, dict[str, Any]] = field(default_factory=dict)  # writer -> "pitr"


def parse_until(raw: str) -> Target:
    raw = raw.strip()
    if LSN_RE.match(raw):
        return Target(lsn=raw.upper())
    try:
        when = datetime.fromisoformat(raw)
    except ValueError as err:
        raise UsageError(f"--until {raw!r}: give an ISO time (2026-11-25T10:00:05Z) or a "
                         "PostgreSQL LSN (0/3000060)") from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)     # a time without zone is UTC, as the appliance logs
    return Target(time=when.astimezone(UTC))


def _writers(rp: RestorePoint) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in PointMetadata.of(rp).restorable_writers().items()
            if r.get("kind") in ("postgresql", "mariadb")}


def _metadata_component(rp: RestorePoint, name: str) -> dict[str, Any]:
    return PointMetadata.of(rp).first_component(name)


def frozen_mount_points(rp: RestorePoint) -> set[str]:
    """Mount points of the file systems the agent's filesystem writer froze."""
    return PointMetadata.of(rp).frozen_mount_points()


def mount_points(rp: RestorePoint) -> list[str]:
    """Guest mount points of the backed-up file systems, longest first ("/" always last)."""
    return sorted(frozen_mount_points(rp) | {"/"}, key=len, reverse=True)


def split_guest_path(rp: RestorePoint, guest_path: str) -> tuple[str, str]:
    """(mount point, path relative to that file system's root) of a guest path."""
    for mp in mount_points(rp):
        if guest_path == mp or guest_path.startswith(mp.rstrip("/") + "/"):
            return mp, guest_path[len(mp.rstrip("/")):].lstrip("/")
    return "/", guest_path.lstrip("/")


def plan(repo: Repository, rp: RestorePoint, until: str) -> PitrPlan:
    target = parse_until(until)
    writers = _writers(rp)
    if not writers:
        raise UsageError(f"restore point {rp.id[:12]} has no PostgreSQL or MariaDB writer "
                         "results: --until needs an application-consistent restore point")
    if target.lsn and any(w["kind"] == "mariadb" for w in writers.values()):
        raise UsageError("--until LSN applies to PostgreSQL only; this restore point also "
                         "holds MariaDB: give a time")
    if target.time is not None and target.time < rp.time:
        raise UsageError(f"--until {target.describe()} is before restore point {rp.id[:12]} "
                         f"({rp.time.isoformat()}): choose an earlier restore point")
    later = [p for p in repo.list_restore_points(vm=rp.vm.uuid or rp.vm.name)
             if p.time > rp.time and p.id != rp.id]
    if target.time is not None:
        later = [p for p in later if p.time >= target.time]
    if not later:
        raise NotFound(f"no restore point of {rp.vm.name} after {target.describe()}: the "
                       "logs written after the newest backup exist only on the live VM")
    source = later[0]
    result = PitrPlan(target=target, source=source)
    for name, res in sorted(writers.items()):
        if res["kind"] == "postgresql":
            guest_dir = res.get("archive_dir")
            if not guest_dir:
                raise UsageError(f"{name}: no WAL archive is configured; no point-in-time restore")
        else:
            base = _metadata_component(rp, name).get("log_bin_basename")
            if not res.get("binlog_file") or not base:
                raise UsageError(f"{name}: binary logging was off; no point-in-time restore")
            guest_dir = os.path.dirname(base)
        mp, rel = split_guest_path(rp, guest_dir)
        dest_rel = f"{RESTORE_DIR}/{res['kind']}"
        dest_guest = f"{mp.rstrip('/')}/{dest_rel}"
        result.copies.append({"writer": name, "kind": res["kind"], "mount_point": mp,
                              "source_rel": rel, "dest_rel": dest_rel, "dest_fs_of": rel})
        if res["kind"] == "postgresql":
            # The segment being written at the later snapshot is not archived yet (backup
            # mode ends after the snapshot): it is only in that image's pg_wal. Taken too,
            # where the archive has no segment of that name.
            _wal_mp, wal_rel = split_guest_path(rp, f"{res['data_dir'].rstrip('/')}/pg_wal")
            result.copies.append({"writer": name, "kind": "postgresql-wal",
                                  "mount_point": _wal_mp, "source_rel": wal_rel,
                                  "dest_rel": dest_rel, "dest_fs_of": rel, "only_new": True})
            pitr: dict[str, Any] = {"archive_dir": dest_guest}
            if target.lsn:
                pitr["target_lsn"] = target.lsn
            else:
                assert target.time is not None
                pitr["target_time"] = target.time.isoformat()
        else:
            assert target.time is not None
            pitr = {"binlog_dir": dest_guest,
                    "stop_datetime": target.time.strftime("%Y-%m-%d %H:%M:%S")}
        result.marker[name] = pitr
    return result


def _copy_tree_owned(src: Path, dst: Path, only_new: bool = False) -> int:
    """Copy the files of `src` into `dst` keeping modes and numeric owners; returns count.
    only_new: add files `dst` lacks, and leave its directory's owner and mode alone."""
    dst.mkdir(parents=True, exist_ok=True)
    if not only_new:
        st = src.stat()
        os.chown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, st.st_mode & 0o7777)
    n = 0
    for entry in sorted(src.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            target = dst / entry.name
            if only_new and target.exists():
                continue
            shutil.copy2(entry, target)
            est = entry.stat()
            os.chown(target, est.st_uid, est.st_gid)
            n += 1
    return n


def apply(repo: Repository, pitr: PitrPlan, images: dict[int, Path],
          say: Any = lambda _m: None) -> dict[str, int]:
    """Copy the later restore point's logs into the restored images (raw files by disk
    key, mounted read-write here); returns files copied per writer."""
    copied: dict[str, int] = {}
    with _all_mounted(repo, pitr.source) as later, _mounted_rw(images) as ours:
        for c in pitr.copies:
            src = _find(later, c["source_rel"])
            if src is None:
                raise NotFound(f"{c['writer']}: {c['source_rel']} not found in restore point "
                               f"{pitr.source.id[:12]}")
            dst_fs = _find_fs_for(ours, c.get("dest_fs_of", c["source_rel"]))
            n = _copy_tree_owned(src, dst_fs / c["dest_rel"], bool(c.get("only_new")))
            copied[c["writer"]] = copied.get(c["writer"], 0) + n
            say(f"{c['writer']}: {n} {'unarchived WAL' if c.get('only_new') else 'log'} "
                f"files from restore point {pitr.source.id[:12]} copied for the replay")
    return copied


def _find(filesystems: list[Path], rel: str) -> Path | None:
    for root in filesystems:
        candidate = files.resolve_inside(root, rel)
        if candidate.is_dir():
            return candidate
    return None


def _find_fs_for(filesystems: list[Path], rel: str) -> Path:
    """The restored file system that holds the same directory (the writer's disk)."""
    for root in filesystems:
        if files.resolve_inside(root, rel).is_dir():
            return root
    raise NotFound(f"{rel} not found in the restored image")


class _all_mounted:
    """Every file system of every disk of a restore point, read-only."""

    def __init__(self, repo: Repository, rp: RestorePoint) -> None:
        from contextlib import ExitStack

        self.repo, self.rp, self.stack = repo, rp, ExitStack()

    def __enter__(self) -> list[Path]:
        roots: list[Path] = []
        try:
            for d in self.rp.disks:
                raw = self.stack.enter_context(files.disk_image(self.repo, self.rp, d.key))
                try:
                    fss = self.stack.enter_context(files.mounted_filesystems(raw))
                except files.ImageError:
                    continue            # a disk without a file system (e.g. raw data)
                roots += [f.root for f in fss]
        except BaseException:
            self.stack.close()
            raise
        return roots

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


class _mounted_rw:
    def __init__(self, images: dict[int, Path]) -> None:
        from contextlib import ExitStack

        self.images, self.stack = images, ExitStack()

    def __enter__(self) -> list[Path]:
        roots: list[Path] = []
        try:
            for _key, raw in sorted(self.images.items()):
                try:
                    fss = self.stack.enter_context(files.mounted_filesystems(raw, writable=True))
                except files.ImageError:
                    continue
                roots += [f.root for f in fss]
        except BaseException:
            self.stack.close()
            raise
        return roots

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
