"""The vSphere layer and the disk readers against the lab's vCenter (stillpoint-vcsim).

One simulator for the module, with two VMs: sp-a (two disks, used for CBT and reading)
and sp-b (snapshots, tasks, events). The span cap of QueryChangedDiskAreas is 1 MiB, so
an 8 MiB disk takes eight pages. The bytes the readers return are compared with the
flat files on disk, and the point-in-time property (later writes to the live disk do not
show in a snapshot) is checked too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyVmomi import vim

from appliance.errors import AuthenticationFailed, NotFound, TrustError, UsageError
from stillpoint_lab.config import LabConfig
from stillpoint_lab.vcsim import VcsimDisk, VcsimHandle, VcsimVM, start_vcsim
from appliance.transport import DatastoreHTTPReader
from appliance.transport.nbdkit import NbdkitConfig, NbdkitReader
from appliance.vsphere.cbt import CBTResetError, changed_areas, enable_cbt, parse_change_id
from appliance.vsphere.events import post_vm_event, recent_events
from appliance.vsphere.inventory import find_vm, find_vms_in_folder, inventory_path, vm_info
from appliance.vsphere.session import VCenterEndpoint, VSphereSession, connect
from appliance.vsphere.snapshots import (
    consolidate_if_needed,
    create_snapshot,
    find_snapshots,
    remove_abandoned_snapshot,
    remove_snapshot,
    remove_stale_snapshots,
    snapshot_disks,
)
from appliance.vsphere.tags import RestSession, TagsUnavailable, find_vms_by_tag
from appliance.vsphere.tasks import TaskFailed, TaskTimeout, wait_for_task

pytestmark = pytest.mark.lab

MiB = 1024 * 1024
BLOCK = 64 * 1024
SPAN_CAP = 1 * MiB


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimHandle]:
    """A simulator of our own (lab id 9, any free port): no guests, namespaces or mounts."""
    vms = [
        VcsimVM(
            "sp-a",
            ip="10.77.9.10",
            hostname="sp-a.lab",
            disks=(VcsimDisk(8 * MiB), VcsimDisk(4 * MiB)),
        ),
        VcsimVM(
            "sp-b",
            guest_id="windows2019srv_64Guest",
            tools_running=False,
            disks=(VcsimDisk(2 * MiB),),
        ),
    ]
    handle = start_vcsim(
        LabConfig(lab_id=9), tmp_path_factory.mktemp("vcsim-state"), vms, span_cap_bytes=SPAN_CAP
    )
    try:
        yield handle
    finally:
        handle.stop()


def endpoint(vc: VcsimHandle, **over: object) -> VCenterEndpoint:
    fields: dict[str, object] = {
        "host": vc.host,
        "port": vc.port,
        "user": vc.user,
        "password": vc.password,
        "thumbprint_sha256": vc.thumbprint_sha256,
    }
    fields.update(over)
    return VCenterEndpoint(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def session(vc: VcsimHandle) -> Iterator[VSphereSession]:
    s = connect(endpoint(vc))
    try:
        yield s
    finally:
        s.close()


# --- sessions -----------------------------------------------------------------------------


def test_login_pinned(vc: VcsimHandle) -> None:
    with connect(endpoint(vc), keepalive_seconds=None) as s:
        assert s.api_type == "VirtualCenter"
        assert s.cookie.startswith("vmware_soap_session=")


def test_login_verified_with_ca_file(vc: VcsimHandle) -> None:
    ep = endpoint(vc, thumbprint_sha256=None, ca_file=str(vc.cert_pem_path))
    with connect(ep, keepalive_seconds=None) as s:
        assert s.content.about.apiType == "VirtualCenter"


def test_self_signed_without_pin_is_refused(vc: VcsimHandle) -> None:
    with pytest.raises(TrustError, match="not trusted.*sha256 thumbprint"):
        connect(endpoint(vc, thumbprint_sha256=None), keepalive_seconds=None)


def test_wrong_pin_is_refused(vc: VcsimHandle) -> None:
    with pytest.raises(TrustError, match="mismatch"):
        connect(endpoint(vc, thumbprint_sha256="ab" * 32), keepalive_seconds=None)


def test_wrong_password(vc: VcsimHandle) -> None:
    with pytest.raises(AuthenticationFailed, match=vc.user):
        connect(endpoint(vc, password="wrong"), keepalive_seconds=None)


def test_relogin_after_the_session_was_terminated(vc: VcsimHandle) -> None:
    with (
        connect(endpoint(vc), keepalive_seconds=None) as s,
        connect(endpoint(vc), keepalive_seconds=None) as admin,
    ):
        key = s.content.sessionManager.currentSession.key
        admin.content.sessionManager.TerminateSession([key])
        vm = find_vm(s, "sp-a")  # NotAuthenticated inside, then a new login, then the answer
        assert vm._moId == vc.vms["sp-a"].moref
        assert s.relogins == 1


def test_concurrent_calls_log_in_again_once(vc: VcsimHandle) -> None:
    with (
        connect(endpoint(vc), keepalive_seconds=None) as s,
        connect(endpoint(vc), keepalive_seconds=None) as admin,
    ):
        admin.content.sessionManager.TerminateSession([s.content.sessionManager.currentSession.key])
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(find_vm(s, "sp-a")._moId))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == [vc.vms["sp-a"].moref] * 6
        assert s.relogins == 1


def test_keepalive_logs_in_again(vc: VcsimHandle) -> None:
    with (
        connect(endpoint(vc), keepalive_seconds=0.2) as s,
        connect(endpoint(vc), keepalive_seconds=None) as admin,
    ):
        admin.content.sessionManager.TerminateSession([s.content.sessionManager.currentSession.key])
        deadline = time.monotonic() + 10
        while s.relogins == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.relogins >= 1


# --- inventory ----------------------------------------------------------------------------


def test_find_vm_by_name_path_and_moref(session: VSphereSession, vc: VcsimHandle) -> None:
    moref = vc.vms["sp-a"].moref
    by_name = find_vm(session, "sp-a")
    path = inventory_path(session, by_name)
    assert path.endswith("/sp-a") and path.startswith("DC0/vm")
    assert by_name._moId == moref
    assert find_vm(session, path)._moId == moref
    assert find_vm(session, "/" + path)._moId == moref
    assert find_vm(session, moref)._moId == moref


def test_unknown_vm(session: VSphereSession) -> None:
    for selector in ("no-such-vm", "vm-99999", "DC0/vm/no-such-vm"):
        with pytest.raises(NotFound):
            find_vm(session, selector)
    with pytest.raises(UsageError, match="not a VM"):
        find_vm(session, "DC0/vm")


def test_ambiguous_name_and_folder(session: VSphereSession, vc: VcsimHandle) -> None:
    # Two new VMs with one name in two folders (not sp-a/sp-b: the lab simulator keeps
    # disk files by VM name, so destroying a namesake would take theirs along).
    dc = session.content.searchIndex.FindByInventoryPath("DC0")
    pool = find_vm(session, "sp-b").resourcePool
    folders = [dc.vmFolder.CreateFolder("sp-dup1"), dc.vmFolder.CreateFolder("sp-dup2")]
    dups = []
    try:
        for i, folder in enumerate(folders):
            spec = vim.vm.ConfigSpec(
                name="sp-twin",
                guestId="otherGuest",
                numCPUs=1,
                memoryMB=32,
                files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] sp-twin-{i}"),
            )
            dups.append(wait_for_task(session, folder.CreateVM_Task(config=spec, pool=pool), 60))
        with pytest.raises(UsageError) as info:
            find_vm(session, "sp-twin")
        message = str(info.value)
        assert "2 VMs are named sp-twin" in message
        assert all(d._moId in message for d in dups)
        assert "DC0/vm/sp-dup1/sp-twin" in message and "DC0/vm/sp-dup2/sp-twin" in message
        assert find_vm(session, "DC0/vm/sp-dup2/sp-twin")._moId == dups[1]._moId
        assert [v._moId for v in find_vms_in_folder(session, "DC0/vm/sp-dup1")] == [dups[0]._moId]
        below_vm = {v._moId for v in find_vms_in_folder(session, "DC0/vm")}
        assert {vc.vms["sp-a"].moref, vc.vms["sp-b"].moref, *(d._moId for d in dups)} <= below_vm
        with pytest.raises(UsageError, match="not a folder"):
            find_vms_in_folder(session, "DC0/vm/sp-dup1/sp-twin")
        with pytest.raises(NotFound):
            find_vms_in_folder(session, "DC0/vm/no-such-folder")
    finally:
        for dup in dups:
            wait_for_task(session, dup.Destroy_Task(), 60)
        for folder in folders:
            wait_for_task(session, folder.Destroy_Task(), 60)
    with pytest.raises(NotFound):
        find_vm(session, "sp-twin")


def test_vm_info(session: VSphereSession, vc: VcsimHandle) -> None:
    info = vm_info(session, find_vm(session, "sp-a"))
    assert (info.name, info.moref) == ("sp-a", vc.vms["sp-a"].moref)
    assert info.guest_id == "debian12_64Guest"
    assert info.tools_running and info.ip_address == "10.77.9.10"
    assert info.host_name == "sp-a.lab"
    assert info.uuid and info.instance_uuid and info.host
    assert info.datastores == ["LocalDS_0"]
    want = [(d.key, d.capacity_bytes, d.datastore_path) for d in vc.vms["sp-a"].disks]
    assert [(d.key, d.capacity, d.file_name) for d in info.disks] == want
    assert info.config["guestId"] == "debian12_64Guest"
    assert sum(1 for d in info.config["devices"] if d["_type"].endswith("VirtualDisk")) == 2
    other = vm_info(session, find_vm(session, "sp-b"))
    assert not other.tools_running and other.ip_address is None


# --- snapshots, tasks, events -------------------------------------------------------------


def test_snapshot_create_find_remove(session: VSphereSession, vc: VcsimHandle) -> None:
    vm = find_vm(session, "sp-b")
    snap = create_snapshot(session, vm, "stillpoint-job-1", "test", quiesce=False)
    try:
        assert [s.moref for s in find_snapshots(session, vm)] == [snap.moref]
        assert find_snapshots(session, vm, prefix="other-") == []
        (disk,) = snapshot_disks(session, snap)
        assert (disk.key, disk.capacity) == (2000, 2 * MiB)
        assert disk.file_name != vc.vms["sp-b"].disks[0].datastore_path  # point in time
        assert (disk.datastore, disk.datacenter, disk.change_id) == ("LocalDS_0", "DC0", None)
        with pytest.raises(UsageError, match="has snapshots"):
            enable_cbt(session, vm)
    finally:
        remove_snapshot(session, snap)
    assert find_snapshots(session, vm) == []
    with pytest.raises(NotFound):
        remove_snapshot(session, snap)
    assert consolidate_if_needed(session, vm) is False


def test_task_timeout_then_wait_again(session: VSphereSession, vc: VcsimHandle) -> None:
    vm = find_vm(session, "sp-b")
    vc.set_knobs("sp-b", snapshot_delay_s=2)
    try:
        with pytest.raises(TaskTimeout) as info:
            create_snapshot(session, vm, "stillpoint-slow", timeout=0.5)
        task = vim.Task(info.value.task_id, session.si._stub)
        started = time.monotonic()
        wait_for_task(session, task, 30)
        assert time.monotonic() - started < 10
    finally:
        vc.set_knobs("sp-b", snapshot_delay_s=0)
    (snap,) = find_snapshots(session, vm, prefix="stillpoint-slow")
    remove_snapshot(session, snap)


def test_failed_task_carries_the_fault(session: VSphereSession, vc: VcsimHandle) -> None:
    vm = find_vm(session, "sp-b")
    vc.set_knobs("sp-b", snapshot_fail=True)
    try:
        with pytest.raises(TaskFailed) as info:
            create_snapshot(session, vm, "stillpoint-fail")
    finally:
        vc.set_knobs("sp-b", snapshot_fail=False)
    assert info.value.fault_name.startswith(("vim.fault.", "vmodl.fault."))
    assert info.value.exit_code == 7
    assert find_snapshots(session, vm) == []


def test_events_posted_and_read_back(session: VSphereSession) -> None:
    vm = find_vm(session, "sp-b")
    since = datetime.now(UTC) - timedelta(seconds=1)
    post_vm_event(session, vm, "Stillpoint backup job-7 succeeded", "info")
    post_vm_event(session, vm, "Stillpoint backup job-8 failed: writer mariadb", "error")
    events = [e for e in recent_events(session, vm, since) if "Stillpoint" in e.message]
    assert [(e.type_name, e.message) for e in events] == [
        ("GeneralVmInfoEvent", "Stillpoint backup job-7 succeeded"),
        ("GeneralVmErrorEvent", "Stillpoint backup job-8 failed: writer mariadb"),
    ]
    # Only the VM's own events: nothing posted on sp-b shows on sp-a.
    assert all(
        "job-7" not in e.message for e in recent_events(session, find_vm(session, "sp-a"), since)
    )


# --- CBT and reading ----------------------------------------------------------------------


def write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def blocks(*ranges: tuple[int, int]) -> list[tuple[int, int]]:
    """Expected changed areas: the 64 KiB blocks touched by (offset, length), merged."""
    touched = sorted(
        {b for off, n in ranges for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}
    )
    out: list[tuple[int, int]] = []
    for b in touched:
        if out and out[-1][0] + out[-1][1] == b * BLOCK:
            out[-1] = (out[-1][0], out[-1][1] + BLOCK)
        else:
            out.append((b * BLOCK, BLOCK))
    return out


def test_cbt_changed_areas_and_readers(session: VSphereSession, vc: VcsimHandle) -> None:
    assert shutil.which("nbdkit"), "nbdkit is installed in CI"
    vm = find_vm(session, "sp-a")
    live = vc.vms["sp-a"].disks[0].flat_file
    assert enable_cbt(session, vm) is True
    assert enable_cbt(session, vm) is False
    info = vm_info(session, vm)
    assert info.cbt_enabled and info.snapshots == []  # the stun snapshot is gone

    # First full: "*" = the allocated areas, over eight 1 MiB pages.
    first = [(100_000, 5000), (MiB - 10, 20), (3 * MiB, 200_000), (8 * MiB - 512, 512)]
    for off, n in first:
        write(live, off, os.urandom(n))
    s1 = create_snapshot(session, vm, "stillpoint-cbt-1")
    try:
        d1 = snapshot_disks(session, s1)
        assert [d.key for d in d1] == [2000, 2001]
        assert all(d.change_id for d in d1)
        at_s1 = live.read_bytes()
        full = changed_areas(session, vm, s1, d1[0].key, d1[0].capacity, "*")
        assert full == blocks(*first)
        assert changed_areas(session, vm, s1, d1[1].key, d1[1].capacity, "*") == []

        # Later writes to the live disk do not show in the snapshot.
        write(live, 2 * MiB, b"\xff" * 1000)
        with DatastoreHTTPReader(session, workers=3, piece_size=256 * 1024).open(d1[0]) as st:
            assert st.read(0, st.size) == at_s1
            for off, data in st.read_extents(full):
                assert data == at_s1[off : off + len(data)]
        captured = vc.datastore_dir / d1[0].path
        captured_flat = captured.with_name(captured.stem + "-flat.vmdk")
        assert captured_flat.read_bytes() == at_s1
        nbd = NbdkitConfig(mode="file", datastores={"LocalDS_0": str(vc.datastore_dir)})
        with NbdkitReader(nbd, connections=2).open(d1[0]) as st:
            assert st.read(0, st.size) == at_s1

        # Incremental: exactly the blocks written since s1.
        second = [(2 * MiB, 1000), (5 * MiB + BLOCK - 1, 2)]
        write(live, second[1][0], b"\x01\x02")
        s2 = create_snapshot(session, vm, "stillpoint-cbt-2")
        try:
            d2 = snapshot_disks(session, s2)
            assert parse_change_id(d2[0].change_id).uuid == parse_change_id(d1[0].change_id).uuid
            delta = changed_areas(session, vm, s2, 2000, d2[0].capacity, d1[0].change_id)
            assert delta == blocks(*second)
            assert changed_areas(session, vm, s2, 2001, d2[1].capacity, d1[1].change_id) == []
            with DatastoreHTTPReader(session).open(d2[0]) as st:
                now = live.read_bytes()
                for off, data in st.read_extents(delta):
                    assert data == now[off : off + len(data)]
                assert st.bytes_read == sum(n for _, n in delta)

            # Unknown changeId, then a CBT reset: a full is needed.
            bogus = f"{parse_change_id(d1[0].change_id).uuid}/999"
            with pytest.raises(CBTResetError):
                changed_areas(session, vm, s2, 2000, d2[0].capacity, bogus)
            vc.set_knobs("sp-a", cbt_reset=True)
            with pytest.raises(CBTResetError):
                changed_areas(session, vm, s2, 2000, d2[0].capacity, d1[0].change_id)
        finally:
            remove_snapshot(session, s2)
    finally:
        remove_snapshot(session, s1)
    assert find_snapshots(session, vm) == []


# --- tags (vSphere Automation REST API) ---------------------------------------------------
# stillpoint-vcsim serves no REST API, so tags are tested against govmomi's stock simulator
# built here with and without its vAPI endpoints (a -vapi flag).

TAGSIM_MAIN = """\
package main

import (
\t"crypto/tls"
\t"flag"
\t"fmt"
\t"log"
\t"net/url"
\t"os"
\t"os/signal"
\t"syscall"

\t"github.com/vmware/govmomi/simulator"
\t_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
\tvapi := flag.Bool("vapi", false, "serve the vSphere Automation REST API")
\tflag.Parse()
\tmodel := simulator.VPX()
\tif err := model.Create(); err != nil {
\t\tlog.Fatal(err)
\t}
\tcert, err := tls.LoadX509KeyPair(flag.Arg(0), flag.Arg(1))
\tif err != nil {
\t\tlog.Fatal(err)
\t}
\tmodel.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
\tmodel.Service.RegisterEndpoints = *vapi
\tuser := url.UserPassword(os.Getenv("TAGSIM_USER"), os.Getenv("TAGSIM_PASSWORD"))
\tmodel.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: user}
\ts := model.Service.NewServer()
\tfmt.Printf("PORT=%s\\n", s.URL.Port())
\tsig := make(chan os.Signal, 1)
\tsignal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
\t<-sig
\ts.Close()
\tmodel.Remove()
}
"""


@pytest.fixture(scope="module")
def tagsim_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tagsim-src")
    (src / "main.go").write_text(TAGSIM_MAIN)
    binary = src / "stillpoint-vcsim-tagtest"
    # GOCACHE explicitly: CI may run without $HOME, and a warm cache makes this ~2 s.
    gocache = os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build")
    env = dict(
        os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off", GOFLAGS="", GOCACHE=gocache
    )
    proc = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return binary


@pytest.fixture
def tagsim(
    tagsim_binary: Path, vc: VcsimHandle, tmp_path: Path
) -> Iterator[Callable[[bool], VCenterEndpoint]]:
    """Start the stock simulator (with or without vAPI); yields a starter -> endpoint."""
    procs: list[subprocess.Popen[str]] = []

    def start(vapi: bool) -> VCenterEndpoint:
        # The lab's certificate and key are reused: only the thumbprint matters here.
        env = dict(os.environ, TAGSIM_USER="administrator@vsphere.local", TAGSIM_PASSWORD="pw-t4g")
        args = (
            [str(tagsim_binary)]
            + (["-vapi"] if vapi else [])
            + [str(vc.cert_pem_path), str(vc.cert_pem_path.with_name("key.pem"))]
        )
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT="), f"tag simulator did not start: {line!r}"
        return VCenterEndpoint(
            host="127.0.0.1",
            port=int(line.strip()[5:]),
            user="administrator@vsphere.local",
            password="pw-t4g",
            thumbprint_sha256=vc.thumbprint_sha256,
        )

    try:
        yield start
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_find_vms_by_tag(tagsim: Callable[[bool], VCenterEndpoint]) -> None:
    with connect(tagsim(True), keepalive_seconds=None) as s:
        vm = find_vm(s, "DC0_H0_VM0")
        other = find_vm(s, "DC0_H0_VM1")
        with RestSession(s) as rest:

            def category(name: str) -> str:
                spec = {
                    "name": name,
                    "description": "",
                    "cardinality": "MULTIPLE",
                    "associable_types": [],
                }
                return str(rest.call("POST", "/tagging/category", {"create_spec": spec}))

            def tag(name: str, cat: str) -> str:
                spec = {"name": name, "description": "", "category_id": cat}
                return str(rest.call("POST", "/tagging/tag", {"create_spec": spec}))

            backup, other_cat = category("backup"), category("other")
            gold, silver, gold2 = tag("gold", backup), tag("silver", backup), tag("gold", other_cat)
            for t, v in ((gold, vm), (silver, other), (gold2, other)):
                rest.call(
                    "POST",
                    f"/tagging/tag-association/id:{t}?~action=attach",
                    {"object_id": {"id": v._moId, "type": "VirtualMachine"}},
                )
        assert [v._moId for v in find_vms_by_tag(s, "backup/gold")] == [vm._moId]
        assert [v._moId for v in find_vms_by_tag(s, "silver")] == [other._moId]
        with pytest.raises(UsageError, match="category/gold"):
            find_vms_by_tag(s, "gold")  # two categories have a "gold"
        with pytest.raises(NotFound):
            find_vms_by_tag(s, "backup/bronze")


def test_tags_unavailable_is_reported(
    tagsim: Callable[[bool], VCenterEndpoint], session: VSphereSession
) -> None:
    with (
        connect(tagsim(False), keepalive_seconds=None) as s,
        pytest.raises(TagsUnavailable, match="Automation REST API"),
    ):
        find_vms_by_tag(s, "gold")
    with pytest.raises(TagsUnavailable):  # the lab's vCenter has no REST API either
        find_vms_by_tag(session, "gold")


def test_abandon_a_slow_snapshot(session: VSphereSession, vc: VcsimHandle) -> None:
    vm = find_vm(session, "sp-b")
    vc.set_knobs("sp-b", snapshot_delay_s=1.5)
    try:
        with pytest.raises(TaskTimeout) as info:
            create_snapshot(session, vm, "stillpoint-budget", timeout=0.3)
        removed = remove_abandoned_snapshot(session, vm, info.value.task_id, 30)
    finally:
        vc.set_knobs("sp-b", snapshot_delay_s=0)
    # The simulator cannot cancel a snapshot task: it finishes, and its snapshot is removed.
    assert removed == 1
    assert find_snapshots(session, vm) == []


def test_remove_stale_snapshots(session: VSphereSession) -> None:
    vm = find_vm(session, "sp-b")
    create_snapshot(session, vm, "stillpoint-crashed-1")
    create_snapshot(session, vm, "stillpoint-crashed-2")
    create_snapshot(session, vm, "stillpoint-current")
    mine = create_snapshot(session, vm, "user-snapshot")
    try:
        removed = remove_stale_snapshots(session, vm, keep=frozenset({"stillpoint-current"}))
        assert removed == ["stillpoint-crashed-1", "stillpoint-crashed-2"]
        assert [s.name for s in find_snapshots(session, vm, prefix="")] == [
            "stillpoint-current",
            "user-snapshot",
        ]
    finally:
        for snap in find_snapshots(session, vm, prefix=""):
            remove_snapshot(session, snap)
    assert mine.name == "user-snapshot"


def test_task_wait_survives_a_lost_session(vc: VcsimHandle) -> None:
    """The session dies while we wait: the stub logs in again, the wait goes on with a new
    property collector, and the task's result still arrives."""
    with (
        connect(endpoint(vc), keepalive_seconds=None) as s,
        connect(endpoint(vc), keepalive_seconds=None) as admin,
    ):
        vm = find_vm(s, "sp-b")
        vc.set_knobs("sp-b", snapshot_delay_s=2)
        try:
            task = vm.CreateSnapshot_Task(
                name="stillpoint-lost-session", description="", memory=False, quiesce=False
            )
            key = s.content.sessionManager.currentSession.key
            killer = threading.Timer(
                0.7, lambda: admin.content.sessionManager.TerminateSession([key])
            )
            killer.start()
            try:
                snap = wait_for_task(s, task, 30)
            finally:
                killer.join()
        finally:
            vc.set_knobs("sp-b", snapshot_delay_s=0)
        assert isinstance(snap, vim.vm.Snapshot)
        assert s.relogins >= 1
        (ref,) = find_snapshots(s, vm, prefix="stillpoint-lost-session")
        remove_snapshot(s, ref)
