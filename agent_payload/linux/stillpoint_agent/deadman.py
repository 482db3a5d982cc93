"""A separate process that thaws the frozen file systems if the agent itself dies.

The in-agent watchdog thread cannot help when the agent is killed (SIGKILL, OOM) while
file systems are frozen: nothing would ever thaw them. So before freezing, the file-system
writer starts this process with the mount points and a deadline, and keeps the write end
of its stdin. It thaws (children last frozen first) when the deadline passes or when its
stdin reaches EOF before the agent wrote "disarm" -- the kernel closes that pipe when the
agent dies, however it dies. The agent disarms it after its own thaw.

Usage: python3 -B -m stillpoint_agent.deadman <deadline_s> <mount point>...  (freeze order)
"""

import errno
import os
import select
import sys
import time

from .writers.filesystem import FITHAW, ioctl_mount


def main(argv):
    deadline = time.monotonic() + float(argv[0])
    mounts = argv[1:]
    received = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([0], [], [], left)
        if ready:
            chunk = os.read(0, 64)
            if not chunk:
                break                          # the agent is gone
            received += chunk
            if b"disarm" in received:
                return 0
    for point in reversed(mounts):
        try:
            ioctl_mount(point, FITHAW)
            sys.stderr.write("stillpoint deadman: thawed %s\n" % point)
        except OSError as err:
            if err.errno != errno.EINVAL:      # EINVAL: not frozen any more
                sys.stderr.write("stillpoint deadman: thaw %s failed: %s\n" % (point, err))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
