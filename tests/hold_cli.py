"""`python -m tests.hold_cli ARGS...`: the stillpoint CLI with a hold point attached.

Test machinery, never shipped: the product's checkpoints (appliance/checkpoints.py) are a
no-op hook; this runner attaches the observer fault tests need. With STILLPOINT_HOLD_AT=<phase>
the process announces `{"held": "<phase>", "pid": N}` on stderr and sleeps there, so that a test
can SIGKILL it at exactly that point. STILLPOINT_HOLD_SKIP=<n> passes the first n arrivals
(a phase reached once per disk: n=1 holds in the second disk); STILLPOINT_HOLD_FOR=<s> holds
that long and then goes on (to overlap two jobs at a known point).
"""

from __future__ import annotations

import json
import os
import sys
import time

from appliance import checkpoints
from appliance.cli import main

HOLD_CLI = [sys.executable, "-m", "tests.hold_cli"]


class Hold:
    def __init__(self, phase: str, skip: int, hold_for: float) -> None:
        if phase not in checkpoints.PHASES:
            raise SystemExit(f"hold_cli: unknown phase {phase!r} (known: {checkpoints.PHASES})")
        self.phase, self.skip, self.hold_for = phase, skip, hold_for
        self.arrivals = 0

    def __call__(self, phase: str) -> None:
        if phase != self.phase:
            return
        self.arrivals += 1
        if self.arrivals <= self.skip:
            return
        print(json.dumps({"held": phase, "pid": os.getpid()}), file=sys.stderr, flush=True)
        time.sleep(self.hold_for)


def attach_from_environment() -> None:
    phase = os.environ.get("STILLPOINT_HOLD_AT")
    if phase:
        checkpoints.observe(Hold(phase, int(os.environ.get("STILLPOINT_HOLD_SKIP") or 0),
                                 float(os.environ.get("STILLPOINT_HOLD_FOR") or 3600)))


if __name__ == "__main__":
    attach_from_environment()
    sys.exit(main())
