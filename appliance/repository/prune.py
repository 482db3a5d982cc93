"""Prune: free the space of chunks no restore point references, crash-safely.

Order (each step durable before the next):
  1. under the lock, reload the index and compute the live chunk set from every restore point
  2. write new packs holding the live chunks of packs that also hold dead ones
  3. write ONE new index covering every pack that stays plus the new packs
  4. delete every old index file
  5. delete the rewritten packs, the dead packs, and packs no index names (leftovers of
     crashed writers or prunes)
A crash anywhere leaves every restore point readable: until step 4 the old indexes still
name the old packs, which are deleted only in step 5, after no index names them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.checkpoints import reached
from appliance.errors import IntegrityError
from appliance.repository import format as F
from appliance.repository.chunkstore import write_index_file
from appliance.repository.lock import Lock
from appliance.repository.packfile import Entry, PackBuilder, PackInfo

if TYPE_CHECKING:
    from appliance.repository.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_written: int = 0
    orphan_packs_deleted: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0        # net: bytes deleted minus bytes of new packs


def live_chunks(repo: Repository) -> set[bytes]:
    live: set[bytes] = set()
    for rp in repo.list_restore_points():
        for disk in rp.disks:
            live.update(disk.map_chunks)
            blockmap = repo.block_map(rp, disk)
            for i in range(0, len(blockmap), F.MAP_ENTRY):
                live.add(blockmap[i:i + F.MAP_ENTRY])
    live.discard(F.HOLE_ID)
    return live


def prune(repo: Repository) -> PruneReport:
    report = PruneReport()
    backend, store = repo.backend, repo.store
    with Lock(backend):
        store.reload()
        index = store.index
        live = live_chunks(repo)
        present = {i.name: i.size for i in backend.list(F.DATA_PREFIX)}
        for p in index.packs.values():
            if F.pack_name(p.pack_id) not in present:
                raise IntegrityError(f"pack {F.pack_name(p.pack_id)} is indexed but missing: "
                                     "run check; prune changes nothing")
        missing = live - index.chunks.keys()
        if missing:
            raise IntegrityError(f"{len(missing)} referenced chunks are not in the index: "
                                 "run check; prune changes nothing")

        # Decide per pack; whole-live packs first so a chunk stored twice keeps one copy.
        kept: list[PackInfo] = []
        dead: list[PackInfo] = []
        rewrite: list[tuple[PackInfo, list[Entry]]] = []
        have: set[bytes] = set()
        packs = sorted(index.packs.values(),
                       key=lambda p: sum(e.id in live for e in p.entries) != len(p.entries))
        for p in packs:
            wanted = [e for e in p.entries if e.id in live and e.id not in have]
            if len(wanted) == len(p.entries):
                kept.append(p)
            elif wanted:
                rewrite.append((p, wanted))
            else:
                dead.append(p)
            have.update(e.id for e in wanted)
        indexed = {F.pack_name(p.pack_id) for p in index.packs.values()}
        orphans = [n for n in present if n not in indexed]
        if not (dead or rewrite or orphans) and len(index.files) <= 1:
            return report

        # 2. new packs with the live chunks of partly dead packs (verified while copied)
        new_packs: list[PackInfo] = []
        builder = PackBuilder()

        def upload(b: PackBuilder) -> None:
            info, data = b.finish(repo.keys)
            backend.store(F.pack_name(info.pack_id), data)
            new_packs.append(info)
            report.packs_written += 1
            report.bytes_freed -= info.size

        for p, wanted in rewrite:
            name = F.pack_name(p.pack_id)
            data = backend.load(name)
            for e in wanted:
                sealed = data[e.offset:e.offset + e.length]
                store.verify(e.id, sealed, f"{name} chunk {e.id.hex()[:16]}")
                builder.add(e.id, sealed, e.raw_length)
                if len(builder) >= repo.pack_size:
                    upload(builder)
                    builder = PackBuilder()
        if builder.entries:
            upload(builder)
        reached("prune-packs-written")

        # 3. one index for everything that stays; 4. old indexes go
        if kept or new_packs:
            write_index_file(backend, repo.keys, kept + new_packs)
        reached("prune-index-written")
        for name in index.files:
            backend.delete(name)
        reached("prune-indexes-deleted")

        # 5. packs no index names any more
        for p in [p for p, _ in rewrite] + dead:
            backend.delete(F.pack_name(p.pack_id))
            report.bytes_freed += p.size
            report.chunks_removed += sum(e.id not in live for e in p.entries)
        report.packs_rewritten, report.packs_deleted = len(rewrite), len(dead)
        for name in orphans:
            backend.delete(name)
            report.bytes_freed += present[name]
        report.orphan_packs_deleted = len(orphans)
        store.reload()
    log.info("prune: %s", report)
    return report
