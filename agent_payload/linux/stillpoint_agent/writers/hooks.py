"""Hook scripts, called as VMware Tools calls them.

Order: /etc/stillpoint/hooks.d/* and /etc/vmware-tools/backupScripts.d/* (executable
regular files) in name order with `freeze`, the legacy /usr/sbin/pre-freeze-script first;
on thaw the reverse order with `thaw` (or `freezeFail` when the attempt failed), the legacy
/usr/sbin/post-thaw-script last. A non-zero exit fails the writer with the script's output.
"""

import os

from ..proc import run, tail
from ..protocol import WriterFailure
from . import Writer


def _executables(directory):
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            out.append(path)
    return out


class HooksWriter(Writer):
    kind = "hooks"
    rank = 10

    def __init__(self, scripts, pre_script, post_script, timeout):
        super(HooksWriter, self).__init__("hooks")
        self.scripts = scripts
        self.pre_script = pre_script
        self.post_script = post_script
        self.timeout = timeout
        self.called = []          # scripts that ran `freeze` (they get thaw/freezeFail)
        self.outputs = []

    def metadata(self):
        meta = super(HooksWriter, self).metadata()
        meta["components"] = [p for p in [self.pre_script] + self.scripts + [self.post_script] if p]
        return meta

    def _call(self, path, arg, timeout=None):
        code, out = run([path, arg], timeout=self.timeout if timeout is None else timeout)
        self.outputs.append({"script": path, "arg": arg, "exit": code, "output": tail(out, 500)})
        if code != 0:
            raise WriterFailure("hook %s %s exited %d: %s" % (path, arg, code, tail(out, 1000)))

    def freeze(self):
        for path in ([self.pre_script] if self.pre_script else []) + self.scripts:
            self.called.append(path)
            self._call(path, "freeze", self.time_left(self.timeout))

    def _unwind(self, arg):
        errors = []
        for path in reversed(self.called):
            if path == self.pre_script:
                continue
            try:
                self._call(path, arg)
            except WriterFailure as err:
                errors.append(str(err))
        if self.post_script and self.called:
            try:
                self._call(self.post_script, arg)
            except WriterFailure as err:
                errors.append(str(err))
        self.called = []
        if errors:
            raise WriterFailure("; ".join(errors))

    def thaw(self):
        self._unwind("thaw")

    def abort(self, reason):
        self._unwind("freezeFail")

    def post(self):
        return {"calls": self.outputs}


def discover(cfg, skipped):
    hcfg = cfg["hooks"]
    scripts = []
    for directory in hcfg["dirs"]:
        scripts.extend(_executables(directory))
    pre, post = hcfg["pre_freeze_script"], hcfg["post_thaw_script"]
    pre = pre if pre and os.access(pre, os.X_OK) else None
    post = post if post and os.access(post, os.X_OK) else None
    if not scripts and not pre and not post:
        return []
    return [HooksWriter(scripts, pre, post, float(hcfg["timeout_s"]))]
