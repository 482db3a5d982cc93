"""Named points in a job, and the hook an observer can attach to them.

Jobs call `reached("phase")` at each step. In the product nothing observes them: `reached`
returns at once. Fault tests run the CLI through `tests/hold_cli.py`, which attaches an
observer that holds the process at a chosen phase so that the test can kill it exactly
there; no environment variable or code path in the shipped appliance can make a job wait.
The phases are listed here, so fault tests enumerate them from here rather than by hand:
BACKUP_PHASES in the order a backup reaches them, PRUNE_PHASES likewise.
"""

from __future__ import annotations

from typing import Callable

BACKUP_PHASES = (
    "frozen",              # the guest's writers are frozen, the snapshot not yet asked for
    "snapshot-taken",      # after the snapshot exists, before the copy
    "copy-started",        # the first data of a disk was written to the repository (per disk)
    "disks-copied",        # all disks copied, before the restore point's commit
    "committed",           # restore point committed, snapshot not yet removed
    "snapshot-removed",    # before the applications are told (log truncation)
    "truncated",           # the applications truncated their logs; agent not yet removed
)

PRUNE_PHASES = (
    "prune-packs-written",     # live chunks of partly dead packs copied to new packs
    "prune-index-written",     # the one new index is written; old indexes still there
    "prune-indexes-deleted",   # old indexes gone; old packs not yet deleted
)

PHASES = BACKUP_PHASES + PRUNE_PHASES

Observer = Callable[[str], None]
_observers: list[Observer] = []


def observe(observer: Observer) -> None:
    """Call `observer(phase)` at every phase a job reaches (test machinery only)."""
    _observers.append(observer)


def reached(phase: str) -> None:
    for observer in _observers:
        observer(phase)
