"""Windows writer facts on the appliance side: VSS output parsers, the snapshot's quiesce
spec, and the log-truncation policy.

The agent (agent_payload/windows/lib/VssWriters.ps1) parses `vssadmin list writers` itself
to gate the snapshot; it also returns the raw text, which `parse_vssadmin_writers` here
re-reads so that the appliance's record does not depend on the agent's parse. Both follow
the same structural grammar (labels are localised, so they are not matched):

    <label>: '<writer name>'          a new writer
    <label>: {<guid>}                 writer id, then instance id
    <label>: [<n>] <text>             state: VSS_WRITER_STATE n (1 = stable)
    <label>: <text>                   the line after the state: last error

Truncation is decided here, from the facts the agent gathered after the snapshot; the
agent only executes the list it is given (and skips a database whose log chain moved in
the meantime).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

VSS_STATES = {
    0: "unknown", 1: "stable", 2: "waiting for freeze", 3: "waiting for thaw",
    4: "waiting for post snapshot", 5: "waiting for backup complete",
    6: "failed at identify", 7: "failed at prepare backup", 8: "failed at prepare snapshot",
    9: "failed at freeze", 10: "failed at thaw", 11: "failed at post snapshot",
    12: "failed at backup complete", 13: "failed at pre restore", 14: "failed at post restore",
    15: "failed at backup shutdown",
}
# VSS_BACKUP_TYPE: COPY leaves every application's backup history and logs alone.
VSS_BT_FULL = 1
VSS_BT_COPY = 5

_NAME = re.compile(r"^[^:]+:\s*'(.+)'\s*$")
_GUID = re.compile(r"^[^:]+:\s*(\{[0-9a-fA-F-]{36}\})\s*$")
_STATE = re.compile(r"^[^:]+:\s*\[(\d+)\]\s*(.*)$")
_VALUE = re.compile(r"^[^:]+:\s*(.+)$")


@dataclass
class VssWriter:
    name: str
    writer_id: str = ""
    instance_id: str = ""
    state: int = 0
    last_error: str = ""

    @property
    def state_name(self) -> str:
        return VSS_STATES.get(self.state, f"state {self.state}")

    @property
    def stable(self) -> bool:
        return self.state == 1


def parse_vssadmin_writers(text: str) -> list[VssWriter]:
    writers: list[VssWriter] = []
    current: VssWriter | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if m := _NAME.match(line):
            current = VssWriter(m.group(1))
            writers.append(current)
            continue
        if current is None:
            continue
        if m := _GUID.match(line):
            if not current.writer_id:
                current.writer_id = m.group(1).lower()
            else:
                current.instance_id = m.group(1).lower()
        elif m := _STATE.match(line):
            current.state = int(m.group(1))
        elif current.state and not current.last_error and (m := _VALUE.match(line)):
            current.last_error = m.group(1).strip()
    return writers


def unstable_writers(writers: list[VssWriter]) -> list[str]:
    """Operator messages naming each writer that would fail the attempt."""
    return [f"VSS writer '{w.name}' is in state [{w.state}] {w.state_name} "
            f"(last error: {w.last_error or 'none reported'})"
            for w in writers if not w.stable]


@dataclass
class DiskshadowComponent:
    id: str
    name: str = ""
    logical_path: str = ""
    type: str = ""
    selectable: bool = False
    paths: list[str] = field(default_factory=list)


@dataclass
class DiskshadowWriter:
    name: str
    writer_id: str = ""
    restore_method: str = ""
    components: list[DiskshadowComponent] = field(default_factory=list)


def parse_diskshadow_writers(text: str) -> list[DiskshadowWriter]:
    """`diskshadow` `list writers detailed`: writers, components and their file paths."""
    writers: list[DiskshadowWriter] = []
    writer: DiskshadowWriter | None = None
    comp: DiskshadowComponent | None = None
    in_paths = False
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.match(r'^\*\s*WRITER\s+"(.+)"', line):
            writer, comp, in_paths = DiskshadowWriter(m.group(1)), None, False
            writers.append(writer)
            continue
        if writer is None:
            continue
        if m := re.match(r'^\+\s*Component\s+"(.+)"', line):
            comp, in_paths = DiskshadowComponent(m.group(1)), False
            writer.components.append(comp)
            continue
        if m := re.match(r"^-\s*Writer ID\s*=\s*(\{[0-9a-fA-F-]{36}\})", line):
            writer.writer_id = m.group(1).lower()
            continue
        if m := re.match(r"^-\s*Restore method\s*=\s*(\S+)", line):
            writer.restore_method = m.group(1)
            continue
        if comp is None:
            continue
        if re.match(r"^-\s*Paths affected by this component:", line):
            in_paths = True
        elif re.match(r"^-\s*(Volumes affected|Component Dependencies)", line):
            in_paths = False
        elif in_paths and (m := re.match(r"^-\s*(.+)$", line)):
            comp.paths.append(m.group(1).strip())
        elif m := re.match(r"^-\s*Name:\s*(.*)$", line):
            comp.name = m.group(1).strip()
        elif m := re.match(r"^-\s*Logical path:\s*(.*)$", line):
            comp.logical_path = m.group(1).strip()
        elif m := re.match(r"^-\s*Type:\s*(\S+)", line):
            comp.type = m.group(1)
        elif m := re.match(r"^-\s*Is selectable:\s*(TRUE|FALSE)", line):
            comp.selectable = m.group(1) == "TRUE"
    return writers


def parse_eseutil_state(text: str) -> str:
    """The `State:` line of `eseutil /mh` (e.g. "Clean Shutdown", "Dirty Shutdown")."""
    for raw in text.splitlines():
        if m := re.match(r"^\s*State:\s*(.+?)\s*$", raw):
            return m.group(1)
    return "unknown"


def windows_quiesce_spec(vim: Any, timeout_minutes: int = 5) -> Any:
    """The spec for CreateSnapshotEx_Task: VMware Tools drives VSS, COPY type so that no
    application truncates anything before the restore point is committed."""
    return vim.vm.WindowsQuiesceSpec(
        timeout=timeout_minutes, vssBackupType=VSS_BT_COPY, vssBootableSystemState=True,
        vssPartialFileSupport=False, vssBackupContext="ctx_backup")


# --- truncation policy ------------------------------------------------------------------

@dataclass(frozen=True)
class TruncationPolicy:
    sql: bool = True
    # A log backup to a real device this recent means another tool owns the log chain.
    foreign_log_backup_days: int = 30


@dataclass
class TruncationPlan:
    sql: list[dict[str, Any]] = field(default_factory=list)
    exchange: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # could not decide: a warning, not policy

    def targets(self) -> dict[str, Any]:
        """The `targets` argument of backup-complete for the Windows agent."""
        return {"sql": self.sql, "exchange": self.exchange}


def _when(value: Any) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _is_ours(db: dict[str, Any]) -> bool:
    # Our own truncation writes BACKUP LOG ... TO DISK = 'NUL'.
    return str(db.get("last_log_backup_device") or "").strip().upper() == "NUL"


def sql_decision(instance: str, db: dict[str, Any], now: datetime,
                 policy: TruncationPolicy) -> tuple[bool, str]:
    name = db.get("name", "?")
    where = f"{instance}/{name}"
    if name in ("master", "model", "msdb", "tempdb"):
        return False, f"{where}: system database"
    if db.get("recovery_model") not in ("FULL", "BULK_LOGGED"):
        return False, f"{where}: {db.get('recovery_model')} recovery, the log truncates itself"
    if db.get("state") != "ONLINE" or db.get("is_read_only"):
        return False, f"{where}: not online and writable ({db.get('state')})"
    if db.get("in_availability_group"):
        return False, f"{where}: in an availability group, its log chain is shared"
    if not db.get("last_full_backup"):
        return False, (f"{where}: no non-copy-only full backup in msdb, BACKUP LOG would fail; "
                       "take one full backup (or switch to SIMPLE recovery)")
    last_log = _when(db.get("last_log_backup"))
    if last_log and not _is_ours(db) and now - last_log < timedelta(
            days=policy.foreign_log_backup_days):
        return False, (f"{where}: log chain owned by {db.get('last_log_backup_user')} via "
                       f"{db.get('last_log_backup_software')} "
                       f"({db.get('last_log_backup_device')}, {db.get('last_log_backup')})")
    return True, f"{where}: log will be truncated"


def truncation_plan(thaw_results: dict[str, Any], policy: TruncationPolicy,
                    now: datetime | None = None) -> TruncationPlan:
    """Choose what to truncate from the facts the agent returned at thaw."""
    now = now or datetime.now(timezone.utc)
    plan = TruncationPlan()
    sql = (thaw_results.get("sql-server") or {}).get("instances") or []
    for inst in sql:
        if inst.get("error"):
            plan.skipped.append(f"{inst.get('instance')}: {inst['error']}")
            plan.failed.append(f"{inst.get('instance')}: {inst['error']}")
            continue
        for db in inst.get("databases") or []:
            ok, why = sql_decision(inst.get("instance", "?"), db, now, policy)
            if ok and policy.sql:
                plan.sql.append({"instance": inst["instance"], "database": db["name"],
                                 "last_log_backup": db.get("last_log_backup")})
            elif ok:
                plan.skipped.append(f"{why}: SQL truncation is off in the policy")
            elif db.get("name") not in ("master", "model", "msdb", "tempdb"):
                plan.skipped.append(why)
    for db in (thaw_results.get("exchange") or {}).get("databases") or []:
        if db.get("circular_logging"):
            plan.skipped.append(f"exchange/{db.get('name')}: circular logging, nothing to do")
        else:   # never: a later full VSS session would outrun the backup (docs/windows.md)
            plan.skipped.append(f"exchange/{db.get('name')}: Exchange logs are not truncated "
                                "by Stillpoint (circular logging or the log chain's owner)")
    return plan
