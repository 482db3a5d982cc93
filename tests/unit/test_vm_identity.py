"""The base restore point is the VM's own, and `list` tells namesakes apart (issue 13,
items 9 and 14)."""

from __future__ import annotations

from types import SimpleNamespace

from appliance.commands.backup import vm_labels
from appliance.jobs.backup import _latest_restore_point
from appliance.repository import MemoryBackend, Repository
from appliance.repository.restorepoint import VmRef

FAST_KDF = {"name": "argon2id", "iterations": 1, "lanes": 1, "memory_kib": 64}
VC = "vc-instance-1"


def point(repo: Repository, name: str, **ids: str) -> str:
    with repo.writer(name, **ids) as w:
        d = w.disk(2000, "Hard disk 1", 65536)
        d.write(0, b"x" * 65536)
        d.finish(change_id="c")
        return w.commit("crash", reasons=["test"]).id


def test_a_clone_sharing_the_bios_uuid_and_name_never_becomes_the_base() -> None:
    repo = Repository.init(MemoryBackend(), "pw", kdf=FAST_KDF, chunk_size=65536)
    source = point(repo, "db1", moref="vm-10", uuid="bios-1", instance_uuid="inst-10",
                   vcenter=VC)
    clone = point(repo, "db1", moref="vm-11", uuid="bios-1", instance_uuid="inst-11",
                  vcenter=VC)
    other_vc = point(repo, "db1", moref="vm-10", uuid="bios-1", instance_uuid="inst-10",
                     vcenter="vc-instance-2")

    def base(moref: str, inst: str, vc: str = VC) -> str | None:
        info = SimpleNamespace(moref=moref, instance_uuid=inst, uuid="bios-1", name="db1")
        found = _latest_restore_point(repo, info, vc)  # type: ignore[arg-type]
        return found.id if found else None

    assert base("vm-10", "inst-10") == source
    assert base("vm-11", "inst-11") == clone
    assert base("vm-10", "inst-10", "vc-instance-2") == other_vc
    assert base("vm-12", "inst-12") is None      # a new clone starts with a full


def test_a_point_from_before_instance_uuids_matches_by_moref_only() -> None:
    old = VmRef("db1", moref="vm-10", uuid="bios-1")
    assert old.is_vm(VC, "inst-10", "vm-10")
    assert not old.is_vm(VC, "inst-11", "vm-11")    # same BIOS uuid and name: not enough


def test_list_labels_tell_namesakes_apart() -> None:
    prod = VmRef("web", moref="vm-1", instance_uuid="i1", vcenter=VC, folder="DC0/vm/prod")
    test = VmRef("web", moref="vm-2", instance_uuid="i2", vcenter=VC, folder="DC0/vm/test")
    same_folder = VmRef("db", moref="vm-3", instance_uuid="i3", vcenter=VC, folder="DC0/vm")
    twin = VmRef("db", moref="vm-4", instance_uuid="i4", vcenter=VC, folder="DC0/vm")
    alone = VmRef("mail", moref="vm-5", instance_uuid="i5", vcenter=VC, folder="DC0/vm")
    labels = vm_labels([prod, test, same_folder, twin, alone, prod])
    assert labels[prod.chain_key()] == "web [DC0/vm/prod]"
    assert labels[test.chain_key()] == "web [DC0/vm/test]"
    assert labels[same_folder.chain_key()] == "db [vm-3]"
    assert labels[twin.chain_key()] == "db [vm-4]"
    assert labels[alone.chain_key()] == "mail"
