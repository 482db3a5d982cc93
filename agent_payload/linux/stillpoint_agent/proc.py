"""Running commands: one-shot, as another OS user, and long-lived client sessions.

`HeldSession` keeps a database client (psql, mariadb) running with pipes so that a lock or
backup mode taken in it stays held across the snapshot; each statement batch is followed by
a sentinel so we know where its output ends without parsing prompts.
"""

import os
import pwd
import queue
import subprocess
import threading
import time

from .protocol import WriterFailure


def as_user(user, argv):
    """argv run as `user` (root agent: runuser; already that user: unchanged)."""
    if user is None or pwd.getpwuid(os.geteuid()).pw_name == user:
        return list(argv)
    return ["runuser", "-u", user, "--"] + list(argv)


def run(argv, timeout=60.0, input_text=None, env=None):
    """Run argv; return (returncode, combined stdout+stderr). Never raises on exit codes."""
    try:
        proc = subprocess.run(
            argv, input=input_text, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=timeout, env=env, cwd="/", stdin=None if input_text
            is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as err:
        return 127, str(err)
    except subprocess.TimeoutExpired:
        return 124, "timed out after %.0f s: %s" % (timeout, " ".join(argv))
    return proc.returncode, proc.stdout


def tail(text, limit=2000):
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class HeldSession(object):
    """A client process fed statements on stdin; output read line by line by a thread."""

    def __init__(self, argv, label, sentinel_fmt, error_markers=("ERROR",)):
        # sentinel_fmt: a client statement that prints its {token} alone on a line.
        self.label = label
        self._sentinel_fmt = sentinel_fmt
        self._error_markers = tuple(error_markers)
        self._n = 0
        self._lines = queue.Queue()
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                universal_newlines=True, bufsize=1, start_new_session=True, cwd="/",
            )
        except OSError as err:
            raise WriterFailure("%s: cannot start %s: %s" % (label, argv[0], err))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def is_error(self, line):
        return any(m in line for m in self._error_markers)

    def query(self, sql, timeout=30.0):
        """Send statements; return their output lines; WriterFailure on an error line."""
        self._n += 1
        token = "__stillpoint_%d__" % self._n
        try:
            self._proc.stdin.write(sql.rstrip() + "\n" + self._sentinel_fmt.format(token=token) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as err:
            raise WriterFailure("%s: session is gone: %s" % (self.label, err))
        out = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                # The statement may still run in the server: this session is abandoned (the
                # caller ends it server-side if it must), never fed another statement.
                self._proc.kill()
                raise WriterFailure("%s: no answer within %.1f s to: %s" % (self.label, timeout, sql))
            if line is None:
                raise WriterFailure("%s: client exited: %s" % (self.label, tail("\n".join(out))))
            if line.strip() == token:
                break
            out.append(line)
        errors = [line for line in out if self.is_error(line)]
        if errors:
            raise WriterFailure("%s: %s" % (self.label, "; ".join(errors)))
        return out

    def alive(self):
        return self._proc.poll() is None

    def close(self, timeout=10.0):
        """End the client (closing stdin ends its session and releases what it held)."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def unix_sockets_of(pid):
    """Paths of the listening unix sockets a process holds (via /proc/net/unix inodes)."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    paths = []
    try:
        with open("/proc/net/unix") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; St 01 = listening.
                if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("/"):
                    paths.append(parts[7])
    except OSError:
        return []
    return sorted(set(paths))


def processes():
    """(pid, exe basename, argv, ppid) of every process we can see."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
            with open("/proc/%d/stat" % pid) as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            exe = os.path.basename(os.readlink("/proc/%d/exe" % pid))
        except (OSError, ValueError, IndexError):
            continue
        out.append((pid, exe, argv, ppid))
    return out
