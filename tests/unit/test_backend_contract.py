"""One contract suite for every Backend implementation (restic's backend test suite)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.errors import StorageFull
from appliance.repository import (
    Backend,
    BackendPermanent,
    BackendTransient,
    FaultyBackend,
    LocalBackend,
    MemoryBackend,
    ObjectNotFound,
    SimulatedCrash,
)
from appliance.repository.backend import classify_oserror
from appliance.repository.retry import RetryBackend

pytestmark = pytest.mark.unit

FACTORIES: dict[str, Callable[[Path], Backend]] = {
    "memory": lambda tmp: MemoryBackend(),
    "local": lambda tmp: LocalBackend(tmp / "repo"),
    "faulty-memory": lambda tmp: FaultyBackend(MemoryBackend()),
    "faulty-local": lambda tmp: FaultyBackend(LocalBackend(tmp / "repo")),
    "retry-local": lambda tmp: RetryBackend(LocalBackend(tmp / "repo"), initial_delay=0),
}


@pytest.fixture(params=sorted(FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    b = FACTORIES[request.param](tmp_path)
    b.create()
    b.open()
    return b


def names(b: Backend, prefix: str = "") -> list[str]:
    return sorted(i.name for i in b.list(prefix))


def test_is_a_backend(backend: Backend) -> None:
    assert isinstance(backend, Backend)


def test_store_load_roundtrip(backend: Backend) -> None:
    data = os.urandom(100_000)
    backend.store("data/ab/abcd", data)
    assert backend.load("data/ab/abcd") == data
    assert backend.info("data/ab/abcd").size == len(data)


def test_ranged_load(backend: Backend) -> None:
    backend.store("obj", bytes(range(256)))
    assert backend.load("obj", 10, 5) == bytes(range(10, 15))
    assert backend.load("obj", 250) == bytes(range(250, 256))
    assert backend.load("obj", 250, 100) == bytes(range(250, 256))  # short only at the end
    assert backend.load("obj", 300, 10) == b""


def test_store_accepts_memoryview_and_replaces(backend: Backend) -> None:
    backend.store("config", memoryview(b"0123456789")[2:6])
    assert backend.load("config") == b"2345"
    backend.store("config", b"new")
    assert backend.load("config") == b"new"
    assert names(backend) == ["config"]


def test_list_by_prefix(backend: Backend) -> None:
    for n in ("index/1", "index/2", "data/00/x", "data/01/y", "config"):
        backend.store(n, n.encode())
    assert names(backend, "index/") == ["index/1", "index/2"]
    assert names(backend, "data/") == ["data/00/x", "data/01/y"]
    assert {i.name: i.size for i in backend.list()}["data/01/y"] == len(b"data/01/y")
    assert names(backend, "nothing/") == []


def test_missing_objects_are_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.load("index/missing")
    with pytest.raises(ObjectNotFound):
        backend.info("index/missing")
    with pytest.raises(ObjectNotFound):
        backend.delete("index/missing")


def test_delete(backend: Backend) -> None:
    backend.store("lock", b"x")
    backend.delete("lock")
    assert names(backend) == []
    with pytest.raises(ObjectNotFound):
        backend.load("lock")


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a/../b", "UPPER", "", "a//b", ".hidden"])
def test_invalid_names_rejected(backend: Backend, bad: str) -> None:
    with pytest.raises(BackendPermanent):
        backend.store(bad, b"x")


def test_create_refuses_non_empty_storage(backend: Backend) -> None:
    backend.store("config", b"x")
    with pytest.raises(BackendPermanent):
        backend.create()


# -- local backend specifics --------------------------------------------------------------

def test_local_store_is_private_and_leaves_no_temp_files(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "repo")
    b.create()
    b.store("data/aa/bb", b"x" * 10)
    path = tmp_path / "repo" / "data" / "aa" / "bb"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["bb"]
    assert (tmp_path / "repo").stat().st_mode & 0o777 == 0o700


def test_local_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        LocalBackend(tmp_path / "nope").open()


@pytest.mark.parametrize("code,cls", [
    (errno.ENOSPC, StorageFull), (errno.EDQUOT, StorageFull), (errno.EIO, BackendTransient),
    (errno.EACCES, BackendPermanent), (errno.EROFS, BackendPermanent),
    (errno.ENOENT, ObjectNotFound),
])
def test_oserror_classification(code: int, cls: type) -> None:
    assert isinstance(classify_oserror(OSError(code, os.strerror(code)), "x"), cls)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stillpoint-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_local_enospc_is_storage_full(tiny_fs: Path) -> None:
    b = LocalBackend(tiny_fs / "repo")
    b.create()
    with pytest.raises(StorageFull):
        b.store("data/00/big", os.urandom(2 * 1024 * 1024))
    assert names(b) == []  # the temp file was removed


# -- the fault injector itself ------------------------------------------------------------

def test_faulty_fail_store_is_transient_and_stores_nothing() -> None:
    inner = MemoryBackend()
    b = FaultyBackend(inner, fail_store=2)
    b.store("a", b"1")
    with pytest.raises(BackendTransient):
        b.store("b", b"2")
    b.store("c", b"3")
    assert sorted(inner.objects) == ["a", "c"]


def test_faulty_enospc_and_truncate() -> None:
    inner = MemoryBackend()
    b = FaultyBackend(inner, truncate_store=1, enospc_after=1)
    b.store("a", b"12345678")
    assert inner.objects["a"] == b"1234"
    with pytest.raises(StorageFull):
        b.store("b", b"x")


def test_faulty_crash_stops_everything() -> None:
    inner = MemoryBackend()
    b = FaultyBackend(inner, crash_after=2)
    b.store("a", b"1")
    assert b.load("a") == b"1"
    with pytest.raises(SimulatedCrash):
        b.store("b", b"2")
    with pytest.raises(SimulatedCrash):
        b.load("a")
    assert b.crashed and sorted(inner.objects) == ["a"]


# -- the retry wrapper --------------------------------------------------------------------

def test_retry_retries_transient_errors_only() -> None:
    inner = MemoryBackend()
    faulty = FaultyBackend(inner, fail_store=1)
    b = RetryBackend(faulty, attempts=3, initial_delay=0)
    b.store("a", b"1")  # first attempt fails (transient), the retry stores it
    assert inner.objects == {"a": b"1"} and faulty.stores == 2
    with pytest.raises(ObjectNotFound):
        b.load("missing")
    assert faulty.ops == 3  # not found is not retried

    full = FaultyBackend(MemoryBackend(), enospc_after=0)
    with pytest.raises(StorageFull):
        RetryBackend(full, attempts=3, initial_delay=0).store("a", b"1")
    assert full.stores == 1


def test_retry_gives_up_after_its_attempts() -> None:
    class Flaky(MemoryBackend):
        calls = 0

        def store(self, name: str, data: bytes | memoryview) -> None:
            Flaky.calls += 1
            raise BackendTransient("always")

    with pytest.raises(BackendTransient):
        RetryBackend(Flaky(), attempts=4, initial_delay=0).store("a", b"1")
    assert Flaky.calls == 4
