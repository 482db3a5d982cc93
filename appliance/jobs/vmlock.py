"""One job per VM at a time on this appliance: an advisory lock per VM (flock).

A backup removes `stillpoint-*` snapshots that an earlier, crashed run left behind. Without
this lock, a second backup of the same VM started while the first one runs would take the
first one's live snapshot for such a leftover and delete it under its copy. The lock is an
flock on a file in the appliance's run directory, so it goes with the process that holds
it (also on SIGKILL): a crashed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import StillpointError


class VMBusy(StillpointError):
    """Another job of this VM is running."""

    exit_code = 1


def run_dir() -> Path:
    """$STILLPOINT_RUN_DIR, else /run/stillpoint for root, else a per-user temp directory."""
    raw = os.environ.get("STILLPOINT_RUN_DIR")
    if raw:
        return Path(raw)
    if os.geteuid() == 0:
        return Path("/run/stillpoint")
    return Path(tempfile.gettempdir()) / f"stillpoint-{os.geteuid()}"


@contextmanager
def vm_job_lock(vm_key: str, vm_name: str) -> Iterator[None]:
    """Hold the VM's lock for the block; VMBusy at once if another process holds it."""
    locks = run_dir() / "vm-locks"
    path = locks / (re.sub(r"[^A-Za-z0-9_.-]", "_", vm_key) + ".lock")
    try:
        locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StillpointError(f"cannot take the job lock of {vm_name} in {locks}: "
                              f"{err.strerror}; set STILLPOINT_RUN_DIR to a writable "
                              "directory") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise VMBusy(f"{vm_name}: another job of this VM is running (pid {holder}); it was "
                         "left alone: run this one again when it has finished") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the flock
