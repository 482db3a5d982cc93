"""Crash after every N-th backend operation during a backup commit and during prune.

After each simulated crash the repository is reopened from what the storage holds: check
with read_data must pass, every committed restore point must restore bit-exact, no half
restore point may be visible, and the next prune must leave no leftovers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from appliance.repository import FaultyBackend, MemoryBackend, Repository, SimulatedCrash

pytestmark = pytest.mark.unit

KIB = 1024
CHUNK = 64 * KIB
BLOCK = 128 * KIB
CAP = 16 * BLOCK + CHUNK
FAST_KDF = {"name": "argon2id", "iterations": 1, "lanes": 1, "memory_kib": 64}
PASS = "pw"


def image(rng: random.Random, cap: int) -> bytearray:
    img = bytearray(cap)
    for off in range(0, cap, CHUNK):
        if rng.random() < 0.7:
            img[off:off + CHUNK] = rng.randbytes(CHUNK)
    return img


def read_back(repo: Repository, rp_id: str, key: int) -> bytes:
    rp = repo.get(rp_id)
    out = bytearray(rp.disk(key).capacity)
    for off, data in repo.read_disk(rp, key):
        if data is not None:
            out[off:off + len(data)] = data
    return bytes(out)


def clone(backend: MemoryBackend) -> MemoryBackend:
    copy = MemoryBackend()
    copy.objects = dict(backend.objects)
    return copy


def full_backup(repo: Repository, vm: str, disks: dict[int, bytes], time=None) -> str:
    with repo.writer(vm, time=time) as w:
        for key, img in disks.items():
            d = w.disk(key, f"disk {key}", len(img))
            d.write(0, img)
            d.finish(f"c{key}")
        return w.commit("crash").id


def assert_recovered(inner: MemoryBackend, expected: dict[str, dict[int, bytes]],
                     maybe: dict[str, dict[int, bytes]]) -> Repository:
    """Reopen after a crash: the `expected` restore points (by id) must be there and exact;
    besides them at most one restore point per VM named in `maybe` (vm -> disks), whole."""
    repo = Repository.open(inner, PASS)
    repo.break_lock()  # the crashed "process" is this one, still alive: the operator breaks it
    report = repo.check(read_data=True)
    assert report.ok, str(report)
    visible = repo.list_restore_points()
    assert set(expected) <= {rp.id for rp in visible}
    extra = [rp for rp in visible if rp.id not in expected]
    assert len({rp.vm.name for rp in extra}) == len(extra)
    for rp in visible:
        disks = expected[rp.id] if rp.id in expected else maybe[rp.vm.name]
        assert sorted(d.key for d in rp.disks) == sorted(disks)
        for key, img in disks.items():
            assert read_back(repo, rp.id, key) == img, (rp.id, key)
    return repo


def run_crashing(inner_state: MemoryBackend, work: Callable[[Repository], object],
                 check: Callable[[MemoryBackend, bool], None]) -> int:
    """Crash the workload after N operations for N = 0, 1, ... until it runs to the end
    (the count varies a little with thread timing: pack boundaries); returns that N."""
    probe = FaultyBackend(clone(inner_state))
    work(Repository.open(probe, PASS))
    for n in range(2 * probe.ops + 1):
        inner = clone(inner_state)
        faulty = FaultyBackend(inner, crash_after=n)
        try:
            work(Repository.open(faulty, PASS))
            finished = True
        except SimulatedCrash:
            finished = False
        check(inner, finished)
        if finished:
            assert n > probe.ops // 2
            return n
    raise AssertionError(f"the workload never finished within {2 * probe.ops} operations")


def test_crash_during_backup_commit() -> None:
    rng = random.Random(11)
    backend = MemoryBackend()
    repo = Repository.init(backend, PASS, kdf=FAST_KDF, chunk_size=BLOCK, pack_size=192 * KIB)
    base_img = bytes(image(rng, CAP))
    base_id = full_backup(repo, "vm", {2000: base_img})
    other_img = bytes(image(rng, 4 * BLOCK))
    committed = {base_id: {2000: base_img}}

    new_img = bytearray(base_img)
    extents = [(CHUNK, 3 * CHUNK), (5 * BLOCK, BLOCK + CHUNK), (CAP - CHUNK, CHUNK)]
    for off, n in extents:
        new_img[off:off + n] = rng.randbytes(n)
    second = bytes(image(rng, 3 * BLOCK))
    def work(r: Repository) -> None:
        with r.writer("vm") as w:
            d = w.disk(2000, "disk", CAP, base=base_id)
            for off, n in extents:
                d.write(off, bytes(new_img[off:off + n]))
            d.finish("c2")
            d2 = w.disk(2001, "new disk", len(second))
            d2.write(0, second)
            d2.finish("c3")
            w.commit("filesystem")
        # a second VM in the same run: dedups against the first
        full_backup(r, "other", {1: other_img})

    maybe = {"vm": {2000: bytes(new_img), 2001: second}, "other": {1: other_img}}

    def check(inner: MemoryBackend, finished: bool) -> None:
        repo = assert_recovered(inner, committed, maybe)
        if finished:
            assert len(repo.list_restore_points()) == 3
        repo.prune()
        report = repo.check(read_data=True)
        assert report.ok and not report.unreferenced_packs, str(report)

    assert run_crashing(backend, work, check) > 10


def test_crash_during_prune() -> None:
    rng = random.Random(12)
    backend = MemoryBackend()
    repo = Repository.init(backend, PASS, kdf=FAST_KDF, chunk_size=BLOCK, pack_size=192 * KIB)
    imgs: dict[str, dict[int, bytes]] = {}
    a = image(rng, CAP)
    for i in range(3):
        for off in (rng.randrange(0, CAP // CHUNK) * CHUNK for _ in range(4)):
            a[off:off + CHUNK] = rng.randbytes(CHUNK)
        rp_id = full_backup(repo, "a", {1: bytes(a)})
        imgs[rp_id] = {1: bytes(a)}
    b_img = bytes(a[:4 * BLOCK]) + bytes(image(rng, 4 * BLOCK))
    imgs[full_backup(repo, "b", {1: b_img})] = {1: b_img}
    removed = {r.id for r in repo.forget(keep_last=1, vm="a")}
    assert len(removed) == 2
    kept = {k: v for k, v in imgs.items() if k not in removed}

    def check(inner: MemoryBackend, finished: bool) -> None:
        repo = assert_recovered(inner, kept, {})
        repo.prune()
        report = repo.check(read_data=True)
        assert report.ok and not report.unreferenced_packs, str(report)
        assert_recovered(inner, kept, {})

    run_crashing(backend, lambda r: r.prune(), check)
