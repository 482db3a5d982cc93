"""The lab file (stillpoint_lab/lab_file.py): what it builds, and one clear line for each
mistake a user makes in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import UsageError
from stillpoint_lab.config import DiskSpec
from stillpoint_lab.lab_file import load_lab_file, parse_size


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "lab.toml"
    path.write_text(text, encoding="utf-8")
    return load_lab_file(path, 4)


def test_sizes_in_bytes_and_units() -> None:
    assert parse_size(1049088, "d") == 1049088
    assert parse_size("512 MiB", "d") == 512 << 20
    assert parse_size("4G", "d") == 4 << 30
    assert parse_size(" 1 kib ", "d") == 1024


@pytest.mark.parametrize("value, says", [
    (1000, "whole 512-byte sectors"), (0, "positive"), ("1.5 GiB", "not a size"),
    ("12 parsecs", "not a size"), (True, "number of bytes"), ([1], "not a size")])
def test_bad_sizes(value: object, says: str) -> None:
    with pytest.raises(UsageError, match=says):
        parse_size(value, "disk")


def test_a_lab_with_folders_unicode_names_and_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[[vm]]\nname = "Datenbank Müller 1"\nfolder = "/prod/db/"\n'
                          'disks = ["8 GiB", 1049088]\n\n'
                          '[[vm]]\nname = "raw one"\nguest = false\n')
    db, raw = cfg.vms  # type: ignore[attr-defined]
    assert cfg.lab_id == 4  # type: ignore[attr-defined]
    assert (db.name, db.folder, db.has_guest) == ("Datenbank Müller 1", "prod/db", True)
    assert db.disks == (DiskSpec(8 << 30), DiskSpec(1049088))
    assert db.apps == ("postgresql", "mariadb")
    assert (raw.has_guest, raw.apps, raw.folder, raw.disks) == (False, (), "", (DiskSpec.mib(64),))


@pytest.mark.parametrize("text, says", [
    ("", "no \\[\\[vm\\]\\] table"),
    ("[[vm]]\nfolder = 'x'\n", "needs a name"),
    ("[[vm]]\nname = 'a'\ncolour = 'red'\n", "unknown key\\(s\\) colour"),
    ("[[vm]]\nname = 'a/b'\n", "/ in a VM name is not supported"),
    ("[[vm]]\nname = ' a'\n", "leading or trailing spaces"),
    ("[[vm]]\nname = '" + "x" * 81 + "'\n", "at most 80"),
    ("[[vm]]\nname = 'a'\n[[vm]]\nname = 'a'\nguest = false\n", "used twice: a"),
    ("[[vm]]\nname = 'a'\nguest = false\napps = ['mariadb']\n", "apps need a guest"),
    ("[[vm]]\nname = 'a'\napps = ['oracle']\n", "apps must be a list"),
    ("[[vm]]\nname = 'a'\ndisks = []\n", "non-empty list"),
    ("[[vm]]\nname = 'a'\nmemory_mib = 10\n", "memory_mib must be an integer from 256"),
    ("[[vm]]\nname = 'a'\nfolder = 'prod//db'\n", "empty or unprintable part"),
    ("[vms]\n", "unknown table\\(s\\) vms"),
    ("[[vm]\n", "not valid TOML"),
    ("".join(f"[[vm]]\nname = 'g{i}'\n" for i in range(9)), "at most 8"),
])
def test_mistakes_are_one_clear_line(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(UsageError, match=says) as err:
        _load(tmp_path, text)
    assert str(tmp_path / "lab.toml") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        load_lab_file(tmp_path / "nope.toml", 0)
