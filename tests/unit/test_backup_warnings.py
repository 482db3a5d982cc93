"""Degraded success says so: the warning exit code and the vCenter event (issue 13, item 8)."""

from __future__ import annotations


import pytest

from appliance.commands.backup import exit_code_of
from appliance.errors import WARNING_EXIT_CODE
from appliance.jobs import backup
from appliance.jobs.backup import VMResult


def test_a_warning_exits_with_its_own_code_and_a_failure_wins() -> None:
    ok = VMResult(vm="a", ok=True)
    degraded = VMResult(vm="b", ok=True, warnings=["fell back to crash-consistent"])
    failed = VMResult(vm="c", ok=False, exit_code=8)
    assert exit_code_of([ok]) == 0
    assert exit_code_of([ok, degraded]) == WARNING_EXIT_CODE == 12
    assert exit_code_of([degraded, failed]) == 8


def test_the_exit_code_is_listed_in_help() -> None:
    from appliance.cli import EXIT_CODES_HELP

    assert " 12 done, with warnings" in EXIT_CODES_HELP


@pytest.mark.parametrize("warnings, level", [([], "info"), (["truncation skipped"], "warning")])
def test_the_vcenter_event_carries_the_warning(monkeypatch: pytest.MonkeyPatch,
                                               warnings: list[str], level: str) -> None:
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(backup.events, "post_vm_event",
                        lambda session, vm, message, lvl: posted.append((message, lvl)))
    result = VMResult(vm="a", ok=True, restore_point="ab" * 16, consistency="crash",
                      warnings=list(warnings))
    backup._post_outcome(None, object(), "job-1", result)  # type: ignore[arg-type]
    [(message, got)] = posted
    assert got == level
    assert all(w in message for w in warnings)
