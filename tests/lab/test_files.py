"""File-level restore in the lab: files extracted from a restore point are byte-identical to
the originals; listing works; paths that would leave the image are refused; nothing stays
mounted or attached afterwards."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from restore_helpers import backup, cli, cli_json, lab_repository

pytestmark = pytest.mark.lab

VM = "lab-vm1"
SETUP = """set -e
rm -rf /data/probe && mkdir -p /data/probe/sub
head -c 3000001 /dev/urandom > /data/probe/blob.bin
printf 'hello from the restore point\\n' > /data/probe/sub/note.txt
ln -s /probe/blob.bin /data/probe/abs-link
ln -s ../../../../../../../etc/passwd /data/probe/escape-link
sync
"""


@pytest.fixture(scope="module")
def point(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with lab_repository(lab, tmp_path_factory.mktemp("files") / "repository") as env:
        guest = lab.guests[VM]
        made = guest.run(["sh", "-c", SETUP])
        assert made.returncode == 0, made.stderr
        original = guest.run(["sha256sum", "/data/probe/blob.bin"]).stdout.split()[0]
        rp = backup(env, VM, app_aware="off")
        yield {"env": env, "rp": rp.restore_point, "blob_sha256": original}


def _loops_of_ours() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout


def test_extracted_file_is_byte_identical(point: dict[str, Any], tmp_path: Path) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], "/probe/blob.bin", "--to", str(tmp_path))
    assert done.returncode == 0, done.stderr
    got = hashlib.sha256((tmp_path / "blob.bin").read_bytes()).hexdigest()
    assert got == point["blob_sha256"]
    assert (tmp_path / "blob.bin").stat().st_size == 3000001
    assert "stillpoint-img-" not in _loops_of_ours()      # loop device detached


def test_directory_extract_and_absolute_link_inside_the_image(point: dict[str, Any],
                                                              tmp_path: Path) -> None:
    env = point["env"]
    done = cli(env, "files", "get", point["rp"], "/probe/sub", "--to", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "sub" / "note.txt").read_text() == "hello from the restore point\n"
    # An absolute link is resolved with the image's root as "/".
    done = cli(env, "files", "get", point["rp"], "/probe/abs-link", "--to", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    got = hashlib.sha256((tmp_path / "b" / "blob.bin").read_bytes()).hexdigest()
    assert got == point["blob_sha256"]


def test_ls_lists_entries(point: dict[str, Any]) -> None:
    env = point["env"]
    entries = {e["name"]: e for e in cli_json(env, "files", "ls", point["rp"], "/probe")}
    assert entries["blob.bin"]["kind"] == "file" and entries["blob.bin"]["size"] == 3000001
    assert entries["sub"]["kind"] == "dir"
    assert entries["abs-link"]["kind"] == "link"
    assert entries["abs-link"]["target"] == "/probe/blob.bin"


@pytest.mark.parametrize("path", ["/probe/../../etc/passwd", "/probe/escape-link"])
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
    done = cli(env, "files", "ls", point["rp"], "/no/such/dir")
    assert done.returncode == 3
    assert "no such file or directory" in done.stderr
