"""A lab guest that is a QEMU virtual machine: reached the way an operator reaches one.

Commands run over SSH as the image's `splab` user with `sudo -n` (OpenSSH's client, the
guest's host key pinned in a known_hosts file of the lab's; nothing is trusted on first use:
the key was read from the guest through qemu-guest-agent, the hypervisor's channel). The
applications are the image's own systemd units. Nothing here reaches into the guest from the
host's side: what a test sees is what a program on the network would see.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import LabError
from stillpoint_lab.config import LabConfig

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAB_SSH_USER = "splab"      # the image's user (stillpoint_lab/image/layout.py SSH_USER)


def lab_ssh_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "ssh"


def lab_client_key(cfg: LabConfig) -> Path:
    """The lab's SSH client key (the appliance's key for lab guests; `.pub` beside it)."""
    return lab_ssh_dir(cfg) / "id_ed25519"


def ensure_lab_client_key(cfg: LabConfig) -> Path:
    key = lab_client_key(cfg)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.parent.chmod(0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        f"stillpoint-lab{cfg.lab_id}", "-f", str(key)], check=True)
    return key
APP_UNITS = {"postgresql": "postgresql@15-main.service", "mariadb": "mariadb.service"}


@dataclass
class GuestHandle:
    cfg: LabConfig
    index: int
    name: str
    ip: str
    ssh_user: str
    ssh_key_path: Path          # the lab's client private key
    host_key_line: str          # known_hosts format: "<ip> ssh-ed25519 AAAA..."
    state_dir: Path             # the lab's (host) directory for this guest
    apps: tuple[str, ...] = ("postgresql", "mariadb")

    @property
    def known_hosts(self) -> Path:
        path = self.state_dir / "known_hosts"
        line = self.host_key_line.strip() + "\n"
        if not path.exists() or path.read_text() != line:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(line)
        return path

    def ssh_argv(self, remote: str, *, connect_timeout: int = 10) -> list[str]:
        return ["ssh", "-o", "LogLevel=ERROR", "-i", str(self.ssh_key_path), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ConnectTimeout={connect_timeout}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                f"{self.ssh_user}@{self.ip}", remote]

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """The host argv that runs `argv` as root inside the guest, clean environment."""
        base = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        remote = " ".join(["sudo", "-n", "env", "-i",
                           *(shlex.quote(f"{k}={v}") for k, v in base.items()),
                           *map(shlex.quote, argv)])
        return self.ssh_argv(remote)

    def run(self, argv: list[str], input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `argv` as root in the guest; its exit code, stdout and stderr come back."""
        try:
            return subprocess.run(self.command(argv), check=False, input=input,
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"in guest {self.name}: {argv[0]}: {err}") from err

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], timeout=timeout)

    def spawn(self, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A long-running command in the guest; it ends with its SSH session."""
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv, env), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ssh(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                probe = subprocess.run(self.ssh_argv("sudo -n true", connect_timeout=5),
                                       capture_output=True, text=True, timeout=20,
                                       stdin=subprocess.DEVNULL)
                if probe.returncode == 0:
                    return
                last = probe.stderr.strip() or f"exit {probe.returncode}"
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            time.sleep(1)
        raise LabError(f"guest {self.name} at {self.ip}: no SSH within {timeout:g} s ({last})")

    def start_apps(self, after_boot: bool = False) -> None:
        units = [APP_UNITS[a] for a in self.apps if a in APP_UNITS]
        if units:
            self._systemctl("start", units)
        self.wait_apps()

    def stop_apps(self) -> None:
        units = [APP_UNITS[a] for a in reversed(self.apps) if a in APP_UNITS]
        if units:
            self._systemctl("stop", units)

    def wait_apps(self, timeout: float = 180) -> None:
        """Until both databases answer (after a restore they may be recovering first)."""
        checks = {"postgresql": "pg_isready -q -h /run/postgresql",
                  "mariadb": "mariadb-admin --protocol=socket ping >/dev/null 2>&1"}
        script = " && ".join(checks[a] for a in self.apps if a in checks) or "true"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sh(script, timeout=30).returncode == 0:
                return
            time.sleep(1)
        raise LabError(f"guest {self.name}: {', '.join(self.apps)} not answering "
                       f"within {timeout:g} s")

    def _systemctl(self, verb: str, units: list[str]) -> None:
        done = self.run(["systemctl", verb, *units], timeout=180)
        if done.returncode != 0:
            raise LabError(f"guest {self.name}: systemctl {verb} {' '.join(units)}: "
                           f"{done.stderr.strip()}")
