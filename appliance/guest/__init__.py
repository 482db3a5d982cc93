"""Guest access and the on-demand agent's lifecycle.

Abstractions:
- `GuestChannel` (channel.py): put a file, run a command, open a long-lived process whose
  stdin/stdout carry the agent's JSON lines. `SSHChannel` (ssh.py, paramiko, host key pinned)
  and `LocalChannel` (local.py, this machine: tests and namespace guests) implement it.
- `AgentClient` (client.py): one typed method per protocol operation (docs/protocol.md);
  agent errors become `AgentFailed` (a GuestError naming the writer).
- `deploy_agent` / `remove_agent` / `AgentSession` (deploy.py): upload the payload and
  its manifest, install the boot hook, start the agent; always uninstall afterwards.
- `build_restore_marker` / `read_restore_result` (restore_marker.py): what the appliance
  puts in guestinfo for the agent's boot-time restore, and reads back afterwards.
"""

from appliance.guest.channel import AgentStream, GuestChannel, RunResult
from appliance.guest.client import AgentClient, AgentFailed
from appliance.guest.deploy import (
    DEFAULT_INSTALL_DIR,
    AgentSession,
    deploy_agent,
    payload_files,
    remove_agent,
)
from appliance.guest.restore_marker import (
    GUESTINFO_KEY,
    build_restore_marker,
    read_restore_result,
)

__all__ = [
    "DEFAULT_INSTALL_DIR",
    "GUESTINFO_KEY",
    "AgentClient",
    "AgentFailed",
    "AgentSession",
    "AgentStream",
    "GuestChannel",
    "RunResult",
    "build_restore_marker",
    "deploy_agent",
    "payload_files",
    "read_restore_result",
    "remove_agent",
]
