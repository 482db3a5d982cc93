"""Repository round trips, incrementals, encryption, integrity, locking, forget and prune."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import (
    IntegrityError,
    NotFound,
    RepositoryError,
    RepositoryLocked,
    StorageFull,
    UsageError,
    WrongPassphrase,
)
from appliance.repository import (
    FaultyBackend,
    LocalBackend,
    MemoryBackend,
    Repository,
    RestorePoint,
)
from appliance.repository import format as F
from appliance.repository.retention import select

pytestmark = pytest.mark.unit

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
FAST_KDF = {"name": "argon2id", "iterations": 1, "lanes": 1, "memory_kib": 64}
PASS = "correct horse battery staple"


def new_repo(backend=None, **kw) -> Repository:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("pack_size", 256 * KIB)
    return Repository.init(backend or MemoryBackend(), PASS, kdf=FAST_KDF, **kw)


def random_image(rng: random.Random, capacity: int, fill: float = 0.6) -> bytearray:
    """Random 64 KiB pieces with zero (hole) areas in between."""
    img = bytearray(capacity)
    for off in range(0, capacity, CHUNK):
        if rng.random() < fill:
            n = min(CHUNK, capacity - off)
            img[off:off + n] = rng.randbytes(n)
    return img


def backup(repo: Repository, vm: str, disks: dict[int, bytearray], base: str | None = None,
           extents: dict[int, list[tuple[int, int]]] | None = None, **kw) -> RestorePoint:
    """Write `disks` (key -> image); with `extents`, only those (offset, length) areas."""
    with repo.writer(vm, moref=f"vm-{vm}", uuid=f"uuid-{vm}", **kw) as w:
        for key, img in disks.items():
            d = w.disk(key, f"Hard disk {key}", len(img), base=base)
            areas = extents[key] if extents else [(0, len(img))]
            for off, n in areas:
                d.write(off, bytes(img[off:off + n]))
            d.finish(change_id=f"change-{key}")
        return w.commit("crash", reasons=["test"], metadata={"vm": vm})


def read_back(repo: Repository, rp: str | RestorePoint, key: int) -> bytearray:
    point = repo.get(rp)
    out = bytearray(point.disk(key).capacity)
    last = -1
    for off, data in repo.read_disk(point, key):
        assert off > last
        last = off
        if data is not None:
            out[off:off + len(data)] = data
    return out


def total_size(backend: MemoryBackend) -> int:
    return sum(len(v) for v in backend.objects.values())


# -- round trips ---------------------------------------------------------------------------

def test_round_trip_with_holes_and_dedup_across_vms(tmp_path: Path) -> None:
    rng = random.Random(1)
    repo = new_repo(LocalBackend(tmp_path / "repo"))
    a = random_image(rng, 2 * MIB + 3 * CHUNK + 512)  # capacity not a multiple of the block
    b = random_image(rng, 1 * MIB)
    b[0:512 * KIB] = a[0:512 * KIB]  # same aligned blocks as VM a: dedup across VMs
    rp_a = backup(repo, "a", {2000: a})
    rp_b = backup(repo, "b", {2000: b, 2001: bytearray(3 * CHUNK)})
    assert rp_a.stats.blocks_hole > 0 and rp_a.stats.blocks_dedup == 0
    shared = sum(1 for off in range(0, 512 * KIB, CHUNK) if any(a[off:off + CHUNK]))
    assert rp_b.stats.blocks_dedup >= shared > 0
    assert rp_b.disk(2001).stats.blocks_hole == 3

    repo = Repository.open(LocalBackend(tmp_path / "repo"), PASS)
    assert read_back(repo, rp_a.id, 2000) == a
    assert read_back(repo, rp_b.id, 2000) == b
    assert read_back(repo, rp_b.id, 2001) == bytes(3 * CHUNK)
    holes = [off for off, data in repo.read_disk(rp_a.id, 2000) if data is None]
    assert holes and all(not any(a[o:o + CHUNK]) for o in holes)

    out = tmp_path / "a.raw"
    assert repo.restore_disk_to(rp_a.id, 2000, out) == [out]
    assert out.read_bytes() == a
    assert out.stat().st_blocks * 512 < len(a)  # holes stayed holes


def test_restore_point_record_round_trips() -> None:
    repo = new_repo()
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with repo.writer("db1", moref="vm-7", uuid="4210-aa", time=t) as w:
        d = w.disk(2000, "Hard disk 1", CHUNK)
        d.write(0, b"\1" * CHUNK)
        d.finish(change_id="52 aa/4")
        meta = {"vm_config": {"cpus": 2}, "writers": [{"name": "postgresql"}], "timings": {}}
        rp = w.commit("application", reasons=["all writers ok"], metadata=meta)
    got = repo.get(rp.id[:8])
    assert (got.vm.name, got.vm.moref, got.vm.uuid) == ("db1", "vm-7", "4210-aa")
    assert got.time == t and got.consistency == "application"
    assert got.reasons == ["all writers ok"] and got.metadata == meta
    d0 = got.disks[0]
    assert (d0.key, d0.label, d0.capacity, d0.change_id) == (2000, "Hard disk 1", CHUNK, "52 aa/4")
    assert [r.id for r in repo.list_restore_points(vm="vm-7")] == [rp.id]
    assert repo.list_restore_points(vm="other") == []


def test_unknown_restore_point_and_ambiguous_prefix() -> None:
    repo = new_repo()
    ids = {backup(repo, "a", {1: bytearray(CHUNK)}).id for _ in range(20)}
    with pytest.raises(NotFound):
        repo.get("zz")
    with pytest.raises(NotFound):
        repo.get("")  # an empty prefix names nothing
    # 20 ids, 16 hex digits: some first digit is shared (pigeonhole)
    shared = next(c for c in "0123456789abcdef" if sum(i[0] == c for i in ids) > 1)
    with pytest.raises(UsageError, match="ambiguous"):
        repo.get(shared)
    some = min(ids)
    assert repo.get(some[:12]).id == some


# -- incrementals --------------------------------------------------------------------------

def test_incrementals_with_partial_blocks_are_exact_synthetic_fulls() -> None:
    rng = random.Random(2)
    repo = new_repo(chunk_size=256 * KIB)  # 4 write units per block: partial-block writes
    cap = 4 * MIB + 5 * CHUNK
    img = random_image(rng, cap)
    history = [(backup(repo, "vm", {2000: img}).id, bytes(img))]
    for _ in range(5):
        extents = []
        for _ in range(rng.randrange(1, 12)):
            off = rng.randrange(0, cap // CHUNK) * CHUNK
            n = min(rng.randrange(1, 9) * CHUNK, cap - off)
            extents.append((off, n))
            img[off:off + n] = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
        if rng.random() < 0.5:
            extents.sort()  # CBT order; otherwise out of order and overlapping
        rp = backup(repo, "vm", {2000: img}, base=history[-1][0], extents={2000: extents})
        assert rp.stats.blocks_inherited > 0
        history.append((rp.id, bytes(img)))
    for rp_id, expect in history:
        assert read_back(repo, rp_id, 2000) == expect


def test_sector_aligned_writes() -> None:
    rng = random.Random(8)
    repo = new_repo()
    cap = 8 * CHUNK + 1536
    img = random_image(rng, cap, fill=1.0)
    base = backup(repo, "vm", {1: img})
    extents = [(512, 1024), (CHUNK - 512, 1024), (3 * CHUNK + 4096, CHUNK + 512), (cap - 1536, 1536)]
    for off, n in extents:
        img[off:off + n] = rng.randbytes(n)
    rp = backup(repo, "vm", {1: img}, base=base.id, extents={1: extents})
    assert read_back(repo, rp.id, 1) == img


def test_many_pending_partial_blocks_and_mutable_buffers() -> None:
    rng = random.Random(3)
    repo = new_repo(chunk_size=512 * KIB)
    cap = 24 * 512 * KIB
    base_img = random_image(rng, cap, fill=1.0)
    base = backup(repo, "vm", {1: base_img})
    img = bytearray(base_img)
    with repo.writer("vm") as w:
        d = w.disk(1, "d", cap, base=base.id)
        buf = bytearray(CHUNK)
        # first write unit of every block, descending: more partial blocks than the buffer
        for blk in reversed(range(24)):
            off = blk * 512 * KIB + CHUNK
            buf[:] = rng.randbytes(CHUNK)
            img[off:off + CHUNK] = buf
            d.write(off, buf)  # the writer must copy: we reuse buf at once
        d.finish()
        rp = w.commit("crash")
    assert read_back(repo, rp.id, 1) == img
    assert read_back(repo, base.id, 1) == base_img


@pytest.mark.parametrize("new_cap", [3 * CHUNK + 4096, 9 * CHUNK, 1 * CHUNK + 512])
def test_disk_grown_or_shrunk_against_base(new_cap: int) -> None:
    rng = random.Random(4)
    repo = new_repo(chunk_size=128 * KIB)
    old = random_image(rng, 5 * CHUNK + 1024, fill=1.0)
    base = backup(repo, "vm", {1: old})
    with repo.writer("vm") as w:
        w.disk(1, "d", new_cap, base=base.id).finish()
        rp = w.commit("crash")
    expect = bytes(old[:new_cap]).ljust(new_cap, b"\0")
    assert read_back(repo, rp.id, 1) == expect


def test_write_alignment_is_enforced() -> None:
    repo = new_repo()
    with repo.writer("vm") as w:
        d = w.disk(1, "d", 4 * CHUNK)
        with pytest.raises(UsageError):
            d.write(100, b"x" * CHUNK)
        with pytest.raises(UsageError):
            d.write(0, b"x" * 1000)
        d.write(512, b"x" * 1024)  # sector-aligned writes are fine
        with pytest.raises(UsageError):
            d.write(4 * CHUNK, b"x" * CHUNK)
        with pytest.raises(UsageError):
            w.commit("crash")  # disk not finished
        d.finish()
        with pytest.raises(UsageError):
            w.commit("perfect")


def test_abandoned_writer_leaves_nothing_visible_and_prune_cleans() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    with pytest.raises(RuntimeError), repo.writer("vm") as w:
        d = w.disk(1, "d", 2 * MIB)
        d.write(0, os.urandom(2 * MIB))
        d.finish()
        raise RuntimeError("job failed")
    assert repo.list_restore_points() == []
    assert any(n.startswith("data/") for n in backend.objects)
    assert repo.check().unreferenced_packs or any(n.startswith("index/") for n in backend.objects)
    repo.prune()
    assert [n for n in backend.objects if n.startswith(("data/", "index/"))] == []
    assert F.LOCK not in backend.objects


def test_storage_full_surfaces_as_storage_full() -> None:
    inner = MemoryBackend()
    new_repo(inner)
    repo = Repository.open(FaultyBackend(inner, enospc_after=2), PASS)
    with pytest.raises(StorageFull):
        backup(repo, "vm", {1: bytearray(os.urandom(2 * MIB))})
    assert Repository.open(inner, PASS).list_restore_points() == []


# -- encryption ----------------------------------------------------------------------------

def test_wrong_or_missing_passphrase() -> None:
    backend = MemoryBackend()
    new_repo(backend)
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, "wrong")
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, None)
    assert Repository.open(backend, PASS).encrypted


def test_tampered_config_is_refused() -> None:
    backend = MemoryBackend()
    new_repo(backend)
    cfg = json.loads(backend.objects["config"])
    cfg["chunk_size"] = 2 * CHUNK
    backend.objects["config"] = json.dumps(cfg).encode()
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, PASS)


def test_encrypted_needs_passphrase_and_unencrypted_is_explicit() -> None:
    with pytest.raises(UsageError):
        Repository.init(MemoryBackend(), None)
    backend = MemoryBackend()
    repo = Repository.init(backend, None, encryption=False, chunk_size=CHUNK)
    img = bytearray(b"plain" * (CHUNK // 5) + b"\0" * (CHUNK % 5)) * 2
    rp = backup(repo, "vm", {1: img})
    again = Repository.open(backend, None)
    assert not again.encrypted and read_back(again, rp.id, 1) == img


def test_nothing_readable_is_stored_and_ids_are_keyed() -> None:
    marker = b"STILLPOINT-SECRET-MARKER"
    img = bytearray((marker * (CHUNK // len(marker) + 1))[:CHUNK]) * 3
    b1, b2 = MemoryBackend(), MemoryBackend()
    rp1 = backup(new_repo(b1), "secret-vm-name", {1: img})
    backup(new_repo(b2), "secret-vm-name", {1: img})
    for name, blob in b1.objects.items():
        assert marker not in blob and b"secret-vm-name" not in blob, name
    assert PASS.encode() not in b"".join(b1.objects.values())
    # the same data has different chunk ids in different repositories (keyed ids)
    assert rp1.disks[0].map_chunks[0] not in b"".join(b2.objects.values())
    import hashlib
    plain_id = hashlib.sha256(bytes(img[:CHUNK])).digest()
    assert all(plain_id not in blob for blob in b1.objects.values())


def test_unknown_version_refused_before_lock() -> None:
    inner = MemoryBackend()
    new_repo(inner)
    cfg = json.loads(inner.objects["config"])
    cfg["version"] = 99
    inner.objects["config"] = json.dumps(cfg).encode()
    spy = FaultyBackend(inner)
    with pytest.raises(RepositoryError, match="version 99"):
        Repository.open(spy, PASS)
    assert spy.stores == 0 and F.LOCK not in inner.objects


# -- integrity -----------------------------------------------------------------------------

def test_flipped_byte_in_a_pack_is_named_and_refused() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend, pack_size=64 * KIB)
    rng = random.Random(5)
    img = random_image(rng, 8 * CHUNK, fill=1.0)
    rp = backup(repo, "vm", {2000: img})
    other = backup(repo, "other", {1: random_image(rng, 2 * CHUNK, fill=1.0)})
    block_id = repo.block_map(rp, rp.disk(2000))[3 * 32:4 * 32]  # the block at 3*CHUNK
    pack_id, entry = repo.store.index.chunks[block_id]
    name = F.pack_name(pack_id)
    blob = bytearray(backend.objects[name])
    blob[entry.offset + entry.length // 2] ^= 0x01
    backend.objects[name] = bytes(blob)

    assert repo.check(read_data=False).ok  # structure is intact: same sizes
    report = repo.check(read_data=True)
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert kinds == {"pack-hash", "chunk-corrupt"}
    corrupt = [p for p in report.problems if p.kind == "chunk-corrupt"]
    assert len(corrupt) == 1 and block_id.hex() in corrupt[0].object
    assert corrupt[0].restore_points == [rp.id]
    assert report.damaged_restore_points == {rp.id}
    assert f"offset {3 * CHUNK}" in corrupt[0].message

    with pytest.raises(IntegrityError) as err:
        read_back(Repository.open(backend, PASS), rp.id, 2000)
    assert rp.id in str(err.value) and f"offset {3 * CHUNK}" in str(err.value)
    assert "disk 2000" in str(err.value)
    assert read_back(repo, other.id, 1)  # untouched restore points still read


def test_truncated_and_missing_packs_are_found_by_structure_check() -> None:
    inner = MemoryBackend()
    new_repo(inner)
    # store #1 of this session is the lock; #2 the first pack: store it torn
    repo = Repository.open(FaultyBackend(inner, truncate_store=2), PASS)
    rp = backup(repo, "vm", {1: bytearray(os.urandom(8 * CHUNK))})
    report = Repository.open(inner, PASS).check()
    assert [p.kind for p in report.problems] == ["pack-size"]
    assert report.problems[0].restore_points == [rp.id]

    victim = report.problems[0].object
    del inner.objects[victim]
    report = Repository.open(inner, PASS).check()
    assert [p.kind for p in report.problems] == ["pack-missing"]
    assert victim in str(report)


def test_lost_index_is_reported_and_prune_refuses_to_clean() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    rp = backup(repo, "vm", {1: bytearray(os.urandom(4 * CHUNK))})
    for name in [n for n in backend.objects if n.startswith("index/")]:
        del backend.objects[name]
    damaged = Repository.open(backend, PASS)
    report = damaged.check()
    assert {p.kind for p in report.problems} == {"blockmap", "chunk-missing"}
    assert report.damaged_restore_points == {rp.id} and report.unreferenced_packs
    packs = {n for n in backend.objects if n.startswith("data/")}
    with pytest.raises(IntegrityError):
        damaged.prune()
    assert {n for n in backend.objects if n.startswith("data/")} == packs  # nothing deleted


# -- locking -------------------------------------------------------------------------------

def test_lock_contention() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    other = Repository.open(backend, PASS)
    with repo.writer("vm"):
        lock = json.loads(backend.objects[F.LOCK])
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname() and lock["time"]
        with pytest.raises(RepositoryLocked, match=f"pid {os.getpid()}"):
            other.writer("vm")
        with pytest.raises(RepositoryLocked):
            other.prune()
        with pytest.raises(RepositoryLocked):
            other.forget(keep_last=1)
        assert other.list_restore_points() == []  # readers do not lock
    assert F.LOCK not in backend.objects
    with other.writer("vm"):
        pass


def test_stale_lock_of_dead_process_is_broken(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    backend.store(F.LOCK, json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                       "time": "2026-01-01T00:00:00+00:00"}).encode())
    with caplog.at_level(logging.WARNING), repo.writer("vm"):
        pass
    assert f"breaking stale repository lock of dead process {dead.pid}" in caplog.text


def test_lock_from_another_host_is_respected_until_broken() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    backend.store(F.LOCK, json.dumps({"pid": 1, "host": "elsewhere", "time": "t"}).encode())
    with pytest.raises(RepositoryLocked, match="elsewhere"):
        repo.writer("vm")
    assert repo.break_lock()["host"] == "elsewhere"
    with repo.writer("vm"):
        pass


# -- forget and prune ----------------------------------------------------------------------

def test_forget_and_prune_free_space_and_keep_the_rest_exact() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend)
    rng = random.Random(6)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    images: dict[str, bytes] = {}
    prev = {"a": None, "b": None}
    imgs = {"a": random_image(rng, 1 * MIB, fill=0.9), "b": random_image(rng, 1 * MIB)}
    for day in range(4):
        for vm in ("a", "b"):
            img = imgs[vm]
            extents = [(rng.randrange(0, 16) * CHUNK, CHUNK) for _ in range(4)]
            for off, n in extents:
                img[off:off + n] = rng.randbytes(n)
            rp = backup(repo, vm, {1: img}, base=prev[vm],
                        extents=None if prev[vm] is None else {1: extents},
                        time=t0 + timedelta(days=day))
            prev[vm] = rp.id
            images[rp.id] = bytes(img)
    before = total_size(backend)
    removed = repo.forget(keep_last=1, vm="a")
    assert len(removed) == 3 and all(r.vm.name == "a" for r in removed)
    assert len(repo.list_restore_points()) == 5
    report = repo.prune()
    assert report.bytes_freed > 0 and total_size(backend) < before
    check = repo.check(read_data=True)
    assert check.ok and not check.unreferenced_packs, str(check)
    fresh = Repository.open(backend, PASS)
    for rp in fresh.list_restore_points():
        assert read_back(fresh, rp.id, 1) == images[rp.id]
    assert fresh.prune().bytes_freed == 0  # nothing left to do


def test_retention_rules() -> None:
    from appliance.repository.restorepoint import VmRef
    t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def rp(i: int, hours: float) -> RestorePoint:
        return RestorePoint(f"{i:02d}", VmRef("vm"), t0 + timedelta(hours=hours), "crash", [],
                            {}, [])
    # two per day for 70 days
    points = [rp(i, i * 12) for i in range(140)]
    keep, remove = select(points, 2, 0, 0, 0)
    assert [r.id for r in keep] == ["139", "138"] and len(remove) == 138
    keep, _ = select(points, 0, 3, 0, 0)
    # newest of each of the last 3 days (139 is alone on its day, 00:00)
    assert [r.id for r in keep] == ["139", "138", "136"]
    keep, _ = select(points, 0, 0, 2, 3)
    days = sorted({r.time.date() for r in keep})
    assert len(keep) == 4 and days[-1] == points[-1].time.date()
    with pytest.raises(UsageError):
        new_repo().forget()


def test_forget_names_restore_points_all_or_nothing() -> None:
    repo = new_repo()
    rng = random.Random(12)
    a, b, c = (backup(repo, "vm", {2000: random_image(rng, 2 * CHUNK)}) for _ in range(3))
    assert [p.id for p in repo.forget_points([a.id[:8]], dry_run=True)] == [a.id]
    assert len(repo.restore_point_ids()) == 3
    with pytest.raises(NotFound):
        repo.forget_points([b.id, "feedfacefeedface"])
    assert len(repo.restore_point_ids()) == 3             # nothing forgotten
    gone = repo.forget_points([c.id, a.id[:8]])           # the newest too, if named
    assert [p.id for p in gone] == [a.id, c.id]
    assert repo.restore_point_ids() == [b.id]
    with pytest.raises(UsageError):
        repo.forget_points([])


# -- VMDK ----------------------------------------------------------------------------------

def test_restore_as_monolithic_flat_vmdk(tmp_path: Path) -> None:
    repo = new_repo()
    img = random_image(random.Random(7), 3 * CHUNK)
    rp = backup(repo, "vm", {2000: img})
    desc, flat = repo.restore_disk_to(rp.id, 2000, tmp_path / "disk.vmdk", format="vmdk")
    assert flat.name == "disk-flat.vmdk" and flat.read_bytes() == img
    text = desc.read_text()
    assert 'createType="monolithicFlat"' in text
    assert f'RW {3 * CHUNK // 512} FLAT "disk-flat.vmdk" 0' in text
    with pytest.raises(UsageError):
        repo.restore_disk_to(rp.id, 2000, tmp_path / "x", format="qcow2")


@pytest.mark.parametrize("fmt", ["raw", "vmdk"])
def test_a_failed_restore_leaves_nothing_at_the_target(tmp_path: Path, fmt: str) -> None:
    backend = MemoryBackend()
    repo = new_repo(backend, pack_size=64 * KIB)
    img = random_image(random.Random(9), 8 * CHUNK, fill=1.0)
    rp = backup(repo, "vm", {2000: img})
    block_id = repo.block_map(rp, rp.disk(2000))[5 * 32:6 * 32]   # fails after 5 blocks
    pack_id, entry = repo.store.index.chunks[block_id]
    blob = bytearray(backend.objects[F.pack_name(pack_id)])
    blob[entry.offset + entry.length // 2] ^= 0x01
    backend.objects[F.pack_name(pack_id)] = bytes(blob)

    target = tmp_path / ("disk.img" if fmt == "raw" else "disk.vmdk")
    with pytest.raises(IntegrityError):
        Repository.open(backend, PASS).restore_disk_to(rp.id, 2000, target, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no partial image, no temp file


def test_a_restore_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    repo = new_repo()
    img = random_image(random.Random(10), 4 * CHUNK)
    rp = backup(repo, "vm", {2000: img})
    target = tmp_path / "disk.img"
    target.write_bytes(b"the older image")
    assert repo.restore_disk_to(rp.id, 2000, target) == [target]
    assert target.read_bytes() == img and [p.name for p in tmp_path.iterdir()] == ["disk.img"]


def test_a_truncated_pack_is_one_line_per_damaged_object() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend, pack_size=1024 * KIB)
    rp = backup(repo, "vm", {2000: random_image(random.Random(11), 12 * CHUNK, fill=1.0)})
    name = max(backend.list(F.DATA_PREFIX), key=lambda i: i.size).name
    backend.objects[name] = backend.objects[name][:len(backend.objects[name]) // 3]

    report = repo.check(read_data=True)
    lines = [str(p) for p in report.problems]
    # The block map lives in the same pack: the restore point's map is a damaged object too.
    assert sorted(p.kind for p in report.problems) == [
        "blockmap", "chunk-corrupt", "pack-hash", "pack-size", "pack-trailer"], "\n".join(lines)
    (chunks,) = [p for p in report.problems if p.kind == "chunk-corrupt"]
    assert " chunks fail verification" in chunks.message and chunks.object == name
    assert chunks.restore_points == [rp.id]
    assert all(line.count(name) <= 1 for line in lines), "\n".join(lines)
    assert all(p.restore_points == [rp.id] for p in report.problems), "\n".join(lines)


def test_block_reader_gives_one_block_and_zeros_for_a_hole() -> None:
    repo = new_repo()
    img = random_image(random.Random(13), 6 * CHUNK + 100, fill=0.5)
    rp = backup(repo, "vm", {2000: img})
    disk = rp.disk(2000)
    block = repo.block_reader(rp.id, 2000)
    bs = disk.block_size
    for i in range(disk.blocks):
        assert block(i) == bytes(img[i * bs:(i + 1) * bs])
    with pytest.raises(IndexError):
        block(disk.blocks)
