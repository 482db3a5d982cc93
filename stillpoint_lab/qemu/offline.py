"""A powered-off VM's disks: snapshots, bitmap checks and NBD exports without QEMU.

With no QEMU process, `qemu-img` does what the QMP transaction does (disable the recording
bitmap, add the next one, create the delta over the metadata qcow2), and `qemu-nbd`
serves what QEMU's NBD server would (the frozen base read-only, with disabled bitmaps for
CBT). Each qemu-nbd runs forked, with a pid file `<run dir>/nbd-<purpose>.pid` and a socket
`<run dir>/nbd-<purpose>.sock`, so that a restarted hostd can stop the ones it left; they
must be stopped before QEMU opens the images again (power-on) or qemu-img changes them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stillpoint_lab.qemu.cbt import BLOCK, bitmap_seq
from stillpoint_lab.qemu.disks import DiskError, bitmaps_offline, create_delta_offline, qemu_img

QEMU_NBD = "qemu-nbd"


def check_bitmaps(meta: Path, expected: set[str]) -> tuple[str | None, bool]:
    """(why this disk's CBT bitmaps cannot be trusted or None, whether QEMU did not stop
    cleanly): one of ours is "in-use" (QEMU did not close the image), or an expected one
    is missing."""
    bms = {b["name"]: b for b in bitmaps_offline(meta) if bitmap_seq(b["name"]) is not None}
    for name, b in bms.items():
        if "in-use" in b.get("flags", []):
            return (f"bitmap {name} of {meta.name} is inconsistent (QEMU did not stop "
                    "cleanly)"), True
    missing = expected - set(bms)
    if missing:
        return f"{meta.name} lacks bitmaps {sorted(missing)}", False
    return None, False


def our_bitmaps(meta: Path) -> list[str]:
    return [b["name"] for b in bitmaps_offline(meta) if bitmap_seq(b["name"]) is not None]


def remove_bitmaps(meta: Path, names: list[str]) -> None:
    for name in names:
        qemu_img("bitmap", "--remove", str(meta), name)


def snapshot_disk(meta: Path, delta: Path, *, disable: str | None, add: str | None) -> None:
    """One disk's part of a snapshot of a powered-off VM (undone on failure)."""
    added = False
    try:
        if disable is not None:
            qemu_img("bitmap", "--disable", str(meta), disable)
        if add is not None:
            qemu_img("bitmap", "--add", "-g", str(BLOCK), str(meta), add)
            added = True
        create_delta_offline(delta, meta)
    except DiskError:
        delta.unlink(missing_ok=True)
        try:
            if added and add is not None:
                qemu_img("bitmap", "--remove", str(meta), add)
            if disable is not None:
                qemu_img("bitmap", "--enable", str(meta), disable)
        except DiskError:
            pass
        raise


def nbd_paths(run_dir: Path, purpose: str) -> tuple[Path, Path]:
    return run_dir / f"nbd-{purpose}.sock", run_dir / f"nbd-{purpose}.pid"


def start_nbd(run_dir: Path, purpose: str, meta: Path, export: str, *,
              bitmaps: Sequence[str] = (), persistent: bool = False) -> Path:
    """qemu-nbd serving `meta` (and so its flat) read-only as `export`; its socket."""
    stop_nbd(run_dir, purpose)
    sock, pid_file = nbd_paths(run_dir, purpose)
    sock.unlink(missing_ok=True)
    argv = [QEMU_NBD, "--read-only", "--format=qcow2", f"--socket={sock}",
            f"--export-name={export}", "--fork", f"--pid-file={pid_file}", "--shared=8"]
    if persistent:
        argv.append("--persistent")
    for name in bitmaps:
        argv.append(f"--bitmap={name}")
    argv.append(str(meta))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DiskError(f"{QEMU_NBD}: {err}") from err
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-1000:]}")
    return sock


def _pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if QEMU_NBD.encode() in cmdline and state not in ("Z", "X") else None


def stop_nbd(run_dir: Path, purpose: str) -> None:
    sock, pid_file = nbd_paths(run_dir, purpose)
    pid = _pid(pid_file)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while _pid(pid_file) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid(pid_file) is not None:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)


def stop_all_nbd(run_dir: Path) -> None:
    for pid_file in run_dir.glob("nbd-*.pid"):
        stop_nbd(run_dir, pid_file.name[len("nbd-"):-len(".pid")])


def running_nbd(run_dir: Path) -> dict[str, Any]:
    """purpose → pid of the qemu-nbd servers that run for this VM."""
    out = {}
    for pid_file in run_dir.glob("nbd-*.pid"):
        pid = _pid(pid_file)
        if pid is not None:
            out[pid_file.name[len("nbd-"):-len(".pid")]] = pid
    return out
