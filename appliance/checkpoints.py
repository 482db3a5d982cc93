"""Named points in a job where a fault test can hold it (to kill it there).

Jobs call `reached("phase")` at each step. With STILLPOINT_HOLD_AT=<phase> in the
environment, the process announces `{"held": "<phase>"}` on stderr and sleeps, so that a test
can SIGKILL it at exactly that point. STILLPOINT_HOLD_SKIP=<n> passes the first n arrivals
(a phase reached once per disk: n=1 holds in the second disk). STILLPOINT_HOLD_FOR=<s>
holds that long and then goes on (to overlap two jobs at a known point). Without the
variables this does nothing. The phases are listed here, so fault tests enumerate them from here rather
than by hand: BACKUP_PHASES in the order a backup reaches them, PRUNE_PHASES likewise.
"""

from __future__ import annotations

import json
import os
import sys
import time

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

_arrivals: dict[str, int] = {}


def reached(phase: str) -> None:
    if os.environ.get("STILLPOINT_HOLD_AT") != phase:
        return
    seen = _arrivals.get(phase, 0)
    _arrivals[phase] = seen + 1
    if seen < int(os.environ.get("STILLPOINT_HOLD_SKIP", "0") or 0):
        return
    print(json.dumps({"held": phase, "pid": os.getpid()}), file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("STILLPOINT_HOLD_FOR", "3600") or 3600))
