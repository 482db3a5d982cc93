"""/proc/self/mountinfo parsing and the choice and order of file systems to freeze.

Freeze order: deepest mount point first, i.e. children before their parents (the same
order qemu-guest-agent uses: reverse mount order). Why: to freeze /data/pg we must open its
mount point, which lives on /data; with /data still writable nothing we do on the way
(path lookups, a hook writing a note, the kernel updating atime) can block on a frozen
parent. Thaw runs in the reverse order, parents first, so each child's mount point is on a
thawed file system when we reach it. One file system mounted several times (bind mounts)
is one superblock: it is frozen once, via its first selected mount point, because a second
FIFREEZE on the same superblock fails with EBUSY.
"""

import os


class Mount(object):
    __slots__ = ("mount_id", "parent_id", "dev", "root", "mount_point", "options", "fstype",
                 "source", "super_options")

    def __init__(self, **kw):
        for key, value in kw.items():
            setattr(self, key, value)

    @property
    def writable(self):
        return "rw" in self.options.split(",") and "ro" not in self.super_options.split(",")

    @property
    def block_backed(self):
        return self.source.startswith("/dev/") and not self.dev.startswith("0:")

    def to_json(self):
        return {"mount_point": self.mount_point, "device": self.dev, "fstype": self.fstype,
                "source": self.source, "root": self.root}


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text):
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 3:
            continue
        mounts.append(Mount(
            mount_id=int(lf[0]), parent_id=int(lf[1]), dev=lf[2], root=_unescape(lf[3]),
            mount_point=_unescape(lf[4]), options=lf[5], fstype=rf[0], source=_unescape(rf[1]),
            super_options=rf[2],
        ))
    return mounts


def read_mounts(path="/proc/self/mountinfo"):
    with open(path) as fh:
        return parse_mountinfo(fh.read())


def visible(mounts):
    """The mount that is visible at each mount point (the last one mounted there wins)."""
    by_point = {}
    for m in mounts:
        by_point[m.mount_point] = m
    return [m for m in mounts if by_point[m.mount_point] is m]


def depth(mount_point):
    return 0 if mount_point == "/" else mount_point.rstrip("/").count("/")


def plan(mounts, include, exclude, allow_root):
    """Choose file systems to freeze. Returns (selected, skipped, errors).

    selected: list of (Mount, aliases) in freeze order (deepest first), one per device;
    skipped: list of {"mount_point", "reason"}; errors: list of messages (an explicitly
    included path that is not a mount point, which must not pass silently).
    """
    mounts = visible(mounts)
    root_dev = next((m.dev for m in mounts if m.mount_point == "/"), None)
    by_point = {m.mount_point: m for m in mounts}
    errors, skipped, candidates = [], [], []
    if include is not None:
        for point in include:
            point = os.path.normpath(point)
            if point not in by_point:
                errors.append("%s is not a mount point" % point)
            else:
                candidates.append(by_point[point])
    else:
        for m in mounts:
            if not m.block_backed:
                continue
            candidates.append(m)
    excluded = set(os.path.normpath(p) for p in exclude)
    chosen, aliases = [], {}
    for m in candidates:
        if m.mount_point in excluded:
            skipped.append({"mount_point": m.mount_point, "reason": "excluded by config"})
        elif m.dev == root_dev and not allow_root:
            skipped.append({"mount_point": m.mount_point,
                            "reason": "the root file system is frozen only with allow_root"})
        elif not m.writable:
            skipped.append({"mount_point": m.mount_point, "reason": "read-only"})
        elif m.dev in aliases:
            aliases[m.dev].append(m.mount_point)
        else:
            aliases[m.dev] = []
            chosen.append(m)
    # Deepest first; ties keep mount order reversed (later mounts may sit on earlier ones).
    order = sorted(enumerate(chosen), key=lambda im: (-depth(im[1].mount_point), -im[0]))
    return [(m, aliases[m.dev]) for _, m in order], skipped, errors
