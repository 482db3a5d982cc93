"""One backup attempt: all writers through prepare -> freeze -> thaw/post -> complete.

Timing contract. The freeze limit (`freeze_timeout_s` <= 60 s, or less if the client asks)
counts from the first writer's hold. Each writer is given the deadline (`writer.deadline`,
monotonic) and bounds what it waits for by what is left of it (`Writer.time_left`). A
watchdog thread fires at the deadline whatever the protocol thread is doing: it never waits
for the session lock, which the protocol thread holds while it drives a writer, so a writer
stuck in its freeze cannot hold the others frozen past the limit. The watchdog undoes every
writer the protocol thread is not driving at that moment (file systems thawed, database
sessions released, hooks called with freezeFail) whether or not anyone is still connected;
the one being driven is undone by the protocol thread as soon as its call returns (each
call is bounded by the deadline; file systems are also covered by a separate deadman
process, writers/filesystem.py, which outlives even the agent). The attempt then fails with
FREEZE_EXPIRED. A lost client (stdin EOF, SIGTERM/SIGHUP) aborts the attempt at once.

Two locks: `lock` serialises protocol operations and is held across writer calls; `guard`
is held only for moments, to change the state and to decide which thread owns which writer,
so that no writer is ever driven by two threads.
"""

import binascii
import json
import os
import threading
import time

from . import writers as writerlib
from .config import effective
from .protocol import (ABORTED, BAD_STATE, FREEZE_EXPIRED, WRITER_FAILED, AgentError,
                       WriterFailure)

RESULTS_FILE = "last_backup.json"
ACTIVE = ("prepared", "freezing", "frozen")      # states in which writers hold something
UNDOABLE = ("prepared", "frozen", "failed")      # writer states that abort() must undo


def _ms(start):
    return int(round((time.monotonic() - start) * 1000))


class BackupSession(object):
    def __init__(self, cfg, default_state_dir):
        self.cfg = cfg
        self.default_state_dir = default_state_dir
        self.lock = threading.RLock()
        self.guard = threading.Lock()
        self.busy = None                # the writer the protocol thread is driving now
        self.writers = None
        self.skipped = []
        self.state = "idle"
        self.writer_state = {}
        self.durations = {}
        self.results = {}
        self.failure = None
        self.timer = None
        self.frozen_at = None
        self.deadline = None            # monotonic: first hold + limit
        self.deadline_s = None
        self.completed = None
        self.attempt = None             # names the attempt's saved results (backup-complete)

    # --- helpers ------------------------------------------------------------------------
    @property
    def state_dir(self):
        return self.cfg["state_dir"] or self.default_state_dir

    def configure(self, update):
        with self.lock:
            if self.state in ACTIVE:
                raise AgentError(BAD_STATE, "cannot change the configuration during an attempt")
            self.cfg = effective(self.cfg, update)
            self.writers = None

    def _discover(self):
        if self.writers is None:
            skipped = []
            try:
                self.writers = writerlib.discover(self.cfg, skipped)
            except WriterFailure as err:
                raise AgentError(WRITER_FAILED, str(err), writer=str(err).split(":")[0])
            self.skipped = skipped
            self.writer_state = {w.name: {"kind": w.kind, "state": "idle", "error": None}
                                 for w in self.writers}
        return self.writers

    def _set(self, writer, state, error=None):
        """Record a writer's state (call with `guard` held)."""
        self.writer_state[writer.name].update(state=state, error=error)

    def _fail(self, code, message, writer=None):
        self.failure = {"code": code, "message": message}
        if writer:
            self.failure["writer"] = writer
        return AgentError(code, message, writer=writer)

    def _claim(self, from_states, final_state):
        """Take the attempt's undo for this thread: True if the state was one of
        `from_states` (it is `final_state` now), False if another thread got there first."""
        with self.guard:
            if self.state not in from_states:
                return False
            self.state = final_state
            return True

    def _undo(self, writers, reason):
        """Abort every given writer that did something, highest rank first. Never raises."""
        errors = []
        for w in sorted(writers, key=lambda w: w.rank, reverse=True):
            with self.guard:
                undo = self.writer_state[w.name]["state"] in UNDOABLE
            if not undo:
                continue
            try:
                w.abort(reason)
                with self.guard:
                    if self.writer_state[w.name]["state"] != "failed":
                        self._set(w, "aborted", reason)
            except Exception as err:  # noqa: BLE001 - undo must reach every writer
                errors.append("%s: %s" % (w.name, err))
                with self.guard:
                    self._set(w, "failed", str(err))
        return errors

    def _undo_all(self, reason, final_state):
        with self.guard:
            self.state = final_state
        return self._undo(self.writers or [], reason)

    # --- operations ----------------------------------------------------------------------
    def gather_metadata(self):
        with self.lock:
            writers = self._discover()
            docs = []
            for w in writers:
                try:
                    docs.append(w.metadata())
                except WriterFailure as err:
                    raise AgentError(WRITER_FAILED, str(err), writer=w.name)
            return {"writers": docs, "skipped": self.skipped}

    def prepare(self):
        with self.lock:
            if self.state in ACTIVE:
                raise AgentError(BAD_STATE, "an attempt is already %s" % self.state)
            writers = self._discover()
            self.failure, self.results, self.durations, self.completed = None, {}, {}, None
            self.attempt = binascii.hexlify(os.urandom(8)).decode()
            with self.guard:
                for w in writers:
                    w.deadline = None
                    self._set(w, "idle")
            start = time.monotonic()
            for w in writers:
                try:
                    w.prepare()
                    with self.guard:
                        self._set(w, "prepared")
                except Exception as err:  # noqa: BLE001 - any writer error fails the attempt
                    with self.guard:
                        self._set(w, "failed", str(err))
                    self._undo_all("prepare failed", "failed")
                    raise self._fail(WRITER_FAILED, str(err), w.name)
            self.durations["prepare_ms"] = _ms(start)
            with self.guard:
                self.state = "prepared"
            return self.status()

    def freeze(self, timeout_s=None):
        with self.lock:
            if self.state != "prepared":
                raise AgentError(BAD_STATE, "freeze needs a prepared attempt (state: %s)"
                                 % self.state)
            limit = float(self.cfg["freeze_timeout_s"])
            self.deadline_s = min(limit, float(timeout_s)) if timeout_s else limit
            start = time.monotonic()
            with self.guard:
                self.frozen_at, self.deadline = start, start + self.deadline_s
                self.state = "freezing"
            self.timer = threading.Timer(self.deadline_s, self._expire)
            self.timer.daemon = True
            self.timer.start()
            for w in self.writers:
                with self.guard:
                    if self.state != "freezing":      # the watchdog fired between writers
                        break
                    self.busy = w
                w.deadline = self.deadline
                w.deadline_s = max(0.0, self.deadline - time.monotonic())  # e.g. the deadman
                error = None
                try:
                    w.freeze()
                except Exception as err:  # noqa: BLE001 - any writer error fails the attempt
                    error = err
                with self.guard:
                    self.busy = None
                    expired = self.state == "expired"
                    self._set(w, "failed" if error else "frozen",
                              str(error) if error else None)
                if expired:
                    # The watchdog undid the others while this one was held up: undo it too.
                    self._undo([w], "freeze deadline passed")
                    break
                if error is not None:
                    self.timer.cancel()
                    if self._claim(("freezing",), "failed"):
                        self._undo(self.writers, "freeze failed")
                        raise self._fail(WRITER_FAILED, str(error), w.name)
                    break
            with self.guard:
                expired = self.state == "expired"
                if not expired:
                    self.state = "frozen"
            if expired:
                raise AgentError(FREEZE_EXPIRED, self.failure["message"], detail=self.status())
            self.durations["freeze_ms"] = _ms(start)
            # held_ms: how long the first writer has been holding, so that the client can
            # count its snapshot budget from the freeze itself rather than from this reply.
            return dict(self.status(), deadline_s=self.deadline_s, held_ms=_ms(start))

    def _expire(self):
        """The watchdog: never waits for the protocol thread (see the module's docstring)."""
        with self.guard:
            if self.state not in ("freezing", "frozen"):
                return
            self.state = "expired"
            busy = self.busy
            held = time.monotonic() - self.frozen_at
            self._fail(FREEZE_EXPIRED, "the freeze was held %.1f s, over its %.1f s limit; "
                       "the watchdog thawed everything" % (held, self.deadline_s))
        self._undo([w for w in self.writers if w is not busy], "freeze deadline passed")

    def abort(self, reason):
        with self.lock:
            if self.timer:
                self.timer.cancel()
            if self._claim(ACTIVE, "aborted"):
                self._undo(self.writers or [], reason)
                self._fail(ABORTED, "attempt aborted: %s" % reason)

    def thaw(self):
        with self.lock:
            if self.timer:
                self.timer.cancel()
            with self.guard:
                state = self.state
                if state == "frozen":
                    self.state = "thawing"      # the watchdog leaves the writers to us now
            if state == "expired":
                raise AgentError(FREEZE_EXPIRED, self.failure["message"],
                                 detail=self.status())
            if state != "frozen":
                raise AgentError(BAD_STATE, "thaw needs a frozen attempt (state: %s)" % state)
            start = time.monotonic()
            held = start - self.frozen_at
            errors = []
            for w in reversed(self.writers):
                try:
                    w.thaw()
                    with self.guard:
                        self._set(w, "thawed")
                except Exception as err:  # noqa: BLE001 - thaw everything, then report
                    with self.guard:
                        self._set(w, "failed", str(err))
                    errors.append((w.name, str(err)))
            self.durations["thaw_ms"] = _ms(start)
            self.durations["held_ms"] = int(round(held * 1000))
            start = time.monotonic()
            for w in self.writers:
                if self.writer_state[w.name]["state"] != "thawed":
                    continue
                try:
                    result = dict(w.post(), kind=w.kind)
                    self.results[w.name] = result
                    with self.guard:
                        self._set(w, "done")
                except Exception as err:  # noqa: BLE001
                    with self.guard:
                        self._set(w, "failed", str(err))
                    errors.append((w.name, str(err)))
            self.durations["post_ms"] = _ms(start)
            if errors:
                self.state = "failed"
                raise self._fail(WRITER_FAILED, errors[0][1], errors[0][0])
            if held > self.deadline_s:
                self.state = "failed"
                raise self._fail(FREEZE_EXPIRED, "the freeze was held %.1f s, over its %.1f s "
                                 "limit" % (held, self.deadline_s))
            self.state = "thawed"
            self._save()
            return self.status()

    def _save(self):
        """The results a later session's backup-complete may need, written durably (fsync of
        the file and its directory) outside the install directory."""
        if not self.state_dir:
            return
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.state_dir, RESULTS_FILE)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"attempt": self.attempt, "results": self.results}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(path + ".tmp", path)
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _saved_results(self, attempt):
        """This session's results, or those a previous agent process saved for `attempt`
        (never another attempt's: truncating for the wrong restore point loses logs)."""
        if self.results:
            if attempt is not None and attempt != self.attempt:
                raise AgentError(BAD_STATE, "attempt %s is not this session's (%s)"
                                 % (attempt, self.attempt))
            return self.results
        if attempt is None:
            raise AgentError(BAD_STATE, "no thawed backup attempt to complete in this session "
                             "(name the attempt to complete a saved one)")
        path = os.path.join(self.state_dir or "", RESULTS_FILE)
        try:
            with open(path) as fh:
                saved = json.load(fh)
            if saved["attempt"] == attempt:
                return saved["results"]
        except (OSError, ValueError, KeyError):
            pass
        raise AgentError(BAD_STATE, "no thawed backup attempt %s to complete" % attempt)

    def backup_complete(self, success, restore_point, truncate, attempt=None):
        with self.lock:
            if self.state in ACTIVE:
                raise AgentError(BAD_STATE, "backup-complete during an attempt (%s)" % self.state)
            saved = self._saved_results(attempt) if success else (self.results or {})
            by_name = {w.name: w for w in self._discover()}
            done, start = {}, time.monotonic()
            for name, result in sorted(saved.items()):
                writer = by_name.get(name)
                if writer is None:
                    if success and truncate:
                        raise AgentError(WRITER_FAILED, "%s is no longer present" % name, name)
                    continue
                try:
                    done[name] = writer.complete(bool(success), bool(truncate), result)
                except Exception as err:  # noqa: BLE001
                    raise AgentError(WRITER_FAILED, str(err), writer=name)
            self.durations["complete_ms"] = _ms(start)
            self.completed = {"success": bool(success), "restore_point": restore_point,
                              "truncate": bool(truncate), "writers": done}
            self.state = "completed"
            return self.status()

    def status(self):
        with self.guard:
            return {
                "state": self.state,
                "attempt": self.attempt,
                "writers": {n: dict(s) for n, s in self.writer_state.items()},
                "skipped": list(self.skipped),
                "durations": dict(self.durations),
                "results": self.results,
                "failure": self.failure,
                "completed": self.completed,
            }
