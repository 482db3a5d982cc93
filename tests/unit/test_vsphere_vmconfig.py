"""The VM configuration dump: JSON-able, and without secrets."""

from __future__ import annotations

import json

import pytest
from pyVmomi import vim

from appliance.vsphere.vmconfig import config_dump, is_secret_key, to_jsonable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "key",
    [
        "guestinfo.userdata",
        "guestinfo.stillpoint.restore",
        "sql.sa_password",
        "ad.passwd",
        "app.secret",
        "api.token",
        "svc.credential",
        "tls.private",
        "vpn.key",
        "db_key",
        "ssh.key",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "svga.present",
        "keyboard.typematicMinDelay",
        "disk.EnableUUID",
        "monitor.phys_bits_used",
        "ctkEnabled",
        "scsi0:0.ctkEnabled",
    ],
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_dump_is_json_and_filters_extra_config() -> None:
    disk = vim.vm.device.VirtualDisk(
        key=2000,
        controllerKey=1000,
        unitNumber=0,
        capacityInBytes=1 << 30,
        deviceInfo=vim.Description(label="Hard disk 1", summary="1 GB"),
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[ds] vm/vm.vmdk",
            diskMode="persistent",
            thinProvisioned=True,
            datastore=vim.Datastore("datastore-1"),
        ),
    )
    nic = vim.vm.device.VirtualVmxnet3(
        key=4000,
        macAddress="00:50:56:00:00:01",
        addressType="assigned",
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
    )
    hw = vim.vm.VirtualHardware(numCPU=2, numCoresPerSocket=1, memoryMB=2048, device=[disk, nic])
    props = {
        "name": "vm1",
        "config.guestId": "debian12_64Guest",
        "config.firmware": "efi",
        "config.hardware": hw,
        "config.extraConfig": [
            vim.option.OptionValue(key="svga.present", value="TRUE"),
            vim.option.OptionValue(key="guestinfo.userdata", value="pw"),
            vim.option.OptionValue(key="sql.sa_password", value="pw"),
        ],
    }
    dump = config_dump(None, props, [disk, nic])
    assert json.loads(json.dumps(dump)) == dump
    assert dump["extraConfig"] == {"svga.present": "TRUE"}
    assert (dump["numCPU"], dump["memoryMB"], dump["firmware"]) == (2, 2048, "efi")
    d, n = dump["devices"]
    assert d["_type"] == "vim.vm.device.VirtualDisk" and d["capacityInBytes"] == 1 << 30
    assert d["backing"]["fileName"] == "[ds] vm/vm.vmdk"
    assert d["backing"]["datastore"] == {"_moref": "datastore-1", "_type": "vim.Datastore"}
    assert n["macAddress"] == "00:50:56:00:00:01"
    assert n["backing"]["deviceName"] == "VM Network"


def test_to_jsonable_scalars() -> None:
    assert to_jsonable(b"\x00\x01") == "AAE="
    assert to_jsonable([1, "a", None]) == [1, "a", None]


# extraConfig of a real vCenter 8.0.3 VM (keys as pyVmomi's recorded fixtures show them):
# what is the source's identity or placement must not follow it into a new VM.
REAL_VM_EXTRA = {
    "viv.moid": "0b4a8c1e-...:vm-1001:abcd", "eam.agent.ovfPackageUrl": "https://eam/x.ovf",
    "eam.agent.agencyMoId": "agency-3", "sched.swap.derivedName":
    "/vmfs/volumes/5f1e-77/db1/db1-4f2a.vswp", "nvram": "db1.nvram", "migrate.hostLog":
    "db1-4f2a.hlog", "scsi0.sasWWID": "50 05 05 6b 1c 2a 3d 40", "pciBridge0.pciSlotNumber":
    "17", "featMask.vm.cpuid.AVX512F": "Val:1", "scsi0:0.ctkFileName": "db1-ctk.vmdk",
    "stillpoint.restoredFrom": "a1b2c3", "isolation.tools.copy.disable": "TRUE",
    "tools.syncTime": "FALSE", "numa.vcpu.maxPerVirtualNode": "4", "disk.EnableUUID": "TRUE",
    "vcpu.hotadd": "TRUE", "sched.cpu.latencySensitivity": "normal",
}


def test_a_new_vm_takes_only_configuration_from_extra_config() -> None:
    from appliance.vsphere.vmconfig import restorable_extra_config

    kept, left = restorable_extra_config(REAL_VM_EXTRA)
    assert sorted(kept) == ["disk.EnableUUID", "isolation.tools.copy.disable",
                            "numa.vcpu.maxPerVirtualNode", "sched.cpu.latencySensitivity",
                            "tools.syncTime", "vcpu.hotadd"]
    assert set(left) == set(REAL_VM_EXTRA) - set(kept)


SAVED = {"name": "db1", "guestId": "debian12_64Guest", "uuid": "4210aaaa-bios",
         "instanceUuid": "5010bbbb-inst", "numCPU": 2, "memoryMB": 2048,
         "extraConfig": REAL_VM_EXTRA,
         "devices": [{"_type": "vim.vm.device.VirtualE1000", "key": 4000,
                      "macAddress": "00:50:56:01:02:03",
                      "backing": {"deviceName": "VM Network"}}]}


@pytest.mark.parametrize("keep", [False, True])
def test_identity_is_new_unless_kept(keep: bool) -> None:
    from appliance.vsphere.restore_vm import build_config_spec

    spec, _ = build_config_spec(SAVED, name="db1-copy", datastore="ds1", keep_identity=keep,
                                extra_config={"stillpoint.restoredFrom": "rp-2"})
    [nic] = [c.device for c in spec.deviceChange]
    extra = {o.key: o.value for o in spec.extraConfig}
    assert extra["stillpoint.restoredFrom"] == "rp-2"        # this restore's mark, not the old
    assert "viv.moid" not in extra and "sched.swap.derivedName" not in extra
    if keep:
        assert (spec.uuid, spec.instanceUuid) == ("4210aaaa-bios", "5010bbbb-inst")
        assert (nic.addressType, nic.macAddress) == ("manual", "00:50:56:01:02:03")
    else:
        assert spec.uuid is None and spec.instanceUuid is None
        assert nic.addressType == "generated" and not nic.macAddress
