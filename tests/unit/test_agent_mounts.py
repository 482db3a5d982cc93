"""Which file systems the agent freezes, in which order (pure parsing, no freezing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent_payload" / "linux"))
from stillpoint_agent import mounts

# The lab's shape: / is the host's disk; /data is the VM's disk with bind mounts of it;
# /data/pg is a nested file system; /mnt/my\040disk has a space in its name.
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 7:0 / /data rw,relatime - ext4 /dev/loop0 rw
41 27 7:0 /opt /opt/stillpoint rw,relatime - ext4 /dev/loop0 rw
42 27 7:0 /etc/stillpoint /etc/stillpoint rw,relatime - ext4 /dev/loop0 rw
43 40 7:1 / /data/pg rw,relatime - ext4 /dev/loop1 rw
44 27 7:2 / /mnt/my\\040disk rw,relatime - xfs /dev/loop2 rw
45 27 7:3 / /ro ro,relatime - ext4 /dev/loop3 ro
46 27 0:30 / /tmp rw - tmpfs tmpfs rw
"""


@pytest.fixture
def parsed() -> list:
    return mounts.parse_mountinfo(MOUNTINFO)


def test_parse_unescapes_and_reads_fields(parsed: list) -> None:
    by_point = {m.mount_point: m for m in parsed}
    assert "/mnt/my disk" in by_point
    assert by_point["/opt/stillpoint"].dev == "7:0" and by_point["/opt/stillpoint"].root == "/opt"
    assert by_point["/ro"].writable is False and by_point["/data"].writable is True
    assert by_point["/tmp"].block_backed is False and by_point["/data"].block_backed is True


def test_explicit_include_dedupes_bind_mounts_and_orders_deepest_first(parsed: list) -> None:
    chosen, skipped, errors = mounts.plan(
        parsed, ["/data", "/opt/stillpoint", "/etc/stillpoint", "/data/pg"], [], False)
    assert errors == [] and skipped == []
    assert [(m.mount_point, a) for m, a in chosen] == [
        ("/data/pg", []), ("/data", ["/opt/stillpoint", "/etc/stillpoint"])]


def test_root_is_never_chosen_without_allow_root(parsed: list) -> None:
    chosen, skipped, _ = mounts.plan(parsed, ["/", "/data"], [], False)
    assert [m.mount_point for m, _ in chosen] == ["/data"]
    assert skipped[0]["mount_point"] == "/" and "allow_root" in skipped[0]["reason"]
    chosen, _, _ = mounts.plan(parsed, None, [], False)    # discovery: same guard
    assert "/" not in [m.mount_point for m, _ in chosen]


def test_discovery_takes_writable_block_file_systems(parsed: list) -> None:
    chosen, skipped, _ = mounts.plan(parsed, None, ["/mnt/my disk"], False)
    assert [m.mount_point for m, _ in chosen] == ["/data/pg", "/data"]
    reasons = {s["mount_point"]: s["reason"] for s in skipped}
    assert reasons["/ro"] == "read-only" and reasons["/mnt/my disk"] == "excluded by config"


def test_included_path_that_is_not_a_mount_is_an_error(parsed: list) -> None:
    _, _, errors = mounts.plan(parsed, ["/data/pg/base"], [], False)
    assert errors == ["/data/pg/base is not a mount point"]


def test_overmounted_point_uses_the_visible_mount() -> None:
    text = MOUNTINFO + "50 27 7:9 / /data rw - ext4 /dev/loop9 rw\n"
    chosen, _, _ = mounts.plan(mounts.parse_mountinfo(text), ["/data"], [], False)
    assert [m.dev for m, _ in chosen] == ["7:9"]
