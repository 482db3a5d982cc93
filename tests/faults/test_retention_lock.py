"""The retention lock (immutability): restore points younger than the repository's
`retention_lock_days` are never forgotten, by the repository API, by `stillpoint forget`, or
by a job's retention; the lock cannot be lowered by editing the config (the key wrap
authenticates it); prune frees nothing a locked restore point needs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import check_read_data, cli, list_ids

from appliance.errors import UsageError, WrongPassphrase
from appliance.repository import MemoryBackend, Repository

FAST_KDF = {"name": "argon2id", "iterations": 1, "lanes": 1, "memory_kib": 64}
PASS = "retention lock test passphrase"


def _point(repo: Repository, days_old: float, seed: int) -> str:
    when = datetime.now(UTC) - timedelta(days=days_old)
    with repo.writer("vm-a", moref="vm-1", uuid="uuid-a", time=when) as w:
        d = w.disk(2000, "Hard disk 1", 64 * 1024)
        d.write(0, bytes([seed]) * 64 * 1024)
        d.finish(change_id="c")
        return w.commit("crash", reasons=["test"]).id


def test_forget_by_name_refuses_a_locked_point_and_forgets_nothing() -> None:
    repo = Repository.init(MemoryBackend(), PASS, kdf=FAST_KDF, chunk_size=64 * 1024,
                           pack_size=64 * 1024, retention_lock_days=7)
    old, young = _point(repo, 30, 1), _point(repo, 1, 2)
    with pytest.raises(UsageError, match=f"retention lock, nothing forgotten: {young[:12]}"):
        repo.forget_points([old[:10], young[:10]])
    assert sorted(repo.restore_point_ids()) == sorted([old, young])
    assert [p.id for p in repo.forget_points([old[:10]])] == [old]   # a prefix names it
    assert repo.restore_point_ids() == [young]


def test_forget_keeps_locked_points_and_prune_keeps_their_data() -> None:
    repo = Repository.init(MemoryBackend(), PASS, kdf=FAST_KDF, chunk_size=64 * 1024,
                           pack_size=64 * 1024, retention_lock_days=7)
    old = _point(repo, 30, 1)
    young = [_point(repo, 3, 2), _point(repo, 1, 3)]
    gone = repo.forget(keep_last=1)
    assert [p.id for p in gone] == [old]
    assert sorted(repo.restore_point_ids()) == sorted(young)
    repo.prune()
    assert repo.check(read_data=True).ok
    for i, rp in enumerate(young):
        assert b"".join(b or b"" for _, b in repo.read_disk(rp, 2000)) == bytes([2 + i]) * 65536


def test_lock_cannot_be_lowered_by_editing_the_config() -> None:
    backend = MemoryBackend()
    Repository.init(backend, PASS, kdf=FAST_KDF, retention_lock_days=30)
    config = json.loads(backend.load("config"))
    config["retention_lock_days"] = 0
    backend.store("config", json.dumps(config).encode())
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, PASS)
    del config["retention_lock_days"]
    backend.store("config", json.dumps(config).encode())
    with pytest.raises(WrongPassphrase):
        Repository.open(backend, PASS)


def test_lock_out_of_range_is_refused() -> None:
    with pytest.raises(UsageError):
        Repository.init(MemoryBackend(), PASS, kdf=FAST_KDF, retention_lock_days=-1)


def test_cli_forget_and_prune_leave_locked_points(lab: Any, profile_path: Path) -> None:
    doc = json.loads(profile_path.read_text())
    doc["repository"]["retention_lock_days"] = 14
    profile_path.write_text(json.dumps(doc))
    for _ in range(3):
        assert cli("backup", "lab-raw1", "--app-aware", "off").returncode == 0
    before = list_ids()
    forget = cli("forget", "--keep-last", "1")
    assert forget.returncode == 0, forget.stderr
    assert "forgot" not in forget.stdout
    prune = cli("prune")
    assert prune.returncode == 0, prune.stderr
    assert prune.stdout.startswith("prune: 0 pack(s) deleted, "), prune.stdout   # not a repr
    assert prune.stdout.rstrip().endswith(" freed")
    assert list_ids() == before
    check_read_data()
    config = json.loads((Path(doc["repository"]["path"]) / "config").read_text())
    assert config["retention_lock_days"] == 14


def test_profile_with_a_bad_lock_is_refused(lab: Any, profile_path: Path) -> None:
    doc = json.loads(profile_path.read_text())
    doc["repository"]["retention_lock_days"] = "forever"
    profile_path.write_text(json.dumps(doc))
    result = cli("init")
    assert result.returncode == 2 and "retention_lock_days" in result.stderr
    assert not Path(doc["repository"]["path"]).exists()
