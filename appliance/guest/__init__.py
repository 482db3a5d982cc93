"""Guest access and the on-demand agent's lifecycle.

Abstractions:
- `GuestChannel` (channel.py): put a file, run a command, open a long-lived process whose
  stdin/stdout carry the agent's JSON lines. `SSHChannel` (ssh.py, paramiko, host key pinned)
  and `LocalChannel` (local.py, this machine: tests and namespace guests) implement it.
- `AgentClient` (client.py): one typed method per protocol operation (docs/protocol.md);
  agent errors become `AgentFailed` (a GuestError naming the writer).
- `deploy_agent` / `remove_agent` / `AgentSession` (deploy.py): upload the payload and
  its manifest, install the boot hook, start the agent; always uninstall afterwards.
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

__all__ = [
                                    "DEFAULT_INSTALL_DIR",
                                    "AgentClient",
                                    "AgentFailed",
                                    "AgentSession",
                                    "AgentStream",
                                    "GuestChannel",
                                    "RunResult",
                                    "deploy_agent",
                                    "payload_files",
                                    "remove_agent",
]
