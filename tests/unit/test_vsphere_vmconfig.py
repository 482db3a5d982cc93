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
