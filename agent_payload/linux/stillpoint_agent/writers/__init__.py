"""Writers: each one thing inside the guest that must be made consistent for a snapshot.

A writer goes through prepare -> freeze -> thaw -> post (or abort at any point), and
later complete(success, truncate). `rank` orders them: freeze goes up the ranks (hook
scripts, then databases, then file systems last), thaw comes back down. Writers raise
`WriterFailure` with a message meant for the operator. Whatever freeze() waits for is
bounded by `time_left()`: the freeze limit counts from the first writer's hold.
"""


import time

from ..protocol import WriterFailure


class Writer(object):
    kind = "writer"
    rank = 50
    deadline = None     # monotonic time by which the whole freeze must be held (the session sets it)

    def __init__(self, name):
        self.name = name

    def time_left(self, cap):
        """What a step of freeze() may wait: `cap`, or less if the freeze limit is nearer.
        Raises WriterFailure when nothing is left."""
        if self.deadline is None:
            return cap
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WriterFailure("%s: the freeze limit was reached before it could freeze"
                                % self.name)
        return min(cap, left)

    def metadata(self):
        """The writer's entry in the backup components document."""
        return {"name": self.name, "kind": self.kind, "components": [], "files": [],
                "restore_method": "none"}

    def prepare(self):
        pass

    def freeze(self):
        pass

    def thaw(self):
        pass

    def abort(self, reason):
        """Undo whatever prepare/freeze did; must not raise for the state it is in."""

    def post(self):
        """After thaw: results to store with the restore point (JSON-able dict)."""
        return {}

    def complete(self, success, truncate, saved):
        """Backup finished: `saved` is this writer's post() result. Returns what was done."""
        return {}


def discover(cfg, skipped):
    """All writers selected by `cfg`; what could not be used is appended to `skipped`."""
    from . import filesystem, hooks, mariadb, postgresql
    from ..config import writer_selected

    found = []
    for module in (hooks, mariadb, postgresql, filesystem):
        found.extend(module.discover(cfg, skipped))
    out = []
    for writer in found:
        if writer_selected(cfg, writer.kind, writer.name):
            out.append(writer)
        else:
            skipped.append({"writer": writer.name, "reason": "excluded by config"})
    return sorted(out, key=lambda w: w.rank)
