"""Helpers of the fault suite: run the CLI, kill it at a named hold point, and check what a
fault left behind (guest frozen, snapshots, agent, leaks, restore points bit-exact)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.errors import LabError
from appliance.jobs import environment
from appliance.profile import load_profile
from appliance.progress import NullProgress
from appliance.vsphere import inventory
from appliance.vsphere.snapshots import find_snapshots
from tests.hold_cli import HOLD_CLI
from stillpoint_lab.guest_vm import GuestHandle

STILLPOINT = [sys.executable, "-m", "appliance.cli"]


# A job on a TCG guest of a loaded 2-core machine: every SSH command costs seconds (the
# agent's deploy alone 30 s at a load of 8), a full backup minutes.
JOB_TIMEOUT_S = 900


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = JOB_TIMEOUT_S,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], capture_output=True, text=True, timeout=timeout,
                          check=False,
                          input=input, env={**os.environ, **(env or {})})


def cli_timed(*args: str, env: dict[str, str] | None = None,
              timeout: float = JOB_TIMEOUT_S) -> tuple[int, list[tuple[float, str]]]:
    """`stillpoint <args>`: (exit code, [(seconds since the start, line)] of its output)."""
    proc = subprocess.Popen([*STILLPOINT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    guard = threading.Timer(timeout, proc.kill)
    guard.start()
    start, lines = time.monotonic(), []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        proc.wait()
    finally:
        guard.cancel()
    return proc.returncode, lines


def kill_at(args: list[str], phase: str, *, skip: int = 0, env: dict[str, str] | None = None,
            timeout: float = JOB_TIMEOUT_S, sig: int = signal.SIGKILL) -> str:
    """Run `stillpoint <args>` until it holds at `phase`, then send `sig` (SIGKILL). Returns
    what it wrote on stderr; fails if it ended before reaching the phase."""
    proc = subprocess.Popen([*HOLD_CLI, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {}), "STILLPOINT_HOLD_AT": phase,
                                 "STILLPOINT_HOLD_SKIP": str(skip)})
    guard = threading.Timer(timeout, proc.kill)   # never hang the suite on a lost hold
    guard.start()
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(f'{{"held": "{phase}"'):
                proc.send_signal(sig)
                break
        proc.wait(timeout=60)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen)
    assert proc.returncode == -sig, f"ended (rc {proc.returncode}) before {phase}:\n{text}"
    return text


class MuxGuest(GuestHandle):
    """A lab guest whose SSH commands share one connection (OpenSSH's ControlMaster, the
    guest's host key still pinned): a new connection costs a TCG guest seconds (key exchange,
    PAM, under load 10 s), a session on a shared one a fraction. Only the tests' own commands
    go through it; the appliance makes its own connections."""

    @property
    def control_path(self) -> Path:
        return self.state_dir / "mux.sock"

    def ssh_argv(self, remote: str, *, connect_timeout: int = 10) -> list[str]:
        argv = super().ssh_argv(remote, connect_timeout=connect_timeout)
        return [*argv[:-2], "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                "-o", "ControlPersist=900", *argv[-2:]]

    def close_mux(self) -> None:
        if self.control_path.exists():
            subprocess.run([*self.ssh_argv("true")[:-2], "-O", "exit", self.ssh_argv("")[-2]],
                           capture_output=True, timeout=30, check=False)


def mux_guest(guest: GuestHandle) -> MuxGuest:
    return MuxGuest(**{f.name: getattr(guest, f.name) for f in dataclasses.fields(guest)})


class FreezeClock:
    """Loops in the guest that append the guest's clock to a file on the root file system
    and one on /data every 0.1 s. A write on a frozen file system blocks until the thaw, so
    the longest gap between two lines of a file is how long that file system was frozen,
    measured inside the guest (whatever SSH costs, also while the network is cut). Its
    clock is mapped to the host's by one SSH round trip (`offset`, ± half of it)."""

    PATHS = ("/var/tmp/.freeze-clock", "/data/.freeze-clock")

    def __init__(self, guest: Any, *, map_to_host: bool = True) -> None:
        self.guest = guest
        self.offset, self.uncertainty = 0.0, float("inf")
        loops = " ".join(
            f"rm -f {p}; nohup setsid sh -c 'while :; do date +%s.%N >> {p}; sleep 0.1; done' "
            f"</dev/null >/dev/null 2>&1 & echo $!;" for p in self.PATHS)
        started = guest.sh(loops)
        assert started.returncode == 0, started.stderr
        self.pids = started.stdout.split()
        samples = []               # the round trip with the shortest time bounds it best
        for _ in range(3 if map_to_host else 0):
            before = time.time()
            now = guest.sh("date +%s.%N")
            after = time.time()
            samples.append((after - before, float(now.stdout) - (before + after) / 2))
        if samples:
            rtt, self.offset = min(samples)          # guest clock - host clock
            self.uncertainty = rtt / 2

    def stop(self) -> dict[str, list[float]]:
        """Stop the loops; {path: host times (time.time()) of its lines} (guest times if the
        clock was not mapped)."""
        self.guest.run(["kill", *self.pids])
        out = {}
        for p in self.PATHS:
            lines = self.guest.run(["cat", p]).stdout.split()
            out[p] = [float(t) - self.offset for t in lines]
        self.guest.run(["rm", "-f", *self.PATHS])
        return out

    @staticmethod
    def longest_gap(times: list[float]) -> tuple[float, float]:
        """(start, end) of the longest gap between two lines."""
        assert len(times) > 1, times
        return max(zip(times, times[1:]), key=lambda ab: ab[1] - ab[0])

    def frozen_for(self, clocks: dict[str, list[float]]) -> float:
        """The longest time any of the two file systems was frozen."""
        return max(b - a for a, b in (self.longest_gap(t) for t in clocks.values()))


# Where a timed write tells whether a file system the agent freezes takes writes: the root
# file system (the databases live there) and /data.
PROBE_PATHS = ("/var/tmp/.thaw-probe", "/data/.thaw-probe")


def frozen_paths(guest: Any, wait: float = 0.5) -> list[str]:
    """The probe paths whose file system does not take a write within `wait` seconds (a
    frozen ext4 blocks the writer until it is thawed; the writer is left to finish then).
    A guest that does not answer over SSH at all counts as frozen everywhere."""
    script = "; ".join(f"( echo x > {p} ) </dev/null >/dev/null 2>&1 & p{i}=$!"
                       for i, p in enumerate(PROBE_PATHS)) + f"; sleep {wait}; " \
        + "; ".join(f"kill -0 $p{i} 2>/dev/null && echo {p}" for i, p in enumerate(PROBE_PATHS)) \
        + "; true"
    try:
        out = guest.sh(script, timeout=60)
    except LabError:
        return list(PROBE_PATHS)
    if out.returncode != 0:
        return list(PROBE_PATHS)
    return [ln for ln in out.stdout.split() if ln in PROBE_PATHS]


def guest_writable(guest: Any) -> bool:
    return frozen_paths(guest) == []


def wait_thawed(guest: Any, within: float) -> float:
    """Seconds until the guest's file systems (/ and /data) take writes again; fails after
    `within`."""
    start = time.monotonic()
    while not guest_writable(guest):
        assert time.monotonic() - start < within, f"{guest.name} stayed frozen {within} s"
        time.sleep(0.2)
    return time.monotonic() - start


def write_probe(guest: Any, name: str, mib: int = 1) -> str:
    """Random data into a file on the guest's /data (so the next backup has changes),
    written over SSH as a program in the guest would; its sha256."""
    out = guest.run(["sh", "-c", (f"head -c {mib}M /dev/urandom > /data/{name} && sync "
                                  f"&& sha256sum /data/{name}")])
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def stillpoint_snapshots(profile_path: Path, vm: str) -> list[str]:
    session = environment.open_vcenter(load_profile(profile_path))
    try:
        return [s.name for s in find_snapshots(session, inventory.find_vm(session, vm))]
    finally:
        session.close()


# What the agent could leave in a live guest: its install directory, its boot hooks (the
# lab's boot.d hook, the systemd unit, its wants link and the databases' drop-ins), upload
# temp files, runtime files. The image's own stillpoint-lab-* units and /run/stillpoint-lab
# (its identity) are not the agent's.
AGENT_TRACES = ("/opt/stillpoint/*", "/etc/stillpoint/boot.d/*",
                "/etc/systemd/system/stillpoint-restore*",
                "/etc/systemd/system/*.wants/stillpoint-restore*",
                "/etc/systemd/system/*.d/*stillpoint-restore*",
                "/tmp/.stillpoint-*", "/tmp/stillpoint*", "/var/tmp/stillpoint*",
                "/run/stillpoint", "/run/stillpoint-agent*", "/run/stillpoint.*")


def agent_files(guest: Any) -> str:
    out = guest.sh(f"ls -d {' '.join(AGENT_TRACES)} 2>/dev/null; true")
    return out.stdout.strip()


def agent_left_in_guest(guest: Any, grace: float = 10) -> str:
    """Agent files in the guest, agent processes still running after `grace` seconds (a
    closed session's agent exits on EOF, a moment after the CLI returned), and file systems
    left frozen; "" when the guest is clean."""
    deadline = time.monotonic() + grace
    while (procs := agent_processes(guest)) and time.monotonic() < deadline:
        time.sleep(0.2)
    frozen = frozen_paths(guest)
    return "\n".join(x for x in (agent_files(guest), procs,
                                  "frozen: " + " ".join(frozen) if frozen else "") if x)


_PS = "ps -eo pid=,args="


def guest_processes(guest: Any) -> list[str]:
    """Processes running inside the guest, as "pid: argv" (the guest's own `ps`, over SSH;
    the lines of this very command left out)."""
    out = guest.run(["sh", "-c", _PS])
    assert out.returncode == 0, out.stderr
    procs = []
    for line in out.stdout.splitlines():
        pid, _, argv = line.strip().partition(" ")
        if argv and _PS not in argv:
            procs.append(f"{pid}: {argv.strip()}")
    return procs


def agent_processes(guest: Any) -> str:
    """The agent's processes (serve, deadman, sudo around them) in the guest."""
    return "\n".join(p for p in guest_processes(guest)
                     if "stillpoint-agent" in p or "stillpoint_agent" in p)


def list_ids(env: dict[str, str] | None = None) -> list[str]:
    import json

    out = cli("list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return [p["id"] for p in json.loads(out.stdout)]


def check_read_data(env: dict[str, str] | None = None) -> None:
    out = cli("check", "--read-data", env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def check_structure(env: dict[str, str] | None = None) -> None:
    """`check` without reading the packs: indexes, packs present at their size, restore
    points and block maps authenticate, every chunk named is indexed."""
    out = cli("check", env=env)
    assert out.returncode == 0, out.stdout + out.stderr


_ZEROS = bytes(4 << 20)


def sha256_file(path: Path) -> str:
    """sha256 of a (sparse) file: holes are hashed as zeros without reading them."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole is left
                data = size
            while pos < data:        # the hole before the next data
                n = min(len(_ZEROS), data - pos)
                h.update(_ZEROS[:n] if n < len(_ZEROS) else _ZEROS)
                pos += n
            if pos >= size:
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                block = os.pread(fd, min(4 << 20, hole - pos), pos)
                if not block:
                    raise OSError(f"{path}: short read at {pos}")
                h.update(block)
                pos += len(block)
    finally:
        os.close(fd)
    return h.hexdigest()


class HashingReader:
    """Wraps a DiskReader: hashes each snapshot disk's frozen flat file while the snapshot
    exists (a QEMU VM's base flat, which its delta keeps unchanged; a files VM's captured
    copy): the expected image of the restore point, without copying gigabytes."""

    def __init__(self, inner: Any, datastore_dir: Path) -> None:
        self.inner, self.datastore_dir = inner, datastore_dir
        self.digests: dict[int, str] = {}

    def open(self, disk: Any) -> Any:
        path = self.datastore_dir / disk.path    # a QEMU VM's disk backing names the flat
        flat = path if path.name.endswith("-flat.vmdk") else \
            path.with_name(path.name.replace(".vmdk", "-flat.vmdk"))
        self.digests[disk.key] = sha256_file(flat)
        return self.inner.open(disk)


class RecordingProgress(NullProgress):
    """Progress that keeps the job's events (what `stillpoint backup` prints as lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def event(self, message: str, **fields: Any) -> None:
        self.events.append(message)


def backup_hashed(profile_path: Path, lab: Any, vm: str, *, full: bool = False,
                  app_aware: str = "off", events: list[str] | None = None,
                  reader_class: Any = None, **policy: Any) -> tuple[Any, dict[int, str]]:
    """A backup through the job API (datastore HTTP); (VMResult, {disk key: sha256 of the
    snapshot's image}). `events` collects the job's events; `reader_class(inner,
    datastore_dir)` replaces HashingReader."""
    from appliance.jobs.backup import BackupOptions, run_backup
    from appliance.jobs.consistency import ConsistencyPolicy
    from appliance.transport.datastore_http import DatastoreHTTPReader

    profile = load_profile(profile_path)
    repo = environment.open_repository(profile, create=True)
    session = environment.open_vcenter(profile)
    progress = RecordingProgress()
    try:
        reader = (reader_class or HashingReader)(DatastoreHTTPReader(session),
                                                 lab.vcsim.datastore_dir)
        opts = BackupOptions(targets=(vm,), full=full,
                             policy=ConsistencyPolicy(app_aware=app_aware, **policy))
        [result] = run_backup(opts, profile, session, repo, reader, progress)
    finally:
        session.close()
        if events is not None:
            events.extend(progress.events)
    return result, reader.digests


def assert_restores_bit_exact(profile_path: Path, rp_id: str, expected: dict[int, str],
                              out_dir: Path) -> None:
    """Every disk of `rp_id` restores to the sha256 recorded when its snapshot was taken."""
    repo = environment.open_repository(load_profile(profile_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, digest in expected.items():
        out = out_dir / f"{rp_id[:12]}-{key}.img"
        repo.restore_disk_to(rp_id, key, out)
        try:
            assert sha256_file(out) == digest, f"{rp_id[:12]} disk {key} is not bit-exact"
        finally:
            out.unlink()


def leak_census(lab: Any) -> dict[str, Any]:
    """What a run could leak, in this lab only (other labs may run beside it): host mounts
    and loop devices under the lab's state directory, the lab's taps (a scratch VM's that
    stayed), and in each guest its mount table, frozen file systems and processes."""
    state = str(lab.config.state_dir)
    mounts = [m for m in Path("/proc/self/mounts").read_text().splitlines() if state in m]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout
    tap = re.compile(rf"^sp{lab.config.lab_id}t\d+$")
    return {
        "mounts": sorted(mounts),
        "loops": sorted(line.split(":", 1)[1] for line in loops.splitlines() if state in line),
        "taps": sorted(n for n in (ln.split(":")[1].strip().split("@")[0]
                                   for ln in links.splitlines() if ln.count(":") >= 2)
                       if tap.match(n)),
        "guest_mounts": {name: _guest_mounts(g) for name, g in lab.guests.items()},
        "guest_frozen": {name: frozen_paths(g) for name, g in lab.guests.items()},
        "processes": {name: sorted(p.split(": ", 1)[1] for p in guest_processes(g))
                      for name, g in lab.guests.items()},
    }


class Held:
    """A CLI run paused at a hold point for `hold_for` seconds, then going on by itself."""

    def __init__(self, args: list[str], phase: str, hold_for: float,
                 env: dict[str, str] | None = None, timeout: float = JOB_TIMEOUT_S) -> None:
        self.proc = subprocess.Popen(
            [*HOLD_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {}), "STILLPOINT_HOLD_AT": phase,
                 "STILLPOINT_HOLD_FOR": str(hold_for)})
        self.guard = threading.Timer(timeout, self.proc.kill)
        self.guard.start()
        self.seen: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.seen.append(line)
            if line.startswith(f'{{"held": "{phase}"'):
                return
        self.finish()
        raise AssertionError(f"ended before {phase}:\n{''.join(self.seen)}")

    def finish(self) -> tuple[int, str]:
        """Wait for the end: (exit code, everything it wrote)."""
        try:
            out, err = self.proc.communicate(timeout=JOB_TIMEOUT_S)
        finally:
            self.guard.cancel()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, "".join(self.seen) + (err or "") + (out or "")


def _guest_mounts(guest: Any) -> list[str]:
    """The guest's own mount table (a whole Debian system: nothing of the host's in it), as
    "mount point type source"."""
    lines = guest.run(["cat", "/proc/self/mounts"]).stdout.splitlines()
    return sorted(f"{f[1]} {f[2]} {f[0]}" for f in (ln.split() for ln in lines) if len(f) > 2)
