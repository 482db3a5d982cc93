"""Windows writer facts: parsers fed with vssadmin / diskshadow / eseutil outputs in their
documented shapes (tests/cassettes/winrm/outputs/), the quiesce spec, and the truncation
policy decided from msdb facts."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.guest import winrm_vss
from appliance.guest.winrm_vss import (
    VSS_BT_COPY,
    TruncationPolicy,
    parse_diskshadow_writers,
    parse_eseutil_state,
    parse_vssadmin_writers,
    truncation_plan,
    unstable_writers,
    windows_quiesce_spec,
)

OUT = Path(__file__).resolve().parents[1] / "cassettes" / "winrm" / "outputs"
PAYLOAD = Path(__file__).resolve().parents[2] / "agent_payload" / "windows"
NOW = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)


def text(name: str) -> str:
    return (OUT / name).read_text()


def test_vssadmin_stable() -> None:
    writers = parse_vssadmin_writers(text("vssadmin_list_writers_stable.txt"))
    assert len(writers) == 12
    sql = next(w for w in writers if w.name == "SqlServerWriter")
    assert sql.writer_id == "{a65faa63-5ea8-4ebc-9dbd-a0c4db26912a}"
    assert sql.instance_id.startswith("{") and sql.instance_id != sql.writer_id
    assert (sql.state, sql.last_error, sql.stable) == (1, "No error", True)
    assert unstable_writers(writers) == []


def test_vssadmin_failed_writer_is_named_with_its_state() -> None:
    writers = parse_vssadmin_writers(text("vssadmin_list_writers_sql_failed.txt"))
    assert unstable_writers(writers) == [
        "VSS writer 'SqlServerWriter' is in state [8] failed at prepare snapshot "
        "(last error: Non-retryable error)"]


def test_vssadmin_waiting_writer_is_not_stable() -> None:
    writers = parse_vssadmin_writers(text("vssadmin_list_writers_waiting.txt"))
    [msg] = unstable_writers(writers)
    assert "'Microsoft Exchange Writer'" in msg and "[5] waiting for backup complete" in msg


def test_vssadmin_stable_with_last_error_is_parsed() -> None:
    writers = parse_vssadmin_writers(text("vssadmin_list_writers_exchange_timeout.txt"))
    ex = next(w for w in writers if w.name == "Microsoft Exchange Writer")
    assert (ex.state, ex.last_error) == (1, "Timed out")


def test_vssadmin_localised_output_still_parses() -> None:
    writers = parse_vssadmin_writers(text("vssadmin_list_writers_german.txt"))
    english = parse_vssadmin_writers(text("vssadmin_list_writers_stable.txt"))
    assert [(w.name, w.writer_id, w.instance_id, w.state) for w in writers] == [
        (w.name, w.writer_id, w.instance_id, w.state) for w in english]
    assert writers[0].last_error == "Kein Fehler"


def test_vssadmin_without_indentation() -> None:
    sample = ("Writer name: 'System Writer'\nWriter Id: {e8132975-6f93-4464-a53e-1050253ae220}\n"
              "Writer Instance Id: {449e12cf-6b8f-4d75-a821-bc869d6612c4}\nState: [7] Failed\n"
              "Last error: No error\n")
    [w] = parse_vssadmin_writers(sample)
    assert (w.state, w.state_name, w.stable) == (7, "failed at prepare backup", False)


def test_powershell_and_python_parsers_share_their_patterns() -> None:
    # The agent's ConvertFrom-VssadminWriters must use the same grammar as the Python one.
    ps = (PAYLOAD / "lib" / "VssWriters.ps1").read_text()
    body = ps[ps.index("function ConvertFrom-VssadminWriters"):ps.index("function Get-VssWriters")]
    ps_patterns = [a or b for a, b in re.findall(r"-match (?:\"(\^[^\"]+)\"|'(\^[^']+)')", body)]
    assert ps_patterns == [p.pattern for p in (winrm_vss._NAME, winrm_vss._GUID,
                                               winrm_vss._STATE, winrm_vss._VALUE)]
    # And those patterns, run by Python's re (same syntax as .NET here), read the fixture.
    lines = text("vssadmin_list_writers_sql_failed.txt").splitlines()
    names = [m.group(1) for ln in lines if (m := re.match(ps_patterns[0], ln.strip()))]
    states = [int(m.group(1)) for ln in lines if (m := re.match(ps_patterns[2], ln.strip()))]
    assert dict(zip(names, states))["SqlServerWriter"] == 8


def test_diskshadow_components_and_paths() -> None:
    writers = {w.name: w for w in parse_diskshadow_writers(text(
        "diskshadow_list_writers_detailed.txt"))}
    ex = writers["Microsoft Exchange Writer"]
    assert ex.writer_id == "{76fe1ac4-15f7-4bcd-987e-8e1acb462fb7}"
    assert ex.restore_method == "VSS_RME_RESTORE_TO_ALTERNATE_LOCATION"
    [comp] = ex.components
    assert comp.paths == [r"e:\exchange\db01", r"f:\exchange\logs01"]
    assert (comp.type, comp.selectable) == ("VSS_CT_DATABASE", True)
    sql = writers["SqlServerWriter"].components[0]
    assert (sql.name, sql.logical_path) == ("SalesDB", "SQL01")
    assert sql.paths == [r"d:\sqldata\salesdb.mdf", r"l:\sqllogs\salesdb_log.ldf"]


@pytest.mark.parametrize("name, state", [("eseutil_mh_dirty.txt", "Dirty Shutdown"),
                                         ("eseutil_mh_clean.txt", "Clean Shutdown")])
def test_eseutil_header_state(name: str, state: str) -> None:
    assert parse_eseutil_state(text(name)) == state


def test_quiesce_spec_is_copy_type() -> None:
    from pyVmomi import vim

    spec = windows_quiesce_spec(vim, timeout_minutes=3)
    assert isinstance(spec, vim.vm.WindowsQuiesceSpec)
    assert (spec.vssBackupType, spec.vssBackupContext, spec.timeout) == (VSS_BT_COPY,
                                                                         "ctx_backup", 3)


def test_truncation_plan_from_msdb_facts() -> None:
    facts = json.loads(text("thaw_results_sql_exchange.json"))
    plan = truncation_plan(facts, TruncationPolicy(), now=NOW)
    assert [(t["instance"], t["database"]) for t in plan.sql] == [
        ("MSSQLSERVER", "SalesDB"), ("MSSQLSERVER", "Staging")]
    assert plan.sql[1]["last_log_backup"] == "2026-11-24T23:00:00.0000000Z"
    skipped = "\n".join(plan.skipped)
    assert "Payroll: log chain owned by CORP\\svc-netbackup via NetBackup" in skipped
    assert "Archive: SIMPLE recovery" in skipped
    assert "NewApp: no non-copy-only full backup" in skipped
    assert "AgDb: in an availability group" in skipped
    assert "REPORTING: Login failed" in skipped
    assert "master" not in skipped
    # Exchange is never truncated: a later full VSS session would remove logs written after
    # the backed-up point (issue 13, item 3).
    assert plan.exchange == []
    assert "exchange/DB01: Exchange logs are not truncated by Stillpoint" in skipped
    assert "exchange/DB02: circular logging" in skipped
    assert plan.targets() == {"sql": plan.sql, "exchange": plan.exchange}


def test_old_foreign_log_backup_no_longer_owns_the_chain() -> None:
    facts = json.loads(text("thaw_results_sql_exchange.json"))
    later = datetime(2027, 2, 1, tzinfo=timezone.utc)
    plan = truncation_plan(facts, TruncationPolicy(foreign_log_backup_days=30), now=later)
    assert "Payroll" in [t["database"] for t in plan.sql]


def test_policy_can_turn_truncation_off() -> None:
    facts = json.loads(text("thaw_results_sql_exchange.json"))
    plan = truncation_plan(facts, TruncationPolicy(sql=False), now=NOW)
    assert plan.sql == [] and plan.exchange == []
    assert any("SQL truncation is off" in s for s in plan.skipped)
