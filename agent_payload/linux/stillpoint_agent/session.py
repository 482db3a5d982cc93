"""One backup attempt: all writers through prepare -> freeze -> thaw/post -> complete.

Timing contract (a separate deadman process, writers/filesystem.py, covers the agent
itself dying): from the start of `freeze` a watchdog thread gives the attempt at most
`freeze_timeout_s` (<= 60 s). At the deadline it undoes every writer itself (file systems
thawed, database sessions released, hooks called with freezeFail) whether or not anyone is
still connected, and the attempt is failed with FREEZE_EXPIRED. A lost client (stdin EOF,
SIGTERM/SIGHUP) aborts the attempt the same way at once. One lock serialises the protocol
thread and the watchdog, so a writer is never driven by both.
"""

import json
import os
import threading
import time

from . import writers as writerlib
from .config import effective
from .protocol import (ABORTED, BAD_STATE, FREEZE_EXPIRED, WRITER_FAILED, AgentError,
                       WriterFailure)

RESULTS_FILE = "last_backup.json"


def _ms(start):
    return int(round((time.monotonic() - start) * 1000))


class BackupSession(object):
    def __init__(self, cfg, default_state_dir):
        self.cfg = cfg
        self.default_state_dir = default_state_dir
        self.lock = threading.RLock()
        self.writers = None
        self.skipped = []
        self.state = "idle"
        self.writer_state = {}
        self.durations = {}
        self.results = {}
        self.failure = None
        self.timer = None
        self.frozen_at = None
        self.deadline_s = None
        self.completed = None

    # --- helpers ------------------------------------------------------------------------
    @property
    def state_dir(self):
        return self.cfg["state_dir"] or self.default_state_dir

    def configure(self, update):
        with self.lock:
            if self.state in ("prepared", "frozen"):
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
        self.writer_state[writer.name].update(state=state, error=error)

    def _fail(self, code, message, writer=None):
        self.failure = {"code": code, "message": message}
        if writer:
            self.failure["writer"] = writer
        return AgentError(code, message, writer=writer)

    def _undo_all(self, reason, final_state):
        """Abort every writer that did something, highest rank first. Never raises."""
        errors = []
        for w in reversed(self.writers or []):
            if self.writer_state[w.name]["state"] in ("prepared", "frozen", "failed"):
                try:
                    w.abort(reason)
                    if self.writer_state[w.name]["state"] != "failed":
                        self._set(w, "aborted", reason)
                except Exception as err:  # noqa: BLE001 - undo must reach every writer
                    errors.append("%s: %s" % (w.name, err))
                    self._set(w, "failed", str(err))
        self.state = final_state
        return errors

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
            if self.state in ("prepared", "frozen"):
                raise AgentError(BAD_STATE, "an attempt is already %s" % self.state)
            writers = self._discover()
            self.failure, self.results, self.durations, self.completed = None, {}, {}, None
            for w in writers:
                self._set(w, "idle")
            start = time.monotonic()
            for w in writers:
                try:
                    w.prepare()
                    self._set(w, "prepared")
                except Exception as err:  # noqa: BLE001 - any writer error fails the attempt
                    self._set(w, "failed", str(err))
                    self._undo_all("prepare failed", "failed")
                    raise self._fail(WRITER_FAILED, str(err), w.name)
            self.durations["prepare_ms"] = _ms(start)
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
            self.frozen_at = start
            self.timer = threading.Timer(self.deadline_s, self._expire)
            self.timer.daemon = True
            self.timer.start()
            for w in self.writers:
                w.deadline_s = self.deadline_s      # e.g. for the file systems' deadman
                try:
                    w.freeze()
                    self._set(w, "frozen")
                except Exception as err:  # noqa: BLE001
                    self.timer.cancel()
                    self._set(w, "failed", str(err))
                    self._undo_all("freeze failed", "failed")
                    raise self._fail(WRITER_FAILED, str(err), w.name)
            self.durations["freeze_ms"] = _ms(start)
            self.state = "frozen"
            return dict(self.status(), deadline_s=self.deadline_s)

    def _expire(self):
        with self.lock:
            if self.state != "frozen":
                return
            held = time.monotonic() - self.frozen_at
            self._undo_all("freeze deadline passed", "expired")
            self._fail(FREEZE_EXPIRED, "the freeze was held %.1f s, over its %.1f s limit; "
                       "the watchdog thawed everything" % (held, self.deadline_s))

    def abort(self, reason):
        with self.lock:
            if self.timer:
                self.timer.cancel()
            if self.state in ("prepared", "frozen"):
                self._undo_all(reason, "aborted")
                self._fail(ABORTED, "attempt aborted: %s" % reason)

    def thaw(self):
        with self.lock:
            if self.timer:
                self.timer.cancel()
            if self.state == "expired":
                raise AgentError(FREEZE_EXPIRED, self.failure["message"],
                                 detail=self.status())
            if self.state != "frozen":
                raise AgentError(BAD_STATE, "thaw needs a frozen attempt (state: %s)" % self.state)
            start = time.monotonic()
            held = start - self.frozen_at
            errors = []
            for w in reversed(self.writers):
                try:
                    w.thaw()
                    self._set(w, "thawed")
                except Exception as err:  # noqa: BLE001 - thaw everything, then report
                    self._set(w, "failed", str(err))
                    errors.append((w.name, str(err)))
            self.durations["thaw_ms"] = _ms(start)
            self.durations["held_ms"] = int(round(held * 1000))
            start = time.monotonic()
            for w in self.writers:
                if self.writer_state[w.name]["state"] != "thawed":
                    continue
                try:
                    self.results[w.name] = dict(w.post(), kind=w.kind)
                    self._set(w, "done")
                except Exception as err:  # noqa: BLE001
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
        if not self.state_dir:
            return
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.state_dir, RESULTS_FILE)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"results": self.results, "config": self.cfg}, fh)
        os.rename(path + ".tmp", path)

    def _saved_results(self):
        if self.results:
            return self.results
        path = os.path.join(self.state_dir or "", RESULTS_FILE)
        try:
            with open(path) as fh:
                return json.load(fh)["results"]
        except (OSError, ValueError, KeyError):
            raise AgentError(BAD_STATE, "no thawed backup attempt to complete")

    def backup_complete(self, success, restore_point, truncate):
        with self.lock:
            if self.state in ("prepared", "frozen"):
                raise AgentError(BAD_STATE, "backup-complete during an attempt (%s)" % self.state)
            saved = self._saved_results() if success else (self.results or {})
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
        with self.lock:
            return {
                "state": self.state,
                "writers": {n: dict(s) for n, s in self.writer_state.items()},
                "skipped": list(self.skipped),
                "durations": dict(self.durations),
                "results": self.results,
                "failure": self.failure,
                "completed": self.completed,
            }
