"""Named points in a job where a fault test can hold it (to kill it there).

Jobs call `reached("phase")` at each step. With STILLPOINT_HOLD_AT=<phase> in the
environment, the process announces `{"held": "<phase>"}` on stderr and sleeps, so that a test
can SIGKILL it at exactly that point. Without the variable this does nothing. The list of
phases is `PHASES`, so fault tests enumerate them from here rather than by hand.
"""

from __future__ import annotations

import json
import os
import sys
import time

PHASES = (
    "frozen",              # the guest's writers are frozen, the snapshot not yet asked for
    "snapshot-taken",      # after the snapshot exists, before the copy
    "copy-started",        # the first data of a disk was written to the repository
    "disks-copied",        # all disks copied, before the restore point's commit
    "committed",           # restore point committed, snapshot not yet removed
    "snapshot-removed",    # before the applications are told (log truncation)
)


def reached(phase: str) -> None:
    if os.environ.get("STILLPOINT_HOLD_AT") != phase:
        return
    print(json.dumps({"held": phase, "pid": os.getpid()}), file=sys.stderr, flush=True)
    time.sleep(3600)
