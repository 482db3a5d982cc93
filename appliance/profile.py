"""The profile: where vCenter, the repository and the guests are, and how to trust them.

A JSON file, readable by its owner only (0600; anything looser is refused, because it may
hold a password). Looked up from --profile, $STILLPOINT_PROFILE, then
~/.config/stillpoint/profile.json. `stillpoint-lab up` writes one for the lab.

    {
      "vcenter":    {"host", "port", "user", "password" | "password_file",
                     "thumbprint_sha256" | "ca_file"},
      "repository": {"path", "passphrase" | "passphrase_file" | "encryption": false},
      "guests":     {"<vm name>": {"transport": "ssh", "host", "port", "user", "key_file",
                                   "host_key", "sudo", "agent": {...agent config...}}}
    }

Secrets may also come from the environment (STILLPOINT_VC_PASSWORD,
STILLPOINT_PASSPHRASE) and never from the command line.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import UsageError

DEFAULT_PATH = Path("~/.config/stillpoint/profile.json")


@dataclass
class GuestAccess:
    host: str
    port: int | None = None                  # default: 22 for ssh, 5986 for winrm
    user: str = "root"
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    host_key: str | None = None  # known_hosts line "type base64"; required for SSH
    sudo: bool = False
    transport: str = "ssh"                   # "ssh" (Linux) or "winrm" (Windows)
    agent: dict[str, Any] = field(default_factory=dict)
    auth: str = "ntlm"                        # winrm: ntlm | kerberos | credssp | basic
    ca_file: str | None = None                # winrm: CA bundle for the guest's certificate
    thumbprint_sha256: str | None = None      # winrm: or pin the certificate
    install_dir: str | None = None            # where the agent goes (on a backed-up disk)


@dataclass
class Profile:
    path: Path | None
    vcenter: dict[str, Any]
    repository: dict[str, Any]
    guests: dict[str, GuestAccess]

    def vcenter_password(self) -> str | None:
        return _secret(self.vcenter, "password", "STILLPOINT_VC_PASSWORD", self.path)

    def repository_passphrase(self) -> str | None:
        if self.repository.get("encryption") is False:
            return None
        return _secret(self.repository, "passphrase", "STILLPOINT_PASSPHRASE", self.path)

    def repository_path(self) -> Path:
        raw = os.environ.get("STILLPOINT_REPOSITORY") or self.repository.get("path")
        if not raw:
            raise UsageError(
                "no repository: set repository.path in the profile or $STILLPOINT_REPOSITORY"
            )
        return Path(raw).expanduser()


def resolve_path(explicit: str | Path | None) -> Path:
    raw = explicit or os.environ.get("STILLPOINT_PROFILE") or DEFAULT_PATH
    return Path(raw).expanduser()


def load_profile(explicit: str | Path | None = None, *, required: bool = True) -> Profile:
    path = resolve_path(explicit)
    if not path.exists():
        if required:
            raise UsageError(
                f"profile {path} not found: run 'stillpoint-lab up' or write one "
                "(see docs/profile.md), or pass --profile"
            )
        return Profile(None, {}, {}, {})
    check_private(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"profile {path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise UsageError(f"profile {path} must hold a JSON object")
    guests = {}
    for name, raw in (doc.get("guests") or {}).items():
        try:
            guests[name] = GuestAccess(**raw)
        except TypeError as err:
            raise UsageError(f"profile {path}: guest {name!r}: {err}") from err
    return Profile(path, doc.get("vcenter") or {}, doc.get("repository") or {}, guests)


def check_private(path: Path) -> None:
    """Refuse a secrets file that others can read: it may hold passwords."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): run 'chmod 600 {path}'"
        )


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _secret(section: dict[str, Any], key: str, env: str, profile: Path | None) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    if section.get(key):
        return str(section[key])
    file = section.get(f"{key}_file")
    if file:
        p = Path(file).expanduser()
        if not p.is_absolute() and profile is not None:
            p = profile.parent / p
        try:
            check_private(p)
            return p.read_text().strip()
        except FileNotFoundError as err:
            raise UsageError(f"{key}_file {p} not found") from err
    return None
