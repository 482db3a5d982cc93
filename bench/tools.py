"""The exact commands of every contender, with secrets passed through 0600 files.

Each builder returns a `Cmd` (argv, environment, stdin/stdout files) and its `shown` form
for RESULTS.md. Paths are whatever the run uses; passphrases and the vCenter session
cookie are never in argv: restic reads RESTIC_PASSWORD_FILE, borg BORG_PASSCOMMAND
(`cat <0600 file>`), curl its configuration (the Cookie header) from a 0600 file (-K).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.profile import write_private

STILLPOINT = [sys.executable, "-m", "appliance.cli"]


@dataclass(frozen=True)
class Cmd:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: Path | None = None
    stdout: Path | None = None
    cwd: Path | None = None

    @property
    def shown(self) -> str:
        text = shlex.join(["stillpoint", *self.argv[3:]] if self.argv[:3] == STILLPOINT
                          else self.argv)
        if self.stdin:
            text += f" < {self.stdin}"
        if self.stdout:
            text += f" > {self.stdout}"
        if self.cwd:
            text = f"(cd {self.cwd} && {text})"
        return text


def then_sync(cmd: Cmd, path: Path) -> Cmd:
    """The command followed by an fsync of `path` (restores are timed until durable)."""
    inner = cmd.shown if cmd.argv[:3] != STILLPOINT else shlex.join(cmd.argv)
    return Cmd(["sh", "-c", f"{inner} && sync {shlex.quote(str(path))}"], cmd.env)


@dataclass
class Tools:
    """Commands bound to this run's secrets directory."""

    secrets: Path

    def __post_init__(self) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.passfile = self.secrets / "peer.passphrase"
        if not self.passfile.exists():
            import secrets as _s

            write_private(self.passfile, _s.token_urlsafe(24))

    # --- the raw transport: the limit --------------------------------------------------
    def curl_config(self, cookie: str) -> Path:
        path = self.secrets / "curl.conf"
        write_private(path, f'header = "Cookie: {cookie}"\n')
        return path

    def curl(self, url: str, cafile: Path, config: Path) -> Cmd:
        return Cmd(["curl", "-sS", "--fail", "--http1.1", "--cacert", str(cafile),
                    "-K", str(config), "-o", "/dev/null", url])

    # --- Stillpoint ---------------------------------------------------------------------
    def sp(self, profile: Path, *args: str) -> Cmd:
        return Cmd([*STILLPOINT, *args], {"STILLPOINT_PROFILE": str(profile)})

    # --- restic ---------------------------------------------------------------------------
    def _restic_env(self, cache: Path) -> dict[str, str]:
        return {"RESTIC_PASSWORD_FILE": str(self.passfile), "RESTIC_CACHE_DIR": str(cache)}

    def restic(self, repo: Path, cache: Path, *args: str, stdin: Path | None = None) -> Cmd:
        return Cmd(["restic", "-r", str(repo), "-q", *args], self._restic_env(cache), stdin)

    def restic_init(self, repo: Path, cache: Path) -> Cmd:
        return self.restic(repo, cache, "init", "--repository-version", "2")

    def restic_backup(self, repo: Path, cache: Path, source: Path) -> Cmd:
        return self.restic(repo, cache, "--compression", "auto", "backup", "--stdin",
                           "--stdin-filename", "disk.img", stdin=source)

    # --- borg -----------------------------------------------------------------------------
    def _borg_env(self, home: Path) -> dict[str, str]:
        return {"BORG_PASSCOMMAND": f"cat {self.passfile}", "BORG_BASE_DIR": str(home),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def borg(self, home: Path, *args: str, stdin: Path | None = None,
             cwd: Path | None = None) -> Cmd:
        return Cmd(["borg", *args], self._borg_env(home), stdin, cwd=cwd)

    def borg_init(self, repo: Path, home: Path) -> Cmd:
        return self.borg(home, "init", "-e", "repokey", str(repo))

    def borg_create(self, repo: Path, home: Path, archive: str, source: Path) -> Cmd:
        return self.borg(home, "create", "--compression", "zstd,3", "--chunker-params",
                         "fixed,4194304", "--stdin-name", "disk.img", f"{repo}::{archive}", "-",
                         stdin=source)
