"""Put the Windows agent into a guest over WinRM, start it, and always take it out again.

The Windows counterpart of deploy.py (whose commands are POSIX): the install directory is
on the system disk (so the agent is inside the image and present at restore time) and only
SYSTEM and Administrators may touch it; every payload file is pushed with a sha256 check in
the guest, then the agent verifies the whole payload against MANIFEST.sha256 itself
(`-Mode verify`) before anything of it runs. The agent then speaks the same JSON-lines
protocol as on Linux (AgentClient), in a process that lives in the channel's one WinRM
shell for the whole backup.

Small PowerShell snippets that run before the agent exists carry a first-line tag
(`# stillpoint:<what>`) so that a test endpoint can recognise them.
"""

from __future__ import annotations

import json
import logging
import ntpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import GuestError
from appliance.guest.client import AgentClient
from appliance.guest.deploy import MANIFEST, payload_files
from appliance.guest.session import RemovedOnExit, check, removed_on_failure, start_agent
from appliance.guest.winrm_channel import POWERSHELL, PS_ARGS, WinRMChannel
from appliance.guest.winrm_push import ps_quote

log = logging.getLogger(__name__)

PAYLOAD_DIR = Path(__file__).resolve().parents[2] / "agent_payload" / "windows"
DEFAULT_INSTALL_DIR = r"C:\ProgramData\Stillpoint\agent"
AGENT_SCRIPT = "stillpoint-agent.ps1"
BOOT_TASK = r"\Stillpoint\RestoreOnBoot"


def agent_argv(install_dir: str, mode: str) -> list[str]:
    return [POWERSHELL, *PS_ARGS, "-File", ntpath.join(install_dir, AGENT_SCRIPT),
            "-Mode", mode]


def prepare_dir_script(install_dir: str) -> str:
    return f"""# stillpoint:prepare-dir
$ErrorActionPreference = 'Stop'
$dir = {ps_quote(install_dir)}
if ([System.IO.Path]::GetPathRoot($dir).TrimEnd('\\') -ne $env:SystemDrive) {{
    [Console]::Error.WriteLine("$dir is not on the system disk $env:SystemDrive")
    exit 2
}}
New-Item -ItemType Directory -Force -Path (Join-Path $dir 'lib') | Out-Null
& icacls.exe $dir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
exit $LASTEXITCODE
"""


def remove_script(install_dir: str) -> str:
    """Last resort when the agent cannot uninstall itself: task and directory."""
    return f"""# stillpoint:remove
$dir = {ps_quote(install_dir)}
& schtasks.exe /Delete /F /TN {ps_quote(BOOT_TASK)} 2>&1 | Out-Null
if (Test-Path -LiteralPath $dir) {{ Remove-Item -LiteralPath $dir -Recurse -Force }}
exit 0
"""


def leftovers_script(install_dir: str) -> str:
    return f"""# stillpoint:leftovers
$dir = {ps_quote(install_dir)}
$left = @()
if (Test-Path -LiteralPath $dir) {{ $left += $dir }}
& schtasks.exe /Query /TN {ps_quote(BOOT_TASK)} 2>&1 | Out-Null
if ($LASTEXITCODE -eq 0) {{ $left += {ps_quote(BOOT_TASK)} }}
[Console]::Out.WriteLine((ConvertTo-Json -InputObject @($left) -Compress))
exit 0
"""


@dataclass
class WindowsAgentSession(RemovedOnExit):
    """A deployed, running Windows agent; leaving the context always uninstalls."""

    channel: WinRMChannel
    install_dir: str
    client: AgentClient
    hello: dict[str, Any]
    removed: bool = field(default=False)

    def _uninstall(self) -> None:
        remove_windows_agent(self.channel, self.install_dir, client=self.client)


def deploy_windows_agent(channel: WinRMChannel, install_dir: str = DEFAULT_INSTALL_DIR,
                         config: dict[str, Any] | None = None, *, boot_hook: bool = True,
                         payload_dir: Path = PAYLOAD_DIR) -> WindowsAgentSession:
    if not ntpath.isabs(install_dir) or install_dir.rstrip("\\").count("\\") < 2:
        raise GuestError(f"install directory {install_dir!r} must be an absolute Windows path "
                         "at least two levels deep")
    entries = payload_files(payload_dir)
    check(channel.run_powershell(prepare_dir_script(install_dir)),
          "creating the agent directory")
    with removed_on_failure(lambda: remove_windows_agent(channel, install_dir)):
        for _, rel in entries:
            channel.put_file(payload_dir / rel, ntpath.join(install_dir, *rel.split("/")))
        channel.put_file(payload_dir / MANIFEST, ntpath.join(install_dir, MANIFEST))
        channel.put_file(json.dumps(config or {}).encode(),
                         ntpath.join(install_dir, "config.json"))
        # The agent checks every file against the manifest before it loads any of them.
        verify = channel.run(agent_argv(install_dir, "verify"), timeout=120)
        check(verify, "verifying the agent payload in the guest")
        client, hello = start_agent(
            channel.open_process(agent_argv(install_dir, "serve")),
            then=(lambda c: c.install_boot_hook()) if boot_hook else None)
    return WindowsAgentSession(channel, install_dir, client, hello)


def remaining(channel: WinRMChannel, install_dir: str) -> list[str]:
    res = channel.run_powershell(leftovers_script(install_dir))
    check(res, "checking for agent leftovers")
    left = json.loads(res.stdout.decode("utf-8").strip() or "[]")
    return [left] if isinstance(left, str) else list(left)


def remove_windows_agent(channel: WinRMChannel, install_dir: str = DEFAULT_INSTALL_DIR, *,
                         client: AgentClient | None = None) -> None:
    """Uninstall from the live guest by the best way still available; verify it is gone."""
    if client is not None and not client.closed:
        try:
            client.uninstall()
        except GuestError as err:
            log.warning("agent uninstall over the session failed: %s", err)
            client.close()
    if remaining(channel, install_dir):
        channel.run_powershell(remove_script(install_dir))
    left = remaining(channel, install_dir)
    if left:
        raise GuestError(f"could not remove the agent from the guest: {left} remain")
