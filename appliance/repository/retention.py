"""Retention: which restore points `forget` removes (restic's keep-last/daily/weekly/monthly).

Per VM (grouped by its chain key: vCenter + instance UUID, see VmRef), restore points are walked newest first. keep_last keeps
the n newest; keep_daily keeps the newest of each of the n most recent days that have one;
weekly (ISO weeks) and monthly likewise. A restore point kept by any rule is kept. forget
removes restore point objects only; `prune` then frees the data nobody references.

A repository with a retention lock (config "retention_lock_days") keeps every restore point
younger than that, whatever the rules say: forget leaves it and logs why (immutability
against a mistaken or malicious forget through the appliance's own CLI or jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from appliance.errors import UsageError
from appliance.repository import format as F
from appliance.repository.backend import ObjectNotFound
from appliance.repository.lock import Lock
from appliance.repository.restorepoint import RestorePoint

if TYPE_CHECKING:
    from appliance.repository.repository import Repository

log = logging.getLogger(__name__)


def select(points: list[RestorePoint], keep_last: int, keep_daily: int, keep_weekly: int,
           keep_monthly: int) -> tuple[list[RestorePoint], list[RestorePoint]]:
    """(keep, remove) for the restore points of ONE VM."""
    newest_first = sorted(points, key=lambda r: (r.time, r.id), reverse=True)
    rules: list[tuple[int, Callable[[RestorePoint], object]]] = [
        (keep_last, lambda r: r.id),
        (keep_daily, lambda r: r.time.astimezone(UTC).date()),
        (keep_weekly, lambda r: r.time.astimezone(UTC).isocalendar()[:2]),
        (keep_monthly, lambda r: (r.time.astimezone(UTC).year,
                                  r.time.astimezone(UTC).month)),
    ]
    kept: set[str] = set()
    for count, bucket in rules:
        seen: set[object] = set()
        for r in newest_first:
            if len(seen) >= count:
                break
            b = bucket(r)
            if b not in seen:
                seen.add(b)
                kept.add(r.id)
    keep = [r for r in newest_first if r.id in kept]
    remove = [r for r in newest_first if r.id not in kept]
    return keep, remove


def forget(repo: Repository, *, keep_last: int, keep_daily: int, keep_weekly: int,
           keep_monthly: int, vm: str | None, dry_run: bool) -> list[RestorePoint]:
    if min(keep_last, keep_daily, keep_weekly, keep_monthly) < 0 or not any(
            (keep_last, keep_daily, keep_weekly, keep_monthly)):
        raise UsageError("forget needs at least one positive keep_* rule")
    with Lock(repo.backend):
        groups: dict[str, list[RestorePoint]] = {}
        for rp in repo.list_restore_points(vm):
            groups.setdefault(rp.vm.chain_key(), []).append(rp)
        removed: list[RestorePoint] = []
        for points in groups.values():
            removed += select(points, keep_last, keep_daily, keep_weekly, keep_monthly)[1]
        removed = [rp for rp in removed if not _retention_locked(repo, rp)]
        if not dry_run:
            _delete(repo, removed)
    return removed


def forget_points(repo: Repository, refs: list[str], dry_run: bool) -> list[RestorePoint]:
    """Remove the named restore points (ids or unique prefixes). All or nothing: a name that
    matches nothing, or a point the retention lock still holds, refuses the whole call."""
    if not refs:
        raise UsageError("name at least one restore point")
    with Lock(repo.backend):
        points = {rp.id: rp for rp in (repo.get(ref) for ref in refs)}
        locked = [(rp, _lock_end(repo, rp)) for rp in points.values()]
        held = [(rp, until) for rp, until in locked if until is not None]
        if held:
            raise UsageError("under the retention lock, nothing forgotten: " + ", ".join(
                f"{rp.id[:12]} until {until.isoformat(timespec='seconds')}"
                for rp, until in held))
        removed = sorted(points.values(), key=lambda r: (r.time, r.id))
        if not dry_run:
            _delete(repo, removed)
    return removed


def _delete(repo: Repository, points: list[RestorePoint]) -> None:
    for rp in points:
        try:
            repo.backend.delete(F.RESTOREPOINT_PREFIX + rp.id)
        except ObjectNotFound:
            continue          # forgotten by someone else meanwhile
        log.info("forgot restore point %s of %s (%s)", rp.id, rp.vm.name, rp.time)


def _lock_end(repo: Repository, rp: RestorePoint) -> datetime | None:
    """When the retention lock releases `rp`, or None if it does not hold it."""
    days = repo.retention_lock_days
    if not days:
        return None
    until = rp.time.astimezone(UTC) + timedelta(days=days)
    return until if datetime.now(UTC) < until else None


def _retention_locked(repo: Repository, rp: RestorePoint) -> bool:
    until = _lock_end(repo, rp)
    if until is not None:
        log.warning("kept restore point %s of %s: retention lock until %s", rp.id, rp.vm.name,
                    until.isoformat(timespec="seconds"))
        return True
    return False
