"""VM names as vCenter stores them (appliance/vsphere/names.py)."""

from __future__ import annotations

import pytest

from appliance.vsphere.names import datastore_folder, display_name, escape_name


@pytest.mark.parametrize("shown, stored", [
    ("web/db copy", "web%2fdb copy"), ("a\\b", "a%5cb"), ("50% off", "50%25 off"),
    ("Müller – 2", "Müller – 2"), ("100%", "100%25")])
def test_escape_and_display_round_trip(shown: str, stored: str) -> None:
    assert escape_name(shown) == stored
    assert display_name(stored) == shown
    assert escape_name(stored) == stored        # idempotent, as vCenter is


def test_an_escape_sequence_is_kept_and_shown_decoded() -> None:
    assert escape_name("x%2Fy") == "x%2Fy"
    assert display_name("x%2Fy") == "x/y"
    assert display_name("%252f") == "%2f"       # decoded once, left to right


@pytest.mark.parametrize("name, folder", [
    ("web/db copy", "web_db copy"), ("web%2fdb copy", "web_db copy"), ("a[1]: b?", "a_1__ b_"),
    ("Datenbank Müller", "Datenbank Müller"), ("..", "vm"), (" x ", "x")])
def test_datastore_folder(name: str, folder: str) -> None:
    assert datastore_folder(name) == folder
