"""The vSphere layer replayed from vcrpy cassettes of real SOAP traffic (tests/cassettes/vsphere).

Each scenario below runs the production code (appliance.vsphere: connect, find_vm, vm_info,
enable_cbt, wait_for_task, snapshots, changed_areas, events) and is recorded once into its
own cassette; the tests replay it without any server, network or root, in well under a
second each.

Recording (see tests/cassettes/README.md):
    STILLPOINT_RECORD_VSPHERE=1 pytest tests/unit/test_vsphere_cassettes.py
starts the lab's vCenter simulator (start_vcsim only: no root, no guests) and records every
scenario with record_mode "all"; with STILLPOINT_VC_HOST (and STILLPOINT_VC_USER,
STILLPOINT_VC_PASSWORD, STILLPOINT_VC_THUMBPRINT or STILLPOINT_VC_CA_FILE, STILLPOINT_VC_VM)
it records against a real vCenter instead. The replay tests then run on what was just
recorded.

Replay and trust, honestly: replay calls the production `connect()` unchanged. Its TLS
trust (thumbprint pin or CA) is *not* exercised in replay, by design of this test: pyVim's
version probe and pyVmomi's SoapAdapter open their connections through vcrpy's
VCRHTTPSConnection (`custom_patches`), which answers from the cassette without opening a
socket, so no handshake -- and so no pin check -- ever happens. The pinned context is still
built (a bad thumbprint would still be refused). Trust is tested where a handshake exists:
tests/unit/test_vsphere_tls.py and tests/lab/test_vsphere_layer.py. While recording, the
real connection underneath does the full pinned handshake before any byte is sent.

Determinism: requests are matched on method, path and the SOAP body, normalized first
(`soap_body`): the Login password, xsd:dateTime values (event times, filter times),
session-scoped managed object ids (`session[...]...`), task ids and WaitForUpdatesEx'
maxWaitSeconds are replaced by fixed tokens. Identical normalized requests are answered in
recorded order, and every test checks that the whole cassette was played.

Scrubbing (before anything is written): the vmware_soap_session cookie (request Cookie
headers dropped; Set-Cookie values and every later occurrence of them replaced by
`scrubbed-cookie-N`), the session key of Login/currentSession answers (`scrubbed-session-N`),
the Login password (`scrubbed-password`), and the server's address (`vcenter.invalid`). User
names stay. test_cassettes_hold_no_secrets checks the committed files; recording also checks
that the lab's password and every raw cookie/key it saw are absent from what it wrote.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import vcr
from pyVim import connect as pyvim_connect
from pyVmomi import SoapAdapter, vim
from vcr.errors import CannotOverwriteExistingCassetteException
from vcr.request import Request
from vcr.serializers import yamlserializer
from vcr.stubs import VCRHTTPSConnection

from appliance.errors import AuthenticationFailed, NotFound, VSphereError
from appliance.vsphere.cbt import changed_areas, enable_cbt
from appliance.vsphere.events import post_vm_event, recent_events
from appliance.vsphere.inventory import find_vm, inventory_path, vm_info
from appliance.vsphere.session import VCenterEndpoint, connect
from appliance.vsphere.snapshots import create_snapshot as create_snapshot_ref
from appliance.vsphere.snapshots import find_snapshots, remove_snapshot, snapshot_disks
from appliance.vsphere.tasks import wait_for_task

pytestmark = pytest.mark.unit

CASSETTES = Path(__file__).resolve().parents[1] / "cassettes" / "vsphere"
PLAN_FILE = CASSETTES / "plan.json"
RECORD_ENV = "STILLPOINT_RECORD_VSPHERE"

REPLAY_HOST = "vcenter.invalid"  # .invalid never resolves: replay cannot reach anything
PASSWORD_PLACEHOLDER = "scrubbed-password"
WRONG_PASSWORD = "not-the-password"  # the bad-login scenario's password (scrubbed as well)
COOKIE_NAME = "vmware_soap_session"
ANY_PIN = "00" * 32  # replay never does a handshake (see the module docstring)

MiB = 1024 * 1024
BLOCK = 64 * 1024
LAB_VM = "sp-cassette"
LAB_SPAN_CAP = 1 * MiB  # QueryChangedDiskAreas answers at most 1 MiB: 4 pages for 4 MiB
LAB_WRITES = ((100_000, 5000), (MiB - 10, 20), (2 * MiB + BLOCK, 70_000), (4 * MiB - 512, 512))
SNAPSHOT_NAME = "stillpoint-cassette-snap"
CBT_SNAPSHOT_NAME = "stillpoint-cassette-cbt"
EVENT_MESSAGES = (
    ("info", "Stillpoint cassette job-1 succeeded"),
    ("error", "Stillpoint cassette job-2 failed: writer mariadb"),
)


# --- scrubbing and matching -----------------------------------------------------------------

_PASSWORD_RE = re.compile(rb"(<password\b[^>]*>)[^<]*(</password>)")
_DATETIME_RE = re.compile(
    rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?"
)
_SESSION_MOREF_RE = re.compile(rb"session\[[^\]<]*\][^<\"]*")
_TASK_RE = re.compile(rb"(<_this\b[^>]*type=\"Task\"[^>]*>)[^<]*(</_this>)")
_MAXWAIT_RE = re.compile(rb"(<maxWaitSeconds\b[^>]*>)\d+(</maxWaitSeconds>)")
# The session key in UserSession answers (Login, currentSession reads).
_SESSION_KEY_RE = re.compile(rb"<key\b[^>]*>([^<]+)</key>\s*<userName\b")
_COOKIE_VALUE_RE = re.compile(COOKIE_NAME + r'=("?)([^";]*)\1')


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    return body.encode() if isinstance(body, str) else bytes(body)


class Scrubber:
    """Replaces session secrets by numbered placeholders, in requests and responses.

    It learns a secret from each response (Set-Cookie value, UserSession key) and replaces
    it wherever it appears afterwards; vcrpy runs the request hook on live requests too
    (before matching), where it also fixes the server address and the password."""

    def __init__(self, server_names: tuple[str, ...] = ()) -> None:
        self.secrets: dict[bytes, bytes] = {}
        # A real vCenter's own names (not secret, but the user's): replaced in bodies too.
        self.names = {n.encode(): REPLAY_HOST.encode() for n in server_names if n}

    def _learn(self, value: bytes, kind: str) -> None:
        if value and not value.startswith(b"scrubbed-") and value not in self.secrets:
            n = sum(1 for v in self.secrets.values() if v.startswith(f"scrubbed-{kind}-".encode()))
            self.secrets[value] = f"scrubbed-{kind}-{n + 1}".encode()

    def _replace(self, data: bytes) -> bytes:
        for secret, placeholder in (self.secrets | self.names).items():
            data = data.replace(secret, placeholder)
        return data

    def request(self, request: Any) -> Any:
        request.uri = re.sub(r"^https?://[^/]+", f"https://{REPLAY_HOST}", request.uri)
        for name in list(request.headers):
            if name.lower() == "cookie":
                del request.headers[name]
        body = _body_bytes(request.body)
        body = _PASSWORD_RE.sub(rb"\g<1>" + PASSWORD_PLACEHOLDER.encode() + rb"\g<2>", body)
        request.body = self._replace(body)
        return request

    def response(self, response: dict[str, Any]) -> dict[str, Any]:
        headers = response["headers"]
        for name in list(headers):
            if name.lower() != "set-cookie":
                continue
            values = []
            for value in headers[name]:
                m = _COOKIE_VALUE_RE.search(value)
                if m:
                    self._learn(m.group(2).encode(), "cookie")
                values.append(self._replace(value.encode()).decode())
            headers[name] = values
        body = _body_bytes(response["body"]["string"])
        for key in _SESSION_KEY_RE.finditer(body):
            self._learn(key.group(1), "session")
        response["body"]["string"] = self._replace(body)
        return response


def normalize_soap(body: Any) -> bytes:
    """A SOAP body with its session-specific values replaced by fixed tokens."""
    data = _PASSWORD_RE.sub(rb"\g<1>PASSWORD\g<2>", _body_bytes(body))
    data = _DATETIME_RE.sub(b"DATETIME", data)
    data = _SESSION_MOREF_RE.sub(b"SESSION-MOREF", data)
    data = _TASK_RE.sub(rb"\g<1>TASK\g<2>", data)
    return _MAXWAIT_RE.sub(rb"\g<1>N\g<2>", data)


def soap_body(r1: Any, r2: Any) -> None:
    """vcrpy matcher: equal SOAP bodies once normalized (see normalize_soap)."""
    b1, b2 = normalize_soap(r1.body), normalize_soap(r2.body)
    assert b1 == b2, f"SOAP bodies differ:\n{b1[:600]!r}\n{b2[:600]!r}"


def recorder(mode: str, scrubber: Scrubber | None = None) -> vcr.VCR:
    """A VCR for pyVmomi: its stubs hold their own HTTPSConnection names, so both are
    patched as pyVmomi's own tests do (SoapAdapter for SOAP calls, pyVim.connect for the
    version probe of SmartStubAdapter)."""
    scrub = scrubber or Scrubber()
    v = vcr.VCR(
        cassette_library_dir=str(CASSETTES),
        record_mode=mode,
        match_on=("method", "path", "soap_body"),
        custom_patches=(
            (SoapAdapter, "HTTPSConnection", VCRHTTPSConnection),
            (pyvim_connect, "HTTPSConnection", VCRHTTPSConnection),
        ),
        before_record_request=scrub.request,
        before_record_response=scrub.response,
        decode_compressed_response=True,
    )
    v.register_matcher("soap_body", soap_body)
    return v


# --- what the scenarios act on ----------------------------------------------------------------


@dataclass
class Plan:
    """Recorded next to the cassettes (plan.json): the inputs the scenarios were recorded
    with, what they returned then, and (lab only) facts known without the code under test."""

    source: str  # "lab" or "vcenter"
    user: str
    vm: str
    since: str  # ISO time from which the events scenario reads back
    expect: dict[str, Any] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)


def _pages(cassette: Any) -> int:
    return sum(1 for r in cassette.requests if b"<QueryChangedDiskAreas" in _body_bytes(r.body))


def scenario_login(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        current = s.content.sessionManager.currentSession
        return {
            "api_type": s.api_type,
            "cookie_name": s.cookie.split("=", 1)[0],
            "user": current.userName,
        }


def scenario_bad_login(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    bad = VCenterEndpoint(host=ep.host, port=ep.port, user=ep.user, password=WRONG_PASSWORD,
                          thumbprint_sha256=ep.thumbprint_sha256, ca_file=ep.ca_file)
    try:
        connect(bad, keepalive_seconds=None).close()
    except AuthenticationFailed as err:
        return {"refused": True, "message": str(err).replace(ep.address, "VCENTER")}
    return {"refused": False}


def scenario_find_vm(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        by_name = find_vm(s, plan.vm)
        path = inventory_path(s, by_name)
        try:
            find_vm(s, "stillpoint-no-such-vm")
            missing = False
        except NotFound:
            missing = True
        return {
            "moref": by_name._moId,
            "path": path,
            "by_path": find_vm(s, path)._moId,
            "by_moref": find_vm(s, by_name._moId)._moId,
            "unknown_is_not_found": missing,
        }


def scenario_vm_info(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        info = vm_info(s, find_vm(s, plan.vm))
        return {
            "moref": info.moref,
            "name": info.name,
            "guest_id": info.guest_id,
            "tools_running": info.tools_running,
            "ip_address": info.ip_address,
            "host_name": info.host_name,
            "datastores": info.datastores,
            "disks": [[d.key, d.capacity, d.file_name] for d in info.disks],
            "config_disks": sum(
                1 for d in info.config.get("devices", []) if d["_type"].endswith("VirtualDisk")
            ),
        }


def scenario_enable_cbt(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        vm = find_vm(s, plan.vm)
        first, second = enable_cbt(s, vm), enable_cbt(s, vm)
        info = vm_info(s, vm)
        return {"enabled_now": first, "again": second, "cbt_enabled": info.cbt_enabled,
                "snapshots_left": len(info.snapshots)}


def scenario_snapshot(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        vm = find_vm(s, plan.vm)
        task = vm.CreateSnapshot_Task(name=SNAPSHOT_NAME, description="cassette",
                                      memory=False, quiesce=False)
        made = wait_for_task(s, task, 600, what="cassette snapshot")
        (ref,) = find_snapshots(s, vm, prefix=SNAPSHOT_NAME)
        disks = snapshot_disks(s, ref)
        remove_snapshot(s, ref)
        return {
            "result_is_snapshot": isinstance(made, vim.vm.Snapshot),
            "found": ref.moref == made._moId,
            "disks": [[d.key, d.capacity, d.datastore, d.datacenter, d.change_id is not None]
                      for d in disks],
            "point_in_time_files": [d.file_name for d in disks],
            "left_after_remove": [r.name for r in find_snapshots(s, vm)],
        }


def scenario_changed_areas(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    with connect(ep, keepalive_seconds=None) as s:
        vm = find_vm(s, plan.vm)
        snap = create_snapshot_ref(s, vm, CBT_SNAPSHOT_NAME, "cassette", quiesce=False)
        try:
            disk = snapshot_disks(s, snap)[0]
            areas = changed_areas(s, vm, snap, disk.key, disk.capacity, "*")
        finally:
            remove_snapshot(s, snap)
        return {"disk": disk.key, "capacity": disk.capacity,
                "areas": [list(a) for a in areas]}


def scenario_events(ep: VCenterEndpoint, plan: Plan) -> dict[str, Any]:
    since = datetime.fromisoformat(plan.since)
    with connect(ep, keepalive_seconds=None) as s:
        vm = find_vm(s, plan.vm)
        for level, message in EVENT_MESSAGES:
            post_vm_event(s, vm, message, level)  # type: ignore[arg-type]
        events = [e for e in recent_events(s, vm, since) if "Stillpoint cassette" in e.message]
        return {"events": [[e.type_name, e.message, e.user] for e in events],
                "after_since": all(e.created >= since for e in events)}


Scenario = Callable[[VCenterEndpoint, Plan], dict[str, Any]]
# Recorded in this order (later ones rely on earlier ones: CBT is on before changed_areas).
SCENARIOS: dict[str, Scenario] = {
    "login": scenario_login,
    "bad_login": scenario_bad_login,
    "find_vm": scenario_find_vm,
    "vm_info": scenario_vm_info,
    "enable_cbt": scenario_enable_cbt,
    "snapshot": scenario_snapshot,
    "changed_areas": scenario_changed_areas,
    "events": scenario_events,
}


# --- recording -----------------------------------------------------------------------------------


def blocks(ranges: tuple[tuple[int, int], ...]) -> list[list[int]]:
    """The 64 KiB blocks touched by (offset, length) writes, adjacent ones merged."""
    touched = sorted({b for off, n in ranges for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)})
    out: list[list[int]] = []
    for b in touched:
        if out and out[-1][0] + out[-1][1] == b * BLOCK:
            out[-1][1] += BLOCK
        else:
            out.append([b * BLOCK, BLOCK])
    return out


def _record_scenarios(
    ep: VCenterEndpoint, plan: Plan, secrets: list[str], server_names: tuple[str, ...] = ()
) -> None:
    """Record every scenario, one cassette each (numbering of placeholders per cassette),
    then check that no secret seen on the wire reached a file; if one did, nothing stays."""
    CASSETTES.mkdir(parents=True, exist_ok=True)
    for old in CASSETTES.glob("*.yaml"):
        old.unlink()
    seen = [s for s in secrets if s]
    for name, scenario in SCENARIOS.items():
        scrubber = Scrubber(server_names)
        with recorder("all", scrubber).use_cassette(f"{name}.yaml"):
            plan.recorded[name] = scenario(ep, plan)
        seen.extend(k.decode() for k in scrubber.secrets)
    PLAN_FILE.write_text(json.dumps(asdict(plan), indent=2, sort_keys=True) + "\n")
    written = sorted(CASSETTES.glob("*.yaml")) + [PLAN_FILE]
    leaks = [p.name for p in written if any(secret in p.read_text() for secret in seen)]
    if leaks:
        for p in written:
            p.unlink()
        raise AssertionError(f"secrets reached {leaks}: nothing was kept; fix the scrubber")


def record_against_lab(tmp_path: Path) -> None:
    """Start the lab's simulator (no root needed) and record every scenario against it."""
    from stillpoint_lab.config import LabConfig
    from stillpoint_lab.vcsim import VcsimDisk, VcsimVM, start_vcsim

    vms = [VcsimVM(LAB_VM, ip="10.77.9.20", hostname="sp-cassette.lab",
                   disks=(VcsimDisk(4 * MiB), VcsimDisk(1 * MiB)))]
    vc = start_vcsim(LabConfig(lab_id=9), tmp_path / "vcsim-state", vms,
                     span_cap_bytes=LAB_SPAN_CAP)
    try:
        lab_vm = vc.vms[LAB_VM]
        with open(lab_vm.disks[0].flat_file, "r+b") as f:
            for off, n in LAB_WRITES:
                f.seek(off)
                f.write(bytes([0xA5]) * n)
        expect = {
            "moref": lab_vm.moref,
            "guest_id": "debian12_64Guest",
            "ip_address": "10.77.9.20",
            "host_name": "sp-cassette.lab",
            "disks": [[d.key, d.capacity_bytes, d.datastore_path] for d in lab_vm.disks],
            "areas": blocks(LAB_WRITES),
            "pages": 4,
        }
        plan = Plan(source="lab", user=vc.user, vm=LAB_VM,
                    since=(datetime.now(UTC) - timedelta(seconds=1)).isoformat(), expect=expect)
        ep = VCenterEndpoint(host=vc.host, port=vc.port, user=vc.user, password=vc.password,
                             thumbprint_sha256=vc.thumbprint_sha256)
        _record_scenarios(ep, plan, [vc.password, vc.lab_token])
    finally:
        vc.stop()


def record_against_vcenter(env: dict[str, str]) -> None:
    """Record every scenario against the real vCenter named by STILLPOINT_VC_* variables."""
    from appliance.vsphere.credentials import load_credentials

    creds = load_credentials(None, env, None)
    vm = env.get("STILLPOINT_VC_VM", "")
    assert vm, "STILLPOINT_VC_VM must name a scratch VM to record against"
    ep = VCenterEndpoint(host=env["STILLPOINT_VC_HOST"],
                         port=int(env.get("STILLPOINT_VC_PORT", "443")),
                         user=creds.user, password=creds.password,
                         thumbprint_sha256=env.get("STILLPOINT_VC_THUMBPRINT") or None,
                         ca_file=env.get("STILLPOINT_VC_CA_FILE") or None)
    plan = Plan(source="vcenter", user=creds.user, vm=vm,
                since=(datetime.now(UTC) - timedelta(seconds=1)).isoformat())
    _record_scenarios(ep, plan, [creds.password], server_names=(ep.host,))


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """The recorded plan; records first when STILLPOINT_RECORD_VSPHERE=1.

    Module scope: this runs before the autouse clean_env fixture strips STILLPOINT_VC_*."""
    if os.environ.get(RECORD_ENV) == "1":
        env = dict(os.environ)
        if env.get("STILLPOINT_VC_HOST"):
            record_against_vcenter(env)
        else:
            tmp = tmp_path_factory.mktemp("record")
            try:
                record_against_lab(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return Plan(**json.loads(PLAN_FILE.read_text()))


def replay_endpoint(plan: Plan) -> VCenterEndpoint:
    return VCenterEndpoint(host=REPLAY_HOST, port=443, user=plan.user,
                           password=PASSWORD_PLACEHOLDER, thumbprint_sha256=ANY_PIN)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays must not open any connection: every socket connect fails the test."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a replay tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def replay(plan: Plan, no_network: None) -> Iterator[Callable[[str], tuple[dict[str, Any], Any]]]:
    """replay(name) -> (the scenario's result, the cassette), checked to be fully played."""

    def run(name: str) -> tuple[dict[str, Any], Any]:
        with recorder("none").use_cassette(f"{name}.yaml") as cassette:
            result = SCENARIOS[name](replay_endpoint(plan), plan)
            assert cassette.all_played, f"{name}: not every recorded exchange was replayed"
        # Through JSON, as recorded: tuples become lists.
        result = json.loads(json.dumps(result))
        assert result == plan.recorded[name]
        return result, cassette

    yield run


def _soap_methods(cassette: Any) -> list[str]:
    names = []
    for r in cassette.requests:
        m = re.search(rb"<soapenv:Body>\s*<(\w+)", _body_bytes(r.body))
        names.append(m.group(1).decode() if m else f"{r.method} {r.path}")
    return names


# --- replays ---------------------------------------------------------------------------------------


def test_replay_login_then_logout(replay: Any, plan: Plan) -> None:
    result, cassette = replay("login")
    assert result == {"api_type": "VirtualCenter", "cookie_name": COOKIE_NAME, "user": plan.user}
    methods = _soap_methods(cassette)
    assert methods[0] == "GET /sdk/vimServiceVersions.xml"  # SmartStubAdapter's version probe
    assert methods.index("Login") < methods.index("Logout") == len(methods) - 1


def test_replay_bad_login_is_refused(replay: Any, plan: Plan) -> None:
    result, cassette = replay("bad_login")
    assert result["refused"] is True
    assert plan.user in result["message"]
    assert "Logout" not in _soap_methods(cassette)


def test_replay_find_vm_by_name_path_and_moref(replay: Any, plan: Plan) -> None:
    result, _ = replay("find_vm")
    assert result["by_path"] == result["by_moref"] == result["moref"]
    assert result["path"].endswith("/" + plan.vm)
    assert result["unknown_is_not_found"] is True
    if "moref" in plan.expect:
        assert result["moref"] == plan.expect["moref"]


def test_replay_vm_info(replay: Any, plan: Plan) -> None:
    result, cassette = replay("vm_info")
    assert result["name"] == plan.vm
    assert result["config_disks"] == len(result["disks"]) >= 1
    if plan.source == "lab":
        want = plan.expect
        assert result["moref"] == want["moref"] and result["guest_id"] == want["guest_id"]
        assert (result["ip_address"], result["host_name"]) == (want["ip_address"], want["host_name"])
        assert result["disks"] == want["disks"] and result["datastores"] == ["LocalDS_0"]
    # One PropertyCollector read for the VM's properties, one per type for the names of
    # its datastores and networks; never one call per attribute.
    methods = _soap_methods(cassette)
    reads = methods[methods.index("DestroyView") + 1 :].count("RetrievePropertiesEx")
    assert reads == 3 if plan.source == "lab" else 2 <= reads <= 4


def test_replay_enable_cbt(replay: Any, plan: Plan) -> None:
    result, cassette = replay("enable_cbt")
    assert result["again"] is False and result["cbt_enabled"] is True
    assert result["snapshots_left"] == 0
    methods = _soap_methods(cassette)
    if result["enabled_now"]:  # the stun cycle: reconfigure, then snapshot create + remove
        i = methods.index("ReconfigVM_Task")
        assert methods.index("CreateSnapshot_Task", i) < methods.index("RemoveSnapshot_Task", i)
    if plan.source == "lab":
        assert result["enabled_now"] is True


def test_replay_snapshot_create_wait_disks_remove(replay: Any, plan: Plan) -> None:
    result, cassette = replay("snapshot")
    assert result["result_is_snapshot"] and result["found"]
    assert result["left_after_remove"] == []
    assert all(has_change_id for *_, has_change_id in result["disks"])  # CBT is on
    methods = _soap_methods(cassette)
    assert "WaitForUpdatesEx" in methods and "WaitForUpdates" not in methods  # no sleep loop
    assert methods.count("DestroyPropertyCollector") == methods.count("CreatePropertyCollector")
    if plan.source == "lab":
        want = plan.expect["disks"]
        assert [d[:2] for d in result["disks"]] == [w[:2] for w in want]
        assert result["point_in_time_files"] != [w[2] for w in want]  # not the live files
        assert {d[2] for d in result["disks"]} == {"LocalDS_0"}


def test_replay_changed_areas_over_several_pages(replay: Any, plan: Plan) -> None:
    result, cassette = replay("changed_areas")
    areas = result["areas"]
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(areas))  # sorted, merged
    assert all(0 <= off and off + n <= result["capacity"] for off, n in areas)
    offsets = [int(m) for r in cassette.requests
               for m in re.findall(rb"<startOffset\b[^>]*>(\d+)</startOffset>", _body_bytes(r.body))]
    assert offsets == sorted(offsets) and offsets[0] == 0
    if plan.source == "lab":
        assert areas == plan.expect["areas"]
        assert _pages(cassette) == plan.expect["pages"]
        assert offsets == [i * LAB_SPAN_CAP for i in range(plan.expect["pages"])]


def test_replay_event_posted_and_read_back(replay: Any, plan: Plan) -> None:
    result, cassette = replay("events")
    assert [e[:2] for e in result["events"]] == [
        ["GeneralVmInfoEvent", EVENT_MESSAGES[0][1]],
        ["GeneralVmErrorEvent", EVENT_MESSAGES[1][1]],
    ]
    assert result["after_since"] is True
    methods = _soap_methods(cassette)
    assert methods.count("PostEvent") == 2
    assert methods.index("CreateCollectorForEvents") < methods.index("DestroyCollector")


def test_replay_refuses_a_different_request(plan: Plan, no_network: None) -> None:
    """The matcher is not blind: a Login for another user is not in the cassette (connect()
    turns vcrpy's refusal into a VSphereError, as it would any failure to talk)."""
    other = Plan(**{**asdict(plan), "user": "someone-else@vsphere.local"})
    with recorder("none").use_cassette("login.yaml") as cassette:
        with pytest.raises(VSphereError) as info:
            scenario_login(replay_endpoint(other), other)
        assert not cassette.all_played
    assert isinstance(info.value.__cause__, CannotOverwriteExistingCassetteException)


def test_matcher_ignores_only_session_specific_values() -> None:
    a = (b'<Login><userName>u</userName><password>one</password></Login>'
         b'<_this type="Task">task-12</_this><maxWaitSeconds>60</maxWaitSeconds>'
         b'<createdTime>2026-11-25T10:00:00.123+00:00</createdTime>'
         b'<_this type="PropertyCollector">session[52a1-ff]52b2-ee</_this>')
    b = (b'<Login><userName>u</userName><password>two</password></Login>'
         b'<_this type="Task">task-99</_this><maxWaitSeconds>3</maxWaitSeconds>'
         b'<createdTime>2027-01-01T00:00:00Z</createdTime>'
         b'<_this type="PropertyCollector">session[scrubbed-cookie-1]52c3-dd</_this>')
    assert normalize_soap(a) == normalize_soap(b)
    assert normalize_soap(a) != normalize_soap(a.replace(b"<userName>u<", b"<userName>v<"))
    assert normalize_soap(b"<name>sp-a</name>") != normalize_soap(b"<name>sp-b</name>")


def test_scrubber_on_a_vcenter_style_exchange() -> None:
    """A real vCenter quotes its cookie, marks it Secure, and its session key differs from
    the cookie; both are replaced, in the answer and in every later request."""
    cookie, key = "0f3c9a1e2b7d", "52a1b2c3-d4e5-f607-1829-3a4b5c6d7e8f"
    scrub = Scrubber(server_names=("vc01.corp.example",))
    login = Request("POST", "https://vc01.corp.example:443/sdk",
                    b'<Login xmlns="urn:vim25"><userName>backup</userName>'
                    b'<password versionId="8.0">s3cr&amp;t</password></Login>', {})
    login = scrub.request(login)
    assert login.uri == f"https://{REPLAY_HOST}/sdk"
    assert b"s3cr" not in login.body and PASSWORD_PLACEHOLDER.encode() in login.body
    answer = scrub.response({
        "status": {"code": 200, "message": "OK"},
        "headers": {"Set-Cookie": [f'{COOKIE_NAME}="{cookie}"; Path=/; HttpOnly; Secure;']},
        "body": {"string": f"<returnval><key>{key}</key><userName>backup</userName>"
                           f"<ipAddress>10.0.0.5</ipAddress></returnval>"
                           f"<fullName>vc01.corp.example</fullName>".encode()},
    })
    assert answer["headers"]["Set-Cookie"] == [
        f'{COOKIE_NAME}="scrubbed-cookie-1"; Path=/; HttpOnly; Secure;'
    ]
    text = answer["body"]["string"]
    assert key.encode() not in text and b"<key>scrubbed-session-1</key>" in text
    assert b"vc01" not in text
    later = scrub.request(Request(
        "POST", "https://vc01.corp.example/sdk",
        f'<_this type="PropertyCollector">session[{key}]52ff</_this>'.encode(),
        {"Cookie": f'{COOKIE_NAME}="{cookie}"'}))
    assert later.headers == {} and key.encode() not in later.body
    assert b"session[scrubbed-session-1]52ff" in later.body


# --- no secrets in what is committed -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cassettes_hold_no_secrets(name: str, plan: Plan) -> None:
    # `plan` first: when recording, the files checked are the ones just written.
    path = CASSETTES / f"{name}.yaml"
    text = path.read_text()
    assert "!!binary" not in text  # every body is readable text, so this check sees it all
    data = yamlserializer.deserialize(text)
    for interaction in data["interactions"]:
        req, resp = interaction["request"], interaction["response"]
        assert not any(h.lower() in ("cookie", "authorization") for h in req["headers"])
        assert req["uri"].startswith(f"https://{REPLAY_HOST}/")
        body = req["body"] or ""
        for password in re.findall(r"<password\b[^>]*>([^<]*)</password>", body):
            assert password == PASSWORD_PLACEHOLDER
        for header, values in resp["headers"].items():
            if header.lower() == "set-cookie":
                for value in values:
                    m = _COOKIE_VALUE_RE.search(value)
                    assert m and re.fullmatch(r"scrubbed-cookie-\d+", m.group(2)), value
        answer = resp["body"]["string"]
        for key in re.findall(r"<key\b[^>]*>([^<]+)</key>\s*<userName\b", answer):
            assert re.fullmatch(r"scrubbed-(cookie|session)-\d+", key), "session key leaked"
        for moref in re.findall(r"session\[([^\]]*)\]", body + answer):
            assert re.fullmatch(r"scrubbed-(cookie|session)-\d+", moref), "session key leaked"
    assert WRONG_PASSWORD not in text


def test_plan_holds_no_secrets(plan: Plan) -> None:
    doc = json.loads(PLAN_FILE.read_text())
    assert set(doc) == {f.name for f in fields(Plan)}  # inputs, results, expectations only
    text = json.dumps(doc).lower()
    assert "password" not in text and COOKIE_NAME + "=" not in text and "scrubbed-" not in text
