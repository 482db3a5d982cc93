"""The lab fixtures' directory scope: closed once, when the run leaves the directory."""

from __future__ import annotations

from pathlib import Path

from directory_scope import close_on_leaving, leaving


def test_closed_once_when_the_next_test_is_elsewhere(tmp_path: Path) -> None:
    faults, lab = tmp_path / "faults", tmp_path / "lab"
    calls: list[str] = []
    close = close_on_leaving(faults, lambda: calls.append("down"))
    leaving(faults / "test_a.py", faults / "test_b.py")
    assert calls == []                       # still inside tests/faults
    leaving(lab / "test_x.py", lab / "test_y.py")
    assert calls == []                       # another directory's test: not ours
    leaving(faults / "test_b.py", lab / "test_x.py")
    assert calls == ["down"]
    close()                                  # the fixture's finally: already closed
    leaving(faults / "test_b.py", None)
    assert calls == ["down"]


def test_last_test_of_the_run_closes(tmp_path: Path) -> None:
    calls: list[str] = []
    close_on_leaving(tmp_path, lambda: calls.append("down"))
    leaving(tmp_path / "sub" / "test_a.py", None)
    assert calls == ["down"]
