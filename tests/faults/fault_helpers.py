"""Helpers of the fault suite: run the CLI, kill it at a named hold point, and check what a
fault left behind (guest frozen, snapshots, agent, leaks, restore points bit-exact)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.jobs import environment
from appliance.profile import load_profile
from appliance.vsphere import inventory
from appliance.vsphere.snapshots import find_snapshots

STILLPOINT = [sys.executable, "-m", "appliance.cli"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], capture_output=True, text=True, timeout=timeout,
                          check=False,
                          input=input, env={**os.environ, **(env or {})})


def kill_at(args: list[str], phase: str, *, skip: int = 0, env: dict[str, str] | None = None,
            timeout: float = 240, sig: int = signal.SIGKILL) -> str:
    """Run `stillpoint <args>` until it holds at `phase`, then send `sig` (SIGKILL). Returns
    what it wrote on stderr; fails if it ended before reaching the phase."""
    proc = subprocess.Popen([*STILLPOINT, *args], stdout=subprocess.DEVNULL,
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


def guest_writable(guest: Any) -> bool:
    return guest.run(["timeout", "0.5", "sh", "-c", "echo x > /data/.thaw-probe"]).returncode == 0


def wait_thawed(guest: Any, within: float) -> float:
    """Seconds until the guest's /data takes writes again; fails after `within`."""
    start = time.monotonic()
    while not guest_writable(guest):
        assert time.monotonic() - start < within, f"{guest.name} stayed frozen {within} s"
        time.sleep(0.2)
    return time.monotonic() - start


def write_probe(guest: Any, name: str, mib: int = 1) -> str:
    """Random data into a guest file (so the next backup has changes); its sha256."""
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


def agent_left_in_guest(guest: Any, grace: float = 10) -> str:
    """Agent files in the guest, or agent processes still running after `grace` seconds
    (a closed session's agent exits on EOF, a moment after the CLI returned)."""
    files = guest.run(["find", "/opt/stillpoint", "/etc/stillpoint/boot.d", "-mindepth", "1"])
    deadline = time.monotonic() + grace
    while (procs := agent_processes(guest)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return files.stdout.strip() + procs


def guest_processes(guest: Any) -> list[str]:
    """Processes running inside the guest (its network namespace), as "pid: argv"."""
    ns = os.stat(f"/run/netns/{guest.netns}").st_ino
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.stat(p / "ns" / "net").st_ino != ns:
                continue
            argv = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if argv:
            out.append(f"{p.name}: {argv}")
    return out


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


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
    and loop devices under the lab's state directory, the lab's network namespaces, and the
    mounts and processes inside each guest."""
    state = str(lab.config.state_dir)
    mounts = [m for m in Path("/proc/self/mounts").read_text().splitlines() if state in m]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    prefix = lab.config.netns("")
    return {
        "mounts": sorted(mounts),
        "loops": sorted(line.split(":", 1)[1] for line in loops.splitlines() if state in line),
        "netns": sorted(n.split()[0] for n in netns.splitlines()
                        if n.split() and n.split()[0].startswith(prefix)),
        "guest_mounts": {name: _guest_mounts(g) for name, g in lab.guests.items()},
        "processes": {name: sorted(p.split(": ", 1)[1] for p in guest_processes(g))
                      for name, g in lab.guests.items()},
    }


class Held:
    """A CLI run paused at a hold point for `hold_for` seconds, then going on by itself."""

    def __init__(self, args: list[str], phase: str, hold_for: float,
                 env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.proc = subprocess.Popen(
            [*STILLPOINT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
            out, err = self.proc.communicate(timeout=300)
        finally:
            self.guard.cancel()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, "".join(self.seen) + (err or "") + (out or "")


# Mount points the agent or a job could leave in a guest; the rest of a guest's mount table
# mirrors the host's (shared propagation), where other labs come and go.
_GUEST_MOUNT_ROOTS = ("/data", "/opt", "/etc/stillpoint", "/etc/vmware-tools", "/mnt", "/media",
                      "/run/stillpoint", "/tmp/stillpoint")


def _guest_mounts(guest: Any) -> list[str]:
    lines = guest.run(["cat", "/proc/self/mounts"]).stdout.splitlines()
    return sorted(ln for ln in lines if len(ln.split()) > 1
                  and ln.split()[1].startswith(_GUEST_MOUNT_ROOTS))
