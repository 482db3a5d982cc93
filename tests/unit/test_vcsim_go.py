"""The Go extension of the vCenter simulator has its own tests (`go test`, as it is built)."""

from __future__ import annotations

import os
import shutil
import subprocess

from stillpoint_lab import vcsim


def test_the_simulator_extension_passes_its_go_tests() -> None:
    go = shutil.which("go")
    assert go is not None, "Go is not installed (Debian package golang-go, from install-deps)"
    # The build's own cache: compiled govmomi is shared with the lab's build of the binary.
    env = dict(os.environ, GOPATH=str(vcsim.GOPATH), GO111MODULE="off", GOFLAGS="",
               GOCACHE=str(vcsim.go_cache_dir()))
    done = subprocess.run([go, "test", "-count=1", "."], cwd=vcsim.GO_SOURCES, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "ok" in done.stdout
