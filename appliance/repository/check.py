"""`check`: is everything that restore points need present and intact?

Structure (always): the config opened; every index file parses; every indexed pack exists
with the indexed size; every restore point object authenticates and parses; its block maps
read back; every chunk they name is indexed. With read_data: every pack is read whole, its
sha256 must equal its name, its trailer must agree with the index, and every chunk is
decrypted and re-hashed. Each problem names the damaged object and the restore points it
touches. Packs no index names are reported as `unreferenced_packs`: they are what crashed
writers or prunes leave, harmless, and removed by the next prune.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.errors import IntegrityError, StillpointError
from appliance.repository import format as F
from appliance.repository.backend import ObjectNotFound
from appliance.repository.chunkstore import ChunkIndex, read_index_file
from appliance.repository.packfile import parse_pack
from appliance.repository.reader import load_map

if TYPE_CHECKING:
    from appliance.repository.repository import Repository


@dataclass
class Problem:
    kind: str                   # index | pack-missing | pack-size | pack-hash | pack-trailer |
    #                             restorepoint | blockmap | chunk-missing | chunk-corrupt
    object: str                 # backend name (and chunk id) of what is damaged
    message: str
    restore_points: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        touched = ", ".join(self.restore_points) or "none"
        return f"{self.kind}: {self.object}: {self.message} (restore points affected: {touched})"


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    restore_points: int = 0
    packs: int = 0
    chunks_verified: int = 0
    unreferenced_packs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_restore_points(self) -> set[str]:
        return {r for p in self.problems for r in p.restore_points}

    def __str__(self) -> str:
        head = (f"{self.restore_points} restore points, {self.packs} packs, "
                f"{self.chunks_verified} chunks verified: "
                f"{'ok' if self.ok else f'{len(self.problems)} problems'}")
        return "\n".join([head, *map(str, self.problems)])


class _Users:
    """chunk id -> restore points using it, and where first (for messages)."""

    def __init__(self) -> None:
        self.rps: dict[bytes, set[str]] = {}
        self.where: dict[bytes, str] = {}

    def add(self, cid: bytes, rp_id: str, where: str) -> None:
        s = self.rps.get(cid)
        if s is None:
            s = self.rps[cid] = set()
            self.where[cid] = where
        s.add(rp_id)

    def of(self, cid: bytes) -> list[str]:
        return sorted(self.rps.get(cid, ()))


def check(repo: Repository, read_data: bool) -> CheckReport:
    report = CheckReport()
    backend, keys = repo.backend, repo.keys
    index = ChunkIndex()
    for info in sorted(backend.list(F.INDEX_PREFIX), key=lambda i: i.name):
        try:
            index.add(info.name, read_index_file(backend, keys, info.name))
        except ObjectNotFound:
            continue
        except IntegrityError as err:
            report.problems.append(Problem("index", info.name, str(err)))
    present = {i.name: i.size for i in backend.list(F.DATA_PREFIX)}
    report.unreferenced_packs = sorted(
        set(present) - {F.pack_name(p) for p in index.packs})
    report.packs = len(index.packs)

    users = _Users()
    for rp_id in repo.restore_point_ids():
        name = F.RESTOREPOINT_PREFIX + rp_id
        try:
            rp = repo.load_restore_point(rp_id)
        except ObjectNotFound:
            continue
        except StillpointError as err:
            report.problems.append(Problem("restorepoint", name, str(err), [rp_id]))
            continue
        report.restore_points += 1
        for disk in rp.disks:
            for cid in disk.map_chunks:
                users.add(cid, rp_id, f"disk {disk.key} block map")
            try:
                blockmap = load_map(repo.store, rp, disk)
            except StillpointError as err:
                report.problems.append(Problem(
                    "blockmap", f"{name} disk {disk.key}",
                    _reason(err, f"restore point {rp_id} disk {disk.key} block map"), [rp_id]))
                continue
            for blk in range(disk.blocks):
                cid = blockmap[blk * F.MAP_ENTRY:(blk + 1) * F.MAP_ENTRY]
                if cid != F.HOLE_ID:
                    users.add(cid, rp_id, f"disk {disk.key} offset {blk * disk.block_size}")

    for cid in users.rps:
        if cid not in index.chunks:
            report.problems.append(Problem(
                "chunk-missing", f"chunk {cid.hex()}", f"not in any index (used at "
                f"{users.where[cid]})", users.of(cid)))

    for pack_id, pack in index.packs.items():
        name = F.pack_name(pack_id)
        touched = sorted({r for e in pack.entries for r in users.of(e.id)})
        if name not in present:
            report.problems.append(Problem("pack-missing", name, "indexed pack is missing",
                                           touched))
            continue
        if present[name] != pack.size:
            report.problems.append(Problem(
                "pack-size", name, f"size {present[name]}, index says {pack.size}", touched))
        if read_data:
            _read_pack(repo, name, pack_id, pack.entries, users, report)
    return report


def _read_pack(repo: Repository, name: str, pack_id: bytes, entries: list, users: _Users,
               report: CheckReport) -> None:
    data = repo.backend.load(name)
    touched = sorted({r for e in entries for r in users.of(e.id)})
    if hashlib.sha256(data).digest() != pack_id:
        report.problems.append(Problem("pack-hash", name, "content does not match its name",
                                       touched))
    try:
        trailer = {e.id: e for e in parse_pack(repo.keys, data, name)}
        if any(trailer.get(e.id) != e for e in entries):
            report.problems.append(Problem("pack-trailer", name,
                                           "pack directory disagrees with the index", touched))
    except IntegrityError as err:
        report.problems.append(Problem("pack-trailer", name, _reason(err, name), touched))
    bad: list[tuple[bytes, str]] = []
    for e in entries:
        what = f"{name} chunk {e.id.hex()}"
        try:
            repo.store.verify(e.id, data[e.offset:e.offset + e.length], what)
            report.chunks_verified += 1
        except IntegrityError as err:
            bad.append((e.id, _reason(err, what)))
    if bad:
        report.problems.append(_corrupt_chunks(name, len(entries), bad, users))


def _corrupt_chunks(name: str, total: int, bad: list[tuple[bytes, str]],
                    users: _Users) -> Problem:
    """One problem per damaged pack, however many of its chunks fail (a truncated pack is
    one damaged object, not a line per chunk)."""
    touched = sorted({r for cid, _ in bad for r in users.of(cid)})
    first, reason = bad[0]
    where = (f"used at {users.where[first]}" if first in users.where
             else "used by no readable block map")
    if len(bad) == 1:
        return Problem("chunk-corrupt", f"{name} chunk {first.hex()}", f"{reason} ({where})",
                       touched)
    return Problem("chunk-corrupt", name, f"{len(bad)} of {total} chunks fail verification; "
                   f"the first, {first.hex()[:16]}: {reason} ({where})", touched)


def _reason(err: Exception, what: str) -> str:
    """The error's text without the object's name the problem line already starts with."""
    text = str(err)
    return text[len(what) + 2:] if text.startswith(what + ": ") else text
