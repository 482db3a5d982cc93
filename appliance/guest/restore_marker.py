"""The restore marker the appliance sets in guestinfo.stillpoint.restore, and the result
the agent leaves in the restored guest (docs/protocol.md "Restore at boot").

The marker carries, per writer, the thaw result stored with the restore point (for
PostgreSQL: backup_label, tablespace_map, stop_wal_file, archive_dir) plus optional
point-in-time settings. Writers without a post-restore procedure (file systems, hooks)
are left out.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.errors import GuestError, UsageError
from appliance.guest.channel import GuestChannel

GUESTINFO_KEY = "guestinfo.stillpoint.restore"
DEFAULT_RESULT_PATH = "/var/log/stillpoint-restore.json"
RESTORABLE_KINDS = ("postgresql", "mariadb")
# guestinfo values travel through the VMX file; keep the marker small (large entries can
# go into <install_dir>/restore/marker.json in the image instead).
MAX_MARKER_BYTES = 60 * 1024


def build_restore_marker(restore_point: str, writer_results: dict[str, dict[str, Any]],
                         pitr: dict[str, dict[str, Any]] | None = None) -> str:
    """JSON for guestinfo.stillpoint.restore.

    writer_results: the thaw/status `results` stored with the restore point.
    pitr: {writer name: {"target_time"/"archive_dir"} (PostgreSQL) or
    {"stop_datetime", "binlog_dir"} (MariaDB)}.
    """
    writers: dict[str, dict[str, Any]] = {}
    for name, result in writer_results.items():
        if result.get("kind") in RESTORABLE_KINDS:
            writers[name] = dict(result)
    for name, settings in (pitr or {}).items():
        if name not in writers:
            raise UsageError(f"point-in-time settings for {name}, which has no restore entry")
        writers[name]["pitr"] = dict(settings)
    text = json.dumps({"restore_point": restore_point, "writers": writers},
                      sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_MARKER_BYTES:
        raise UsageError(f"restore marker is {len(text)} bytes, over {MAX_MARKER_BYTES}; "
                         "write the entries into the image's restore/marker.json instead")
    return text


def read_restore_result(channel: GuestChannel,
                        path: str = DEFAULT_RESULT_PATH) -> dict[str, Any] | None:
    """The agent's post-restore result from a booted restored guest; None if not there."""
    if not channel.run(["test", "-f", path]).ok:
        return None
    res = channel.run(["cat", path])
    if not res.ok:
        raise GuestError(f"cannot read {path}: {res.text()}")
    try:
        result: dict[str, Any] = json.loads(res.stdout)
    except ValueError as err:
        raise GuestError(f"{path} is not JSON") from err
    return result
