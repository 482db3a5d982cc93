"""NbdkitReader specifics: nbdkit argv (no secrets), the offset filter, profile parsing.

The reading contract itself is in test_transport_contract.py ("nbdkit-file").
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.errors import TransportError, UsageError
from appliance.transport.nbdkit import (
    NbdkitConfig,
    NbdkitReader,
    VddkTarget,
    file_args,
    nbd_reader_from_profile,
    vddk_args,
)
from appliance.transport import nbdkit as nbdkit_module
from appliance.vsphere import tls as tls_module
from appliance.datastore import SnapshotDisk

pytestmark = pytest.mark.unit

TP = "ab" * 32
SHA1 = ":".join(["AB"] * 20)


def disk(capacity: int = 8192, name: str = "vm1/vm1-000001.vmdk") -> SnapshotDisk:
    return SnapshotDisk(
        2000,
        "Hard disk 1",
        capacity,
        f"[ds1] {name}",
        None,
        "ds1",
        "DC0",
        vm_moref="vm-42",
        snapshot_moref="snapshot-7",
    )


def test_vddk_argv_names_the_snapshot_disk_and_holds_no_secret(tmp_path: Path) -> None:
    cfg = NbdkitConfig(mode="vddk", vddk_libdir="/opt/vddk")
    args = vddk_args(
        cfg,
        VddkTarget("vc.example", 443, "backup@vsphere.local", SHA1),
        disk(),
        tmp_path / "password",
    )
    assert args[0] == "vddk"
    assert f"password=+{tmp_path / 'password'}" in args
    assert "vm=moref=vm-42" in args and "snapshot=snapshot-7" in args
    assert "file=[ds1] vm1/vm1-000001.vmdk" in args
    assert f"thumbprint={SHA1}" in args
    assert "transports=nbdssl:nbd" in args


def test_vddk_needs_libdir_and_morefs(tmp_path: Path) -> None:
    target = VddkTarget("vc", 443, "u", None)
    with pytest.raises(UsageError, match="vddk_libdir"):
        vddk_args(NbdkitConfig(mode="vddk"), target, disk(), tmp_path / "p")
    bare = SnapshotDisk(1, "d", 512, "[ds1] a.vmdk", None, "ds1", "DC0")
    with pytest.raises(UsageError, match="morefs"):
        vddk_args(NbdkitConfig(mode="vddk", vddk_libdir="/x"), target, bare, tmp_path / "p")


def test_file_mode_serves_an_extent_at_an_offset(tmp_path: Path) -> None:
    root = tmp_path / "ds1"
    (root / "vm1").mkdir(parents=True)
    data = os.urandom(4096 + 8192)
    (root / "vm1" / "vm1-flat.vmdk").write_bytes(data)
    (root / "vm1" / "vm1-000001.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nRW 16 FLAT "vm1-flat.vmdk" 8\n'
    )
    cfg = NbdkitConfig(mode="file", datastores={"ds1": str(root)})
    assert file_args(cfg, disk())[0] == "--filter=offset"
    with NbdkitReader(cfg).open(disk()) as stream:
        assert stream.size == 8192
        assert stream.read(0, 8192) == data[4096:]
        workdir = stream._workdir
    assert not workdir.exists()  # nbdkit stopped, its directory removed


def test_file_mode_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no local directory for datastore ds1"):
        file_args(NbdkitConfig(mode="file"), disk())
    cfg = NbdkitConfig(mode="file", datastores={"ds1": str(tmp_path)})
    with pytest.raises(TransportError, match="cannot read"):
        file_args(cfg, disk())
    (tmp_path / "vm1").mkdir()
    (tmp_path / "vm1" / "vm1-000001.vmdk").write_bytes(b"\0" * 100)
    with pytest.raises(TransportError, match="less than"):
        file_args(cfg, disk())


def test_profile_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    session = SimpleNamespace(
        endpoint=SimpleNamespace(host="vc", port=443, user="u", password="pw", thumbprint_sha256=TP),
        ssl_context=lambda: "the session's context",
    )
    seen: list[Any] = []
    monkeypatch.setattr(nbdkit_module.tls, "verified_peer_certificate",
                        lambda host, port, ctx: seen.append((host, port, ctx)) or b"cert")
    with pytest.raises(UsageError, match="vcenter.nbd"):
        nbd_reader_from_profile(SimpleNamespace(vcenter={}), session)
    file_mode = nbd_reader_from_profile(
        SimpleNamespace(vcenter={"nbd": {"mode": "file", "datastores": {"ds1": "/x"}}}), session
    )
    assert file_mode.cfg.datastores == {"ds1": "/x"}
    vddk = nbd_reader_from_profile(
        SimpleNamespace(vcenter={"nbd": {"mode": "vddk", "vddk_libdir": "/opt/vddk"}}), session
    )
    assert vddk.cfg.mode == "vddk" and "pw" not in repr(vddk.cfg)
    assert seen == [("vc", 443, "the session's context")]   # the verified certificate's
    target = vddk._vddk[0]
    assert target.thumbprint_sha1 == tls_module.sha1_thumbprint_colon(b"cert")
