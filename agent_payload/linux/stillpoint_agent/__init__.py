"""Stillpoint's on-demand Linux guest agent (Python 3.6+ standard library only).

The appliance pushes this package into a VM, verifies it against MANIFEST.sha256 (the
`stillpoint-agent` shell bootstrap does that before running any of it) and talks to it in
JSON lines over stdin/stdout (docs/protocol.md). It never imports the appliance: the two
share a versioned protocol, not code.

Abstractions: a `Writer` (writers/) is one thing that must be made consistent
(a file system, a PostgreSQL cluster, a MariaDB server, the hook scripts); a
`BackupSession` (session.py) drives all writers through prepare/freeze/thaw/complete with a
watchdog; `server.py` is the protocol loop; `lifecycle.py` installs/removes the boot hook;
`restore.py` is the post-restore procedure run at boot.
"""

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSIONS = (1,)
