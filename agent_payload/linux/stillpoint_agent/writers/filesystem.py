"""The file-system writer: FIFREEZE/FITHAW ioctls on selected mounts (see mounts.py)."""

import errno
import fcntl
import os
import subprocess
import sys

from .. import mounts as mountlib
from ..protocol import WriterFailure
from . import Writer

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878    # _IOWR('X', 120, int)


# The deadman fires this long after the agent's own deadline, so that the watchdog thread
# (which also undoes the databases and reports) normally goes first.
DEADMAN_GRACE_S = 3.0


def ioctl_mount(path, request):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


class FilesystemWriter(Writer):
    """All selected file systems as one writer, frozen in order and thawed in reverse."""

    kind = "filesystem"
    rank = 90

    def __init__(self, planned):
        super(FilesystemWriter, self).__init__("filesystems")
        self.planned = planned          # [(Mount, aliases)] in freeze order
        self.frozen = []                # mount points we froze, in order
        self.skipped_at_freeze = []
        self.deadline_s = 60.0          # set by the session before freeze
        self.deadman = None

    def metadata(self):
        meta = super(FilesystemWriter, self).metadata()
        meta["components"] = [dict(m.to_json(), aliases=a) for m, a in self.planned]
        meta["files"] = [m.mount_point for m, _ in self.planned]
        meta["restore_method"] = "image (journal replay at mount)"
        return meta

    def _arm_deadman(self):
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        argv = [sys.executable, "-B", "-E", "-s", "-m", "stillpoint_agent.deadman",
                str(self.deadline_s + DEADMAN_GRACE_S)] + [m.mount_point for m, _ in self.planned]
        try:
            self.deadman = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd=package_parent,
                                            stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            raise WriterFailure("cannot start the thaw deadman: %s" % err)

    def _disarm_deadman(self):
        if self.deadman is None:
            return
        try:
            self.deadman.stdin.write(b"disarm\n")
            self.deadman.stdin.close()
        except OSError:
            pass                        # it already fired or died: nothing left to stop
        try:
            self.deadman.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.deadman.kill()
            self.deadman.wait()
        self.deadman = None

    def freeze(self):
        # Armed before the first FIFREEZE (starting a process may need the disks).
        self._arm_deadman()
        for mount, _ in self.planned:
            try:
                ioctl_mount(mount.mount_point, FIFREEZE)
            except OSError as err:
                if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                    self.skipped_at_freeze.append(
                        {"mount_point": mount.mount_point, "reason": "cannot freeze: %s" % err})
                    continue
                reason = "already frozen by someone else" if err.errno == errno.EBUSY else err
                self.thaw()
                raise WriterFailure("freeze %s failed: %s" % (mount.mount_point, reason))
            self.frozen.append(mount.mount_point)

    def thaw(self):
        errors = []
        while self.frozen:
            point = self.frozen.pop()
            try:
                ioctl_mount(point, FITHAW)
            except OSError as err:
                if err.errno != errno.EINVAL:   # EINVAL: not frozen (someone thawed it)
                    errors.append("thaw %s failed: %s" % (point, err))
        if errors:
            raise WriterFailure("; ".join(errors))
        self._disarm_deadman()

    def abort(self, reason):
        self.thaw()

    def post(self):
        return {"frozen": [m.mount_point for m, _ in self.planned],
                "skipped": self.skipped_at_freeze}


def discover(cfg, skipped):
    fscfg = cfg["filesystems"]
    planned, fs_skipped, errors = mountlib.plan(
        mountlib.read_mounts(), fscfg["include"], fscfg["exclude"], bool(fscfg["allow_root"]))
    skipped.extend(dict(s, writer="filesystems") for s in fs_skipped)
    if errors:
        raise WriterFailure("filesystems: " + "; ".join(errors))
    return [FilesystemWriter(planned)] if planned else []
