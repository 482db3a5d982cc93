"""Where the vCenter user name and password come from: a 0600 profile, env, or a prompt.

Never from argv (visible in `ps`). Order: the profile file when one is given, then
STILLPOINT_VC_USER / STILLPOINT_VC_PASSWORD, then the prompt callback (for what is still
missing). A profile readable by group or others is refused, not silently used.

Profile format (JSON): {"user": "...", "password": "..."}, or the same keys under
"vcenter" (so the lab profile, which also names host and thumbprint, works as is).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UsageError

__all__ = ["ENV_PASSWORD", "ENV_USER", "Credentials", "Prompt", "load_credentials"]

ENV_USER = "STILLPOINT_VC_USER"
ENV_PASSWORD = "STILLPOINT_VC_PASSWORD"

# prompt(label, secret) -> answer; secret=True means "do not echo"
Prompt = Callable[[str, bool], str]


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def _read_profile(path: Path) -> dict[str, str]:
    try:
        st = path.stat()
    except OSError as err:
        raise UsageError(f"cannot read credentials profile {path}: {err.strerror}") from err
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UsageError(
            f"credentials profile {path} has mode {stat.S_IMODE(st.st_mode):04o}; it holds a "
            f"password, so it must be readable by its owner only: chmod 600 {path}"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"credentials profile {path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise UsageError(f"credentials profile {path} must hold a JSON object")
    section = doc.get("vcenter", doc)
    if not isinstance(section, dict):
        raise UsageError(f"credentials profile {path}: 'vcenter' must be an object")
    return {k: str(section[k]) for k in ("user", "password") if section.get(k)}


def load_credentials(
    profile_path: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    prompt: Prompt | None,
) -> Credentials:
    """Credentials from the profile, then env, then the prompt; UsageError if incomplete."""
    found: dict[str, str] = {}
    if profile_path is not None:
        found.update(_read_profile(Path(profile_path)))
    if not found.get("user") and env.get(ENV_USER):
        found["user"] = env[ENV_USER]
    if not found.get("password") and env.get(ENV_PASSWORD):
        found["password"] = env[ENV_PASSWORD]
    if prompt is not None:
        if not found.get("user"):
            found["user"] = prompt("vCenter user", False)
        if not found.get("password"):
            found["password"] = prompt(f"vCenter password for {found['user']}", True)
    if not found.get("user") or not found.get("password"):
        raise UsageError(
            f"no vCenter credentials: give a 0600 profile file, or set {ENV_USER} and "
            f"{ENV_PASSWORD}, or run interactively"
        )
    return Credentials(found["user"], found["password"])
