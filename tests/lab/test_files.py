"""File-level restore in the lab: files extracted from a restore point are byte-identical to
the originals; paths are the guest's own (lab-vm1 is a Debian VM: disk 0 has a partition
table with the root file system, disk 1 is the file system the guest's /etc/fstab mounts on
/data), and --disk gives a disk's file system directly; listing works; paths that would
leave the image are refused; nothing stays mounted or attached afterwards."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from restore_helpers import backup, cli, cli_json, lab_repository

# The first test also pays for the lab (session fixture): boots under TCG are slow.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

VM = "lab-vm1"
SETUP = """set -e
rm -rf /data/probe && mkdir -p /data/probe/sub
head -c 3000001 /dev/urandom > /data/probe/blob.bin
printf 'hello from the restore point\\n' > /data/probe/sub/note.txt
ln -s /data/probe/blob.bin /data/probe/abs-link
ln -s ../../../../../../../etc/passwd /data/probe/escape-link
printf 'on the root file system\\n' > /root/probe-root.txt
sync
"""


@pytest.fixture(scope="module")
def point(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_repository(lab, tmp_path_factory.mktemp("files") / "repository") as env:
        guest = lab.guests[VM]
        mounted = guest.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "/data"])
        assert mounted.returncode == 0 and "ext4" in mounted.stdout, mounted
        made = guest.run(["sh", "-c", SETUP])
        assert made.returncode == 0, made.stderr
        original = guest.run(["sha256sum", "/data/probe/blob.bin"]).stdout.split()[0]
        rp = backup(env, VM, app_aware="off")
        yield {"env": env, "rp": rp.restore_point, "blob_sha256": original}


def _loops_of_ours() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout


def test_extracted_file_is_byte_identical(point: dict[str, Any], tmp_path: Path) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], "/data/probe/blob.bin", "--to", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "/data = disk 1 (LABEL=spdata)" in done.stderr, done.stderr   # from its fstab
    got = hashlib.sha256((tmp_path / "blob.bin").read_bytes()).hexdigest()
    assert got == point["blob_sha256"]
    assert (tmp_path / "blob.bin").stat().st_size == 3000001
    assert "stillpoint-img-" not in _loops_of_ours()      # loop device detached
    assert "stillpoint-mnt-" not in Path("/proc/self/mountinfo").read_text()


def test_root_file_system_is_found_in_its_partition(point: dict[str, Any],
                                                    tmp_path: Path) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], "/root/probe-root.txt", "--to", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "probe-root.txt").read_text() == "on the root file system\n"
    entries = {e["name"] for e in cli_json(env, "files", "ls", point["rp"], "/etc")}
    assert {"fstab", "hostname", "machine-id", "os-release"} <= entries


def test_a_disk_can_be_browsed_directly(point: dict[str, Any]) -> None:
    env = point["env"]
    entries = {e["name"]: e for e in cli_json(env, "files", "ls", point["rp"], "/probe",
                                              "--disk", "1")}
    assert entries["blob.bin"]["size"] == 3000001
    root = {e["name"] for e in cli_json(env, "files", "ls", point["rp"], "/", "--disk", "0",
                                        "--partition", "1")}
    assert {"etc", "usr", "var", "data"} <= root


def test_directory_extract_and_absolute_link_inside_the_image(point: dict[str, Any],
                                                              tmp_path: Path) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], "/data/probe/sub", "--to",
               str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "sub" / "note.txt").read_text() == "hello from the restore point\n"
    # An absolute link is resolved with the guest's root as "/" (across its /data mount).
    done = cli(env, "files", "get", point["rp"], "/data/probe/abs-link", "--to",
               str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    got = hashlib.sha256((tmp_path / "b" / "blob.bin").read_bytes()).hexdigest()
    assert got == point["blob_sha256"]


def test_ls_lists_entries(point: dict[str, Any]) -> None:
    env = point["env"]
    entries = {e["name"]: e for e in cli_json(env, "files", "ls", point["rp"], "/data/probe")}
    assert entries["blob.bin"]["kind"] == "file" and entries["blob.bin"]["size"] == 3000001
    assert entries["sub"]["kind"] == "dir"
    assert entries["abs-link"]["kind"] == "link"
    assert entries["abs-link"]["target"] == "/data/probe/blob.bin"


@pytest.mark.parametrize("path", ["/data/probe/../../etc/passwd", "/data/probe/escape-link"])
def test_paths_that_leave_the_image_are_refused(point: dict[str, Any], tmp_path: Path,
                                                path: str) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], path, "--to", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "outside the image" in done.stderr or "'..' is not allowed" in done.stderr
    assert not list(tmp_path.iterdir())
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "stillpoint-mnt-" not in mounts                  # always unmounted


def test_missing_path_is_not_found(point: dict[str, Any]) -> None:
    env = point["env"]
    done = cli(env, "files", "ls", point["rp"], "/data/no/such/dir")
    assert done.returncode == 3
    assert "no such file or directory" in done.stderr
