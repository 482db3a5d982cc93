"""A datastore without flat files (issue 13 item 18): the lab's vSAN-like LocalDS_0.

One lab (id 10) for the module, its datastore `datastore_type: vsan` (summary.type "vsan";
/folder/ has no disk data, as on vSAN: tests/lab/vcsim/nfc.go), one VM without a guest whose
two disks get known blocks. What an administrator sees:
  - a backup over datastore-http is refused in one line that names the datastore and its type,
    before any snapshot;
  - a backup over NBD works;
  - `restore vm` writes the disks through an OVF import lease (NFC) as streamOptimized VMDKs,
    which the simulator converts with QEMU's reader: the new VM's disks hold the same bytes;
    `--upload datastore-http` is refused in one line;
  - a stream ESXi could not read fails the upload, the lease is aborted, and no VM is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import flat_file, scattered, write_blocks
from job_env import job_env

from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec
from appliance.profile import load_profile

pytestmark = pytest.mark.lab

LAB_ID = 10
VM = "vsan-raw1"
STILLPOINT = [sys.executable, "-m", "appliance.cli"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (taps on a bridge, loop devices)")
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, datastore_type="vsan", vms=(
        VMSpec(VM, has_guest=False, apps=(), disks=(DiskSpec.mib(40), DiskSpec.mib(8))),))
    lab_down(cfg)
    handle = lab_up(cfg)
    try:
        write_blocks(flat_file(handle, VM, 0), scattered(640, 50, seed=1), seed=1)
        write_blocks(flat_file(handle, VM, 1), scattered(128, 9, seed=2), seed=2)
        yield handle
    finally:
        lab_down(cfg)


@pytest.fixture(scope="module")
def env(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return job_env(lab, tmp_path_factory.mktemp("vsan"))


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STILLPOINT, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _session(env: dict[str, str]) -> Any:
    from appliance.jobs import environment

    return environment.open_vcenter(load_profile(env["STILLPOINT_PROFILE"]))


def _folder_status(session: Any, path: str) -> int:
    url = (f"https://{session.host}:{session.port}/folder/{path}"
           "?dcPath=DC0&dsName=LocalDS_0")
    req = urllib.request.Request(url, headers={"Cookie": session.cookie}, method="GET")
    ctx: ssl.SSLContext = session.ssl_context()
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _snapshot_count(session: Any, name: str) -> int:
    from appliance.vsphere import inventory

    return len(inventory.vm_info(session, inventory.find_vm(session, name)).snapshots)


def test_the_datastore_is_vsan_and_folder_has_no_disk_data(env: dict[str, str]) -> None:
    from appliance.vsphere import inventory

    session = _session(env)
    try:
        assert inventory.datastore_types(session)["LocalDS_0"] == "vsan"
        assert _folder_status(session, f"{VM}/{VM}.vmdk") == 200, "the descriptor is there"
        assert _folder_status(session, f"{VM}/{VM}-flat.vmdk") == 404
    finally:
        session.close()


def test_a_datastore_http_backup_is_refused_in_one_line_before_any_snapshot(
        env: dict[str, str]) -> None:
    done = cli(env, "backup", VM, "--app-aware", "off")
    assert done.returncode == 2, done.stdout + done.stderr
    said = (done.stdout + done.stderr).strip().splitlines()
    reason = [line for line in said if "FAILED" in line]
    assert len(reason) == 1 and "LocalDS_0 (vsan)" in reason[0], said
    assert "--transport nbd" in reason[0], said
    assert "Traceback" not in done.stderr
    session = _session(env)
    try:
        assert _snapshot_count(session, VM) == 0
    finally:
        session.close()


@pytest.fixture(scope="module")
def restore_point(env: dict[str, str]) -> str:
    done = cli(env, "backup", VM, "--app-aware", "off", "--transport", "nbd", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])["result"]
    assert result["ok"], result
    return str(result["restore_point"])


def test_nbd_backup_and_an_nfc_restore_give_the_same_bytes(lab: Any, env: dict[str, str],
                                                          restore_point: str) -> None:
    from appliance.vsphere import restore_vm as rv
    from appliance.vsphere import inventory

    refused = cli(env, "restore", "vm", restore_point, "--name", "vsan-put",
                  "--upload", "datastore-http")
    assert refused.returncode == 2 and "--upload nfc" in refused.stderr, refused.stderr
    done = cli(env, "restore", "vm", restore_point, "--name", "vsan-restored")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "import lease (NFC)" in done.stdout + done.stderr
    assert "2 disk(s) written, 0 read back" in done.stdout
    session = _session(env)
    try:
        new_vm = inventory.find_vm(session, "vsan-restored")
        disks = rv.vm_disks(session, new_vm)
        assert len(disks) == 2
        datastore = Path(lab.vcsim.datastore_dir)
        for index, (_key, file_name, capacity) in enumerate(disks):
            rel = file_name.split("] ", 1)[1]
            flat = datastore / (rel[:-len(".vmdk")] + "-flat.vmdk")
            assert flat.stat().st_size == capacity
            assert _sha256(flat) == _sha256(flat_file(lab, VM, index))
        rv.destroy_vm(session, new_vm)
    finally:
        session.close()


def test_an_unreadable_stream_aborts_the_import_and_leaves_no_vm(
        env: dict[str, str], restore_point: str, tmp_path: Path) -> None:
    from appliance.errors import TransportError
    from appliance.jobs import environment
    from appliance.jobs.point_metadata import PointMetadata
    from appliance.vsphere import restore_vm as rv
    from appliance.vsphere.nfc_import import ImportLease

    profile = load_profile(env["STILLPOINT_PROFILE"])
    rp = environment.open_repository(profile).get(restore_point)
    session = _session(env)
    try:
        spec, _disks = rv.build_config_spec(PointMetadata.of(rp).vm_config, name="vsan-bad",
                                            datastore="LocalDS_0")
        where = rv.find_placement(session, source_vm=None, datastore="LocalDS_0")
        lease = ImportLease.open(session, spec, where)
        assert rv.vm_exists(session, lease.vm)
        garbage = tmp_path / "garbage.vmdk"
        garbage.write_bytes(os.urandom(4096))
        with pytest.raises(TransportError, match="not a readable streamOptimized VMDK"):
            lease.upload(lease.disk_urls()[0], garbage, 4096, 0)
        lease.abort()
        assert not rv.vm_exists(session, lease.vm), "vCenter removes an aborted import's VM"
    finally:
        session.close()
