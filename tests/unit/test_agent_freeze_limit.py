"""The freeze limit holds whatever a writer does (issue 13, item 1), driven through the
agent's own session with writers that misbehave on purpose."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent_payload" / "linux"))

from stillpoint_agent import session as agent_session  # noqa: E402
from stillpoint_agent import writers as agent_writers  # noqa: E402
from stillpoint_agent.config import effective  # noqa: E402
from stillpoint_agent.protocol import AgentError  # noqa: E402

from appliance.jobs import consistency  # noqa: E402

WAIT_S = 15.0   # how long a test waits for something that should happen in about a second


class Recording(agent_writers.Writer):
    def __init__(self, name: str, rank: int) -> None:
        super().__init__(name)
        self.rank = rank
        self.froze = threading.Event()
        self.aborted = threading.Event()
        self.seen_deadline: float | None = None
        self.seen_left: float | None = None

    def freeze(self) -> None:
        self.seen_deadline = self.deadline
        self.seen_left = self.time_left(60.0)
        self.froze.set()

    def abort(self, reason: str) -> None:
        self.aborted.set()


class Stuck(Recording):
    """A writer whose freeze ignores its deadline until the test lets it go."""

    def __init__(self, name: str, rank: int) -> None:
        super().__init__(name, rank)
        self.release = threading.Event()

    def freeze(self) -> None:
        super().freeze()
        self.release.wait(WAIT_S * 2)


class Slow(Recording):
    def freeze(self) -> None:
        super().freeze()
        time.sleep(0.3)


def session_with(monkeypatch: pytest.MonkeyPatch, writers: list[Any],
                 limit: float) -> agent_session.BackupSession:
    monkeypatch.setattr(agent_writers, "discover", lambda cfg, skipped: list(writers))
    s = agent_session.BackupSession(effective({"freeze_timeout_s": limit}), None)
    s.prepare()
    return s


def test_the_watchdog_thaws_the_others_while_a_writer_is_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hooks, stuck = Recording("hooks", 10), Stuck("db", 30)
    s = session_with(monkeypatch, [hooks, stuck], limit=1.0)
    outcome: dict[str, Any] = {}

    def freeze() -> None:
        try:
            s.freeze()
        except AgentError as err:
            outcome["error"] = err

    protocol = threading.Thread(target=freeze)
    protocol.start()
    assert stuck.froze.wait(WAIT_S)
    # The stuck writer still holds the session lock; the watchdog must not need it.
    assert hooks.aborted.wait(WAIT_S), "the watchdog waited for the stuck writer"
    assert protocol.is_alive() and not stuck.aborted.is_set()
    assert s.status()["state"] == "expired"
    stuck.release.set()
    protocol.join(WAIT_S)
    assert outcome["error"].code == "freeze-expired"
    assert stuck.aborted.is_set(), "the stuck writer was not undone once it returned"
    assert {n: w["state"] for n, w in s.status()["writers"].items()} == {
        "hooks": "aborted", "db": "aborted"}


def test_every_writer_gets_what_is_left_of_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = Slow("hooks", 10), Recording("db", 30)
    s = session_with(monkeypatch, [first, second], limit=5.0)
    frozen = s.freeze()
    s.thaw()
    assert first.seen_deadline == second.seen_deadline == pytest.approx(s.frozen_at + 5.0)
    assert first.seen_left is not None and second.seen_left is not None
    assert second.seen_left <= first.seen_left - 0.3      # the first writer's 0.3 s is gone
    assert frozen["held_ms"] >= 300                       # counted from the first hold


def test_a_writer_with_nothing_left_refuses_to_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = Recording("db", 30)
    writer.deadline = time.monotonic() - 0.1
    with pytest.raises(agent_writers.WriterFailure, match="freeze limit was reached"):
        writer.time_left(20.0)


class FakeAgent:
    def __init__(self, held_ms: int) -> None:
        self.held_ms = held_ms

    def prepare(self, config: Any = None) -> dict[str, Any]:
        return {}

    def freeze(self, timeout_s: float | None = None) -> dict[str, Any]:
        return {"state": "frozen", "held_ms": self.held_ms}

    def thaw(self) -> dict[str, Any]:
        return {"state": "thawed", "writers": {}, "durations": {}}


@pytest.mark.parametrize("held_ms, asked", [(0, True), (9_200, True), (10_500, False)])
def test_the_snapshot_budget_counts_from_the_freeze_itself(
        monkeypatch: pytest.MonkeyPatch, held_ms: int, asked: bool) -> None:
    timeouts: list[float] = []

    def create_snapshot(*args: Any, timeout: float, **kw: Any) -> object:
        timeouts.append(timeout)
        return object()

    monkeypatch.setattr(consistency.snapshots, "create_snapshot", create_snapshot)
    monkeypatch.setattr(consistency, "_remove_quietly", lambda session, snap: None)
    policy = consistency.ConsistencyPolicy(app_aware="require", snapshot_budget_s=10.0)
    attempts: list[Any] = []
    if asked:
        consistency._agent_attempt(None, None, "s", FakeAgent(held_ms), policy, 1, attempts)
        assert len(timeouts) == 1 and timeouts[0] <= 10.0 - held_ms / 1000 + 0.05
    else:
        with pytest.raises(consistency.AttemptFailed, match="whole 10 s snapshot budget"):
            consistency._agent_attempt(None, None, "s", FakeAgent(held_ms), policy, 1, attempts)
        assert timeouts == []


class FakeWindowsAgent(FakeAgent):
    def freeze(self, timeout_s: float | None = None) -> dict[str, Any]:
        return {"state": "frozen", "quiesce": {"by": "vmware-tools-vss"}}

    def thaw(self) -> dict[str, Any]:
        return {"state": "thawed", "writers": {}, "durations": {}, "results": {}}


def test_a_vss_snapshot_task_gets_its_own_total_not_the_commit_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """VMware Tools runs the writers' preparation inside CreateSnapshotEx_Task: the 10 s
    commit window is VSS's own inside the guest, the task has a total of its own."""
    calls: list[dict[str, Any]] = []

    def create_snapshot(*args: Any, **kw: Any) -> object:
        calls.append(kw)
        return object()

    monkeypatch.setattr(consistency.snapshots, "create_snapshot", create_snapshot)
    policy = consistency.ConsistencyPolicy(app_aware="require", snapshot_budget_s=10.0)
    consistency._agent_attempt(None, None, "s", FakeWindowsAgent(0), policy, 1, [])
    [kw] = calls
    assert kw["windows_vss"] and kw["timeout"] == consistency.VSS_TASK_TIMEOUT_S > 60


def test_vmware_tools_gives_up_before_the_appliance_stops_waiting() -> None:
    from appliance.vsphere.snapshots import vss_minutes

    assert vss_minutes(900) == 14 and vss_minutes(30) == 1


class DeadAgent(FakeAgent):
    def thaw(self) -> dict[str, Any]:
        from appliance.errors import GuestError

        raise GuestError("the agent exited during thaw")


def test_a_dead_agent_is_the_reason_given_not_the_budget_it_blew(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consistency.snapshots, "create_snapshot",
                        lambda *a, **kw: pytest.fail("no snapshot after the budget"))
    policy = consistency.ConsistencyPolicy(app_aware="require", snapshot_budget_s=10.0)
    with pytest.raises(consistency.AttemptFailed, match="agent exited during thaw"):
        consistency._agent_attempt(None, None, "s", DeadAgent(30_000), policy, 1, [])
