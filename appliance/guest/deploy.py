"""Put the agent into a guest, start it, and always take it out again.

deploy_agent: check the local payload against its MANIFEST.sha256 (a stale manifest is a
packaging bug: refuse), create the install directory (0700, on a backed-up disk so the
agent is inside the snapshot), upload the payload files, the manifest and config.json as one
tar archive and unpack it there (one upload and two commands, not two per file: each SSH
command through sudo cost a TCG guest half a second, 16 s for the payload), install the boot
hook (`stillpoint-agent install`, which verifies the manifest in the guest
first), start `stillpoint-agent serve` and say hello.

remove_agent: `uninstall` through the live session; if the agent cannot answer, run the
bootstrap's `uninstall`; if that cannot run either, delete the directory and the hook
files directly. Then check that nothing is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import GuestError
from appliance.guest.channel import GuestChannel
from appliance.guest.client import AgentClient
from appliance.guest.session import RemovedOnExit, check, removed_on_failure, start_agent

log = logging.getLogger(__name__)

PAYLOAD_DIR = Path(__file__).resolve().parents[2] / "agent_payload" / "linux"
MANIFEST = "MANIFEST.sha256"
DEFAULT_INSTALL_DIR = "/opt/stillpoint/agent"
DEFAULT_HOOK_DIRS = ("/etc/stillpoint/boot.d",)
HOOK_NAME = "stillpoint-restore"


def payload_files(payload_dir: Path = PAYLOAD_DIR) -> list[tuple[str, str]]:
    """(sha256, relative path) from the manifest, after checking every local file."""
    entries = []
    for line in (payload_dir / MANIFEST).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        data = (payload_dir / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise GuestError(f"agent payload {rel} does not match {MANIFEST}; "
                             "run agent_payload/build_manifest.py")
        entries.append((digest, rel))
    return entries


def _payload_archive(payload_dir: Path, entries: list[tuple[str, str]],
                     config: dict[str, Any] | None) -> bytes:
    """The payload, its manifest and config.json as a tar archive: root-owned, the bootstrap
    0700 and every other file 0600, directories 0700."""
    files = [(rel, (payload_dir / rel).read_bytes(), 0o700 if rel == "stillpoint-agent" else 0o600)
             for _, rel in entries]
    files.append((MANIFEST, (payload_dir / MANIFEST).read_bytes(), 0o600))
    files.append(("config.json", json.dumps(config or {}).encode(), 0o600))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = sorted({posixpath.dirname(rel) for rel, _, _ in files} - {""})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for rel, data, mode in files:
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _ancestors(path: str) -> list[str]:
    """/opt/stillpoint/agent -> ["/opt", "/opt/stillpoint"] (not / nor the path itself)."""
    parts = path.rstrip("/").split("/")[1:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def _existing(channel: GuestChannel, paths: list[str]) -> list[str]:
    """Which of `paths` exist in the guest, in one command."""
    res = channel.run(["sh", "-c", 'for p do [ -e "$p" ] && printf "%s\\n" "$p"; done; exit 0',
                       "sh", *paths])
    if not res.ok:
        raise GuestError(f"cannot look for the agent's files: {res.text()[-500:]}")
    listed = set(res.stdout.decode(errors="replace").splitlines())
    return [p for p in paths if p in listed]


def _hook_files(config: dict[str, Any] | None) -> list[str]:
    boot = (config or {}).get("boot") or {}
    paths = [posixpath.join(d, HOOK_NAME) for d in boot.get("hook_dirs", DEFAULT_HOOK_DIRS)]
    if boot.get("systemd_dir"):
        sd = boot["systemd_dir"]
        paths += [posixpath.join(sd, "stillpoint-restore.service"),
                  posixpath.join(sd, "multi-user.target.wants", "stillpoint-restore.service")]
    return paths


@dataclass
class AgentSession(RemovedOnExit):
    """A deployed, running agent. Use as a context manager: leaving it always uninstalls."""

    channel: GuestChannel
    install_dir: str
    client: AgentClient
    hello: dict[str, Any]
    config: dict[str, Any] | None = None
    created_dirs: list[str] = field(default_factory=list)   # ancestors deploy made, deepest first
    removed: bool = field(default=False)

    @property
    def agent_path(self) -> str:
        return posixpath.join(self.install_dir, "stillpoint-agent")

    def _uninstall(self) -> None:
        remove_agent(self.channel, self.install_dir, self.config, client=self.client,
                     created_dirs=self.created_dirs)


def deploy_agent(channel: GuestChannel, install_dir: str = DEFAULT_INSTALL_DIR,
                 config: dict[str, Any] | None = None, *, boot_hook: bool = True,
                 payload_dir: Path = PAYLOAD_DIR) -> AgentSession:
    if not posixpath.isabs(install_dir) or install_dir.rstrip("/").count("/") < 2:
        raise GuestError(f"install directory {install_dir!r} must be an absolute path "
                         "at least two levels deep")
    entries = payload_files(payload_dir)
    dirs = sorted({posixpath.dirname(posixpath.join(install_dir, rel)) for _, rel in entries})
    # The install directory's ancestors that do not exist yet (/opt/stillpoint): made here,
    # so removed again with the agent.
    ancestors = _ancestors(install_dir)
    present = set(_existing(channel, ancestors))
    created = [d for d in reversed(ancestors) if d not in present]
    check(channel.run(["mkdir", "-p", "-m", "0700", *dirs]), "creating the install directory")
    check(channel.run(["chmod", "0700", install_dir]), "securing the install directory")
    with removed_on_failure(lambda: remove_agent(channel, install_dir, config,
                                                 created_dirs=created)):
        archive = posixpath.join(install_dir, ".payload.tar")
        channel.put_file(_payload_archive(payload_dir, entries, config), archive, 0o600)
        # The guest's own tar (in every Linux base system); a file cut short by a failure
        # here is caught by the manifest check that `install` and `serve` make first.
        check(channel.run(["tar", "-x", "-f", archive, "-C", install_dir]),
              "unpacking the agent")
        check(channel.run(["rm", "-f", "--", archive]), "removing the agent's archive")
        agent = posixpath.join(install_dir, "stillpoint-agent")
        if boot_hook:
            check(channel.run([agent, "install"]), "installing the boot hook")
        client, hello = start_agent(channel.open_process([agent, "serve"]))
    return AgentSession(channel, install_dir, client, hello, config, created)


def remove_agent(channel: GuestChannel, install_dir: str = DEFAULT_INSTALL_DIR,
                 config: dict[str, Any] | None = None, *,
                 client: AgentClient | None = None,
                 created_dirs: list[str] | None = None) -> None:
    """Uninstall from the live guest, by the best way still available; verify it is gone.
    `created_dirs` (deepest first), the install directory's ancestors that deploy made, are
    removed too when nothing else was put in them."""
    if client is not None and not client.closed:
        try:
            client.uninstall()
        except GuestError as err:
            log.warning("agent uninstall over the session failed: %s", err)
            client.close()
    agent = posixpath.join(install_dir, "stillpoint-agent")
    ours = [install_dir, *_hook_files(config)]
    leftovers = _existing(channel, ours)
    if install_dir in leftovers:
        res = channel.run([agent, "uninstall"])
        if not res.ok:
            log.warning("agent uninstall command failed: %s", res.text()[-500:])
        leftovers = _existing(channel, ours)
    if leftovers:
        channel.run(["rm", "-rf", "--", *leftovers])
        leftovers = _existing(channel, ours)
    if leftovers:
        raise GuestError(f"could not remove the agent from the guest: {leftovers} remain")
    ours_by_name = [posixpath.dirname(DEFAULT_INSTALL_DIR)] \
        if install_dir == DEFAULT_INSTALL_DIR else []     # /opt/stillpoint, left by a kill
    empty_dirs = list(dict.fromkeys([*ours_by_name, *(created_dirs or [])]))
    if empty_dirs:
        # rmdir only removes empty directories: what someone else put there stays.
        channel.run(["rmdir", "--", *empty_dirs])
