"""CBT: the invariant checks of changed_areas() and changeId parsing.

The pages come from a scripted stand-in for the VM's QueryChangedDiskAreas (real
pyVmomi DiskChangeInfo objects, and a real vim.fault.FileFault), so that each invariant
can be broken on purpose; tests/lab/test_vsphere_layer.py runs the same code on the lab
simulator.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyVmomi import vim, vmodl

from appliance.errors import UsageError, VSphereError
from appliance.vsphere.cbt import (
    CBTResetError,
    ChangeId,
    changed_areas,
    check_page,
    parse_change_id,
    same_epoch,
)
from appliance.vsphere.snapshots import SnapshotRef

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
REAL_ID = "52 a6 c2 7d 83 e0 c1 30-af 87 56 5b 7c 07 82 75/12"


class ScriptedVM:
    """Answers QueryChangedDiskAreas from a list of (startOffset, length, areas)."""

    _moId = "vm-1"

    def __init__(self, pages: list[Any]) -> None:
        self.pages = list(pages)
        self.asked: list[int] = []

    def QueryChangedDiskAreas(
        self, snapshot: Any, deviceKey: int, startOffset: int, changeId: str
    ) -> Any:
        self.asked.append(startOffset)
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        start, length, areas = page
        return vim.DiskChangeInfo(
            startOffset=start,
            length=length,
            changedArea=[vim.DiskChangeInfo.DiskChangeExtent(start=s, length=n) for s, n in areas],
        )


SNAP = SnapshotRef("snapshot-1", "stillpoint-x", "vm-1", None, None)


def run(pages: list[Any], capacity: int = 4 * MiB) -> tuple[list[tuple[int, int]], ScriptedVM]:
    vm = ScriptedVM(pages)
    return changed_areas(None, vm, SNAP, 2000, capacity, "*"), vm  # type: ignore[arg-type]


def test_pages_are_followed_and_adjacent_areas_merged() -> None:
    areas, vm = run(
        [
            (0, 2 * MiB, [(0, 65536), (MiB, 2 * MiB - MiB)]),
            (2 * MiB, 2 * MiB, [(2 * MiB, 65536), (3 * MiB, 131072)]),
        ]
    )
    assert vm.asked == [0, 2 * MiB]
    assert areas == [(0, 65536), (MiB, MiB + 65536), (3 * MiB, 131072)]


def test_no_changes_is_an_empty_list() -> None:
    assert run([(0, 4 * MiB, [])])[0] == []


@pytest.mark.parametrize(
    "pages, message",
    [
        ([(4096, 4 * MiB - 4096, [])], "asked for startOffset 0, got 4096"),
        ([(0, 0, [])], "has length 0"),
        ([(0, 5 * MiB, [])], "runs past the capacity"),
        ([(0, MiB, [(MiB - 512, 1024)])], "outside its page"),
        ([(0, 4 * MiB, [(MiB, 512), (0, 512)])], "unsorted or overlaps"),
        ([(0, 4 * MiB, [(0, 1024), (512, 512)])], "unsorted or overlaps"),
        ([(0, 4 * MiB, [(0, 0)])], "area at 0 has length 0"),
        ([(0, MiB, []), (2 * MiB, 2 * MiB, [])], "asked for startOffset 1048576"),
    ],
)
def test_invariant_violations(pages: list[Any], message: str) -> None:
    with pytest.raises(VSphereError, match=f"CBT invariant violated for disk 2000: .*{message}"):
        run(pages)


def test_file_fault_is_a_cbt_reset() -> None:
    with pytest.raises(CBTResetError, match="full backup is needed"):
        run([vim.fault.FileFault(file="unknown changeId", msg="unknown changeId")])
    assert issubclass(CBTResetError, VSphereError)


def test_other_faults_are_vsphere_errors_not_resets() -> None:
    with pytest.raises(VSphereError, match="InvalidArgument") as info:
        run([vmodl.fault.InvalidArgument(invalidProperty="startOffset", msg="out of range")])
    assert not isinstance(info.value, CBTResetError)


def test_check_page_accepts_a_good_page() -> None:
    check_page(MiB, MiB, MiB, [(MiB, 512), (MiB + 1024, 512)], 4 * MiB, 1)


def test_zero_capacity_is_refused() -> None:
    with pytest.raises(UsageError):
        run([], capacity=0)


def test_parse_change_id() -> None:
    cid = parse_change_id(REAL_ID)
    assert cid == ChangeId("52 a6 c2 7d 83 e0 c1 30-af 87 56 5b 7c 07 82 75", 12)
    assert str(cid) == REAL_ID
    assert parse_change_id("ABC/0") == ChangeId("abc", 0)
    for bad in ("", "*", "abc", "/5", "abc/", "abc/x", "abc/-1"):
        with pytest.raises(UsageError):
            parse_change_id(bad)


def test_same_epoch() -> None:
    other = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/13"
    assert same_epoch(REAL_ID, REAL_ID.replace("/12", "/40"))
    assert not same_epoch(REAL_ID, other)  # CBT was reset: a full is needed
    assert not same_epoch(REAL_ID, REAL_ID.replace("/12", "/3"))  # went backwards
