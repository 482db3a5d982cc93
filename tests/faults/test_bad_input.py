"""Every command with wrong input: one line saying what is wrong (and what to do), the
documented exit code, no traceback, and nothing changed (repository files, the VMs and their
snapshots in vCenter, the profile).

Each row of CASES: (id, arguments, exit code, a fragment of the message, how to break the
input). The breakers edit a copy of the profile or the environment; the repository holds one
restore point of lab-vm1 whose data disk (disk 1, the guest's /data; disk 0 is its system)
has escaping symbolic links.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import backup_hashed, cli
from pyVmomi import vim

from appliance.jobs import environment
from appliance.profile import load_profile, write_private
from appliance.vsphere.tasks import wait_for_task

pytestmark = pytest.mark.timeout(1800)   # the first case pays for the module's backup

VM = "lab-vm1"
OTHER_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk0mPmq1Q+N2fH1iXQbQ1s2m3X4hKJhV9sR5E0s"
             "Cq0u")


@pytest.fixture(scope="module")
def world(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("badinput")
    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(base / "repository")
    profile = base / "profile.json"
    write_private(profile, json.dumps(doc))
    g = lab.guests[VM]
    made = g.run(["sh", "-c", ("mkdir -p /data/escapes && cd /data/escapes && "
                                "ln -sf ../../../../../etc/shadow up-and-out && "
                                "ln -sf /etc/passwd absolute && echo inside > plain.txt && sync")])
    assert made.returncode == 0, made.stderr
    result, _ = backup_hashed(profile, lab, VM, app_aware="require")
    assert result.ok, result.error
    twins = _make_twins(profile)
    try:
        yield {"profile": profile, "doc": doc, "rp": result.restore_point, "base": base}
    finally:
        _remove_twins(profile, twins)


def _make_twins(profile: Path) -> list[Any]:
    """Two VMs named sp-twin in two folders: the ambiguous name."""
    session = environment.open_vcenter(load_profile(profile))
    try:
        dc = session.content.searchIndex.FindByInventoryPath("DC0")
        vm = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{VM}")
        made = []
        for i in (1, 2):
            folder = dc.vmFolder.CreateFolder(f"sp-bad{i}")
            spec = vim.vm.ConfigSpec(name="sp-twin", guestId="otherGuest", numCPUs=1,
                                     memoryMB=32,
                                     files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] sp-twin-{i}"))
            made.append((folder, wait_for_task(
                session, folder.CreateVM_Task(config=spec, pool=vm.resourcePool), 60)))
        return [m._moId for pair in made for m in pair]
    finally:
        session.close()


def _remove_twins(profile: Path, morefs: list[str]) -> None:
    del morefs  # found again by path: a failed test may have left them
    session = environment.open_vcenter(load_profile(profile))
    try:
        for folder_name in ("sp-bad1", "sp-bad2"):
            twin = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{folder_name}/sp-twin")
            if twin is not None:
                wait_for_task(session, twin.Destroy_Task(), 60)
            folder = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{folder_name}")
            if folder is not None:
                wait_for_task(session, folder.Destroy_Task(), 60)
    finally:
        session.close()


Breaker = Callable[[dict[str, Any], Path, dict[str, str]], None]


def _profile_edit(edit: Callable[[dict[str, Any]], None]) -> Breaker:
    def breaker(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
        edit(doc)
        write_private(path, json.dumps(doc))
    return breaker


def _env(**values: str) -> Breaker:
    def breaker(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
        env.update(values)
    return breaker


def _missing_profile(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
    env["STILLPOINT_PROFILE"] = str(path.with_name("no-such-profile.json"))


def _corrupt_profile(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
    write_private(path, json.dumps(doc)[:-7])


def _world_readable(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
    os.chmod(path, 0o644)


def _nothing(doc: dict[str, Any], path: Path, env: dict[str, str]) -> None:
    return None


def _host_key(doc: dict[str, Any]) -> None:
    ip = doc["guests"][VM]["host"]
    doc["guests"][VM]["host_key"] = f"{ip} {OTHER_KEY}"


def _no_host_key(doc: dict[str, Any]) -> None:
    doc["guests"][VM]["host_key"] = None


RP = "{rp}"   # replaced by the restore point's id
TMP = "{tmp}"  # replaced by a fresh directory

CASES: list[tuple[str, list[str], int, str, Breaker]] = [
    ("unknown-vm", ["backup", "no-such-vm"], 3, "no-such-vm", _nothing),
    ("ambiguous-vm", ["backup", "sp-twin"], 2, "2 VMs are named sp-twin", _nothing),
    ("bad-vc-password", ["backup", VM], 4, "", _env(STILLPOINT_VC_PASSWORD="wrong")),
    ("thumbprint-mismatch", ["backup", VM, "--thumbprint", ":".join(["AB"] * 32)], 5,
     "thumbprint", _nothing),
    ("ssh-host-key-mismatch", ["backup", VM], 5, "host key", _profile_edit(_host_key)),
    ("ssh-host-key-missing", ["backup", VM], 2, "host_key", _profile_edit(_no_host_key)),
    ("wrong-passphrase", ["list"], 6, "passphrase", _env(STILLPOINT_PASSPHRASE="wrong")),
    ("wrong-passphrase-backup", ["backup", VM], 6, "passphrase",
     _env(STILLPOINT_PASSPHRASE="wrong")),
    ("missing-profile", ["list"], 2, "not found", _missing_profile),
    ("corrupt-profile", ["list"], 2, "not valid JSON", _corrupt_profile),
    ("world-readable-profile", ["list"], 2, "chmod 600", _world_readable),
    ("no-repository", ["list"], 3, "stillpoint init",
     _profile_edit(lambda d: d["repository"].update(path="/nonexistent/stillpoint-repo"))),
    ("init-existing", ["init"], 2, "already exists", _nothing),
    ("attempts-zero", ["backup", VM, "--attempts", "0"], 2, "--attempts", _nothing),
    ("freeze-limit-too-long", ["backup", VM, "--freeze-limit", "600"], 2, "--freeze-limit",
     _nothing),
    ("unknown-option", ["backup", VM, "--no-such-option"], 2, "no-such-option", _nothing),
    ("no-target", ["backup"], 2, "TARGETS", _nothing),
    ("forget-without-rule", ["forget"], 2, "--keep", _nothing),
    ("forget-names-and-rules", ["forget", RP, "--keep-last", "1"], 2, "not both", _nothing),
    ("forget-unknown-point", ["forget", RP, "feedface"], 3, "no restore point", _nothing),
    ("show-missing-point", ["show", "0123456789abcdef"], 3, "no restore point", _nothing),
    ("restore-disk-missing-point", ["restore", "disk", "feedface", "--to", f"{TMP}/d.raw"], 3,
     "no restore point", _nothing),
    ("restore-disk-bad-disk", ["restore", "disk", RP, "--disk", "7", "--to", f"{TMP}/d.raw"],
     2, "has disks", _nothing),
    ("restore-disk-target-exists", ["restore", "disk", RP, "--to", "{exists}"], 2, "--force",
     _nothing),
    ("restore-vm-name-exists", ["restore", "vm", RP, "--name", "lab-raw1"], 2, "exists",
     _nothing),
    ("restore-vm-missing-point", ["restore", "vm", "feedface", "--name", "sp-new"], 3,
     "no restore point", _nothing),
    ("files-ls-missing-point", ["files", "ls", "feedface", "/"], 3, "no restore point",
     _nothing),
    ("files-get-dotdot", ["files", "get", RP, "../../etc/shadow", "--disk", "1", "--to", TMP],
     2, "'..'", _nothing),
    ("files-get-symlink-escape", ["files", "get", RP, "/escapes/up-and-out", "--disk", "1",
                                  "--to", TMP], 2, "outside", _nothing),
    ("files-get-absolute-link-stays-inside", ["files", "get", RP, "/escapes/absolute", "--disk",
                                              "1", "--to", TMP], 3, "no such file", _nothing),
    ("files-get-missing-file", ["files", "get", RP, "/no/such/file", "--disk", "1", "--to",
                                TMP], 3, "no such file", _nothing),
    ("job-bad-time", ["job", "create", "j1", "--vm", VM, "--daily", "25:99"], 2, "", _nothing),
    ("job-bad-weekday", ["job", "create", "j1", "--vm", VM, "--weekly", "funday@02:00"], 2, "",
     _nothing),
    ("job-no-schedule", ["job", "create", "j1", "--vm", VM], 2, "", _nothing),
    ("job-unknown-vm", ["job", "create", "j1", "--vm", "no-such-vm", "--daily", "02:00"], 3,
     "no-such-vm", _nothing),
]


def _state(world: dict[str, Any], profile: Path) -> str:
    """A digest of what must not change: repository files (name, size, mtime), the
    profile's bytes, and vCenter's VMs with their snapshots."""
    h = hashlib.sha256()
    repo = Path(world["doc"]["repository"]["path"])
    for p in sorted(repo.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(repo)} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(Path(world["profile"]).read_bytes())
    session = environment.open_vcenter(load_profile(world["profile"]))
    try:
        view = session.content.viewManager.CreateContainerView(
            session.content.rootFolder, [vim.VirtualMachine], True)
        try:
            for vm in sorted(view.view, key=lambda v: v._moId):
                snaps = vm.snapshot.rootSnapshotList if vm.snapshot else []
                h.update(f"{vm._moId} {vm.name} {len(snaps)}\n".encode())
        finally:
            view.Destroy()
        tasks = session.content.scheduledTaskManager.scheduledTask or []
        h.update(f"tasks {len(tasks)}\n".encode())
    finally:
        session.close()
    return h.hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wrong_input(case: tuple[str, list[str], int, str, Breaker], world: dict[str, Any],
                     tmp_path: Path) -> None:
    name, args, code, fragment, breaker = case
    profile = tmp_path / "profile.json"
    doc = json.loads(json.dumps(world["doc"]))
    write_private(profile, json.dumps(doc))
    env = {"STILLPOINT_PROFILE": str(profile)}
    breaker(doc, profile, env)
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a.replace(RP, world["rp"]).replace(TMP, str(out_dir))
            .replace("{exists}", str(exists)) for a in args]
    before = _state(world, world["profile"])
    result = cli(*argv, env=env, timeout=180)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code, f"{name}: rc {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    errors = [ln for ln in lines if ln.startswith(("stillpoint: error:", "Error:"))
              or "FAILED:" in ln]
    assert len(errors) == 1, f"{name}: expected one error line:\n{result.stderr}"
    assert fragment.lower() in errors[0].lower(), f"{name}: {errors[0]!r}"
    reason = errors[0].split(": ", 2)[-1]
    assert result.stderr.count(reason) == 1, f"{name}: the reason is repeated:\n{result.stderr}"
    assert _state(world, world["profile"]) == before, f"{name} changed something"
    assert exists.read_bytes() == b"keep me"
    assert list(out_dir.iterdir()) == [], f"{name} wrote {list(out_dir.iterdir())}"
    if name == "world-readable-profile":
        assert stat.S_IMODE(profile.stat().st_mode) == 0o644   # refused, not silently fixed
