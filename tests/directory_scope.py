"""A session fixture that ends when the run leaves its directory.

pytest's "package" scope needs an __init__.py (the test modules' import names would change),
and a session fixture lives until the end of the run: the fault suite's booted VM would keep
running under TCG, on the same two cores, through every test in tests/lab and tests/unit.
A lab fixture registers its teardown here; tests/conftest.py's runtest hook runs it right
after the last test of that directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_CLOSERS: dict[Path, list[Callable[[], None]]] = {}


def close_on_leaving(directory: Path, close: Callable[[], None]) -> Callable[[], None]:
    """Register `close` for `directory`; returns an idempotent version of it for the
    fixture's own finally (a run stopped early, or one that ends inside the directory)."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            close()

    _CLOSERS.setdefault(directory.resolve(), []).append(once)
    return once


def leaving(item_path: Path, next_path: Path | None) -> None:
    """Called after each test's teardown: close what belongs to a directory the next test
    is not in."""
    for directory, closers in list(_CLOSERS.items()):
        if not item_path.resolve().is_relative_to(directory):
            continue
        if next_path is not None and next_path.resolve().is_relative_to(directory):
            continue
        for close in closers:
            close()
        del _CLOSERS[directory]
