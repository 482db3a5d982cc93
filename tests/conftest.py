"""Test isolation for every test (borg's clean_env): no user profile, caches in tmp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_OUR_VARS = ("STILLPOINT_PROFILE", "STILLPOINT_VC_USER", "STILLPOINT_VC_PASSWORD",
             "STILLPOINT_PASSPHRASE", "STILLPOINT_REPOSITORY", "STILLPOINT_DEBUG")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in _OUR_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("STILLPOINT_LOG_DIR", str(home / "log"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under tests/lab and tests/faults need the lab; everything else is a unit test.
    for item in items:
        path = str(item.fspath)
        if "/tests/lab/" in path or "/tests/faults/" in path:
            item.add_marker(pytest.mark.lab)
        elif not item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.unit)


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    # After the test's own teardown: end the labs of a directory the run is leaving.
    yield
    from directory_scope import leaving

    leaving(Path(str(item.fspath)), Path(str(nextitem.fspath)) if nextitem else None)
