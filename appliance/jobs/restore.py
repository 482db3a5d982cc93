"""Full-VM restore, top to bottom (DESIGN.md "The restore flow"), and its status.

    read the restore point; decide the name, place and datastore; refuse to replace an
      existing VM unless told (--overwrite)
    restore every disk to a private raw image (each chunk verified by the repository)
    point in time (--until): copy the later restore point's logs into the images
    create the VM from the saved config, with the restore marker in guestinfo, and write
      its disks (jobs/disk_upload.py): an OVF import lease (NFC) on vSAN, vVols and PMEM,
      a datastore PUT read back by SHA-256 on every other datastore              <- from here
                                                                                   on failure
    with --overwrite: destroy the original, give the new VM its name               the new VM
    power on (optional): the agent inside the image runs the post-restore        is destroyed
    procedures at first boot, before the applications start

`restore_status` reads what the agent reported (its result file) from the restored guest.
A VM restored from a restore point taken without the agent has nothing in its image that
reports: its marker says so ("agent": false), and status says so at once (verify --boot
checks such an image from outside).
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import GuestError, StillpointError, UsageError
from appliance.jobs import disk_upload, environment, restore_pitr
from appliance.jobs.point_metadata import PointMetadata
from appliance.profile import GuestAccess, Profile
from appliance.progress import Progress
from appliance.repository import Repository, RestorePoint
from appliance.vsphere import restore_vm as rv
from appliance.vsphere.inventory import datastore_of
from appliance.vsphere.names import display_name
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.vmconfig import restorable_extra_config

MARKER_KEY = "guestinfo.stillpoint.restore"
RESTORED_FROM_KEY = "stillpoint.restoredFrom"
DEFAULT_RESULT_PATH = "/var/log/stillpoint-restore.json"
DEFAULT_LOG_PATH = "/var/log/stillpoint-restore.log"


@dataclass(frozen=True)
class RestoreVMOptions:
    restore_point: str
    name: str | None = None
    folder: str | None = None
    pool: str | None = None
    host: str | None = None
    datastore: str | None = None
    network_map: dict[str, str] = field(default_factory=dict)
    disconnect_nics: bool = False
    power_on: bool = False
    until: str | None = None
    overwrite: bool = False
    keep_identity: bool = False     # a new VM with the saved BIOS/instance UUIDs and MACs
    extra_config: dict[str, str] = field(default_factory=dict)   # e.g. the sandbox mark
    workdir: Path | None = None
    upload: str = "auto"            # disk_upload.METHODS: by the datastore's type


@dataclass
class RestoreVMResult:
    vm: str
    moref: str
    restore_point: str
    source_vm: str
    disks: list[dict[str, Any]] = field(default_factory=list)
    powered_on: bool = False
    until: str | None = None
    pitr_source: str | None = None
    replaced: str | None = None
    marker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def restorable_writers(rp: RestorePoint) -> dict[str, dict[str, Any]]:
    return PointMetadata.of(rp).restorable_writers()


def agent_in_image(rp: RestorePoint) -> bool:
    """Whether the image holds the agent and its post-restore hook (a restore point taken
    with the agent off has neither)."""
    return PointMetadata.of(rp).agent_in_image


def restore_marker(rp: RestorePoint, pitr: dict[str, dict[str, Any]] | None = None,
                   ) -> dict[str, Any]:
    """What the agent reads at first boot (agent_payload/linux/stillpoint_agent/restore.py);
    "agent": false tells `restore status` that no agent in the image will read it."""
    writers = {}
    for name, res in restorable_writers(rp).items():
        if res.get("kind") not in ("filesystem", "hooks"):
            entry = dict(res)
            if pitr and name in pitr:
                entry["pitr"] = pitr[name]
            writers[name] = entry
    return {"restore_point": rp.id, "agent": agent_in_image(rp), "writers": writers}


def is_windows(rp: RestorePoint) -> bool:
    return PointMetadata.of(rp).is_windows


def is_domain_controller(rp: RestorePoint) -> bool:
    ad = PointMetadata.of(rp).writer_docs().get("active-directory") or {}
    return bool(ad) and not any(isinstance(c, dict) and c.get("domain_controller") is False
                                for c in ad.get("components", []))


def windows_restore_marker(rp: RestorePoint, restore_id: str) -> dict[str, Any]:
    """What the Windows agent reads at first boot (agent_payload/windows/lib/Restore.ps1):
    the writers' metadata as stored with the restore point, plus the thaw facts."""
    meta = PointMetadata.of(rp)
    writers: dict[str, Any] = meta.writer_docs()
    for name, facts in meta.results().items():
        writers[name] = {**writers.get(name, {}), **facts}
    return {"restore_point": rp.id, "restore_id": restore_id, "ad_mode": "auto",
            "sql_checkdb": False, "writers": writers}


def run_restore_vm(opts: RestoreVMOptions, repo: Repository, session: VSphereSession,
                   progress: Progress) -> RestoreVMResult:
    started = time.monotonic()
    rp = repo.get(opts.restore_point)
    saved = PointMetadata.of(rp).vm_config
    name = opts.name or display_name(saved.get("name") or "") or rp.vm.name
    existing = rv.find_vm_by_name(session, name)
    if existing is not None and not opts.overwrite:
        state = rv.vm_power_state(session, existing)
        raise UsageError(f"a VM named {name} exists ({existing._moId}, {state}): restore "
                         "beside it with --name NEW, or replace it with --overwrite")
    datastore = opts.datastore or _saved_datastore(saved)
    where = rv.find_placement(session, source_vm=existing, datastore=datastore,
                              folder=opts.folder, pool=opts.pool, host=opts.host)
    pitr = restore_pitr.plan(repo, rp, opts.until) if opts.until else None
    # With --overwrite the new VM is made under a temporary name and takes over the name
    # only once it is complete: the original is never gone before its replacement exists.
    build_name = f"{name}.stillpoint-restoring" if existing is not None else name
    if rv.find_vm_by_name(session, build_name) is not None:
        raise UsageError(f"a VM named {build_name} exists (left by an interrupted restore?)")
    result = RestoreVMResult(vm=name, moref="", restore_point=rp.id, source_vm=rp.vm.name,
                             until=opts.until, pitr_source=pitr.source.id if pitr else None)
    disconnect_nics = opts.disconnect_nics
    if is_windows(rp):
        if opts.until:
            raise UsageError("--until is for PostgreSQL and MariaDB restore points")
        marker = windows_restore_marker(rp, secrets.token_hex(8))
        if is_domain_controller(rp) and not disconnect_nics:
            # A restored DC must never replicate before its non-authoritative restore ran
            # (USN rollback): its NICs stay disconnected until the agent has reported.
            disconnect_nics = True
            progress.event(f"{name}: a domain controller: its NICs start disconnected; connect "
                           "them after 'stillpoint restore status' reports the AD restore")
    else:
        marker = restore_marker(rp, pitr.marker if pitr else None)
    result.marker = marker
    extra = {MARKER_KEY: json.dumps(marker, sort_keys=True), RESTORED_FROM_KEY: rp.id,
             **opts.extra_config}
    keep_identity = existing is not None or opts.keep_identity
    _say_identity(progress, name, saved, keep_identity, existing is not None)
    spec, disks = rv.build_config_spec(saved, name=build_name, datastore=datastore,
                                       network_map=opts.network_map,
                                       disconnect_nics=disconnect_nics,
                                       keep_identity=keep_identity, extra_config=extra)
    method = disk_upload.choose(session, where, opts.upload, progress.event)
    work = Path(tempfile.mkdtemp(prefix="stillpoint-restore-", dir=opts.workdir))
    work.chmod(0o700)
    try:
        images = _restore_images(repo, rp, disks, work, progress)
        if pitr is not None:
            progress.event(f"point in time {pitr.target.describe()}: logs from restore point "
                           f"{pitr.source.id[:12]} ({pitr.source.time.isoformat()})")
            restore_pitr.apply(repo, pitr, images, progress.event)
        progress.event(f"creating VM {build_name} on {datastore}")
        vm = method.create_and_fill(session, spec, where, disks, images, progress,
                                    result.disks.append)
        try:
            if existing is not None:
                progress.event(f"replacing {name} ({existing._moId})")
                rv.destroy_vm(session, existing)
                rv.rename_vm(session, vm, name)
                result.replaced = existing._moId
            if opts.power_on:
                rv.power_on(session, vm)
                result.powered_on = True
                progress.event(f"{name}: powered on; the agent runs the post-restore "
                               "procedures at first boot")
        except BaseException:
            progress.event(f"restore failed: removing the new VM {build_name}")
            try:
                rv.destroy_vm(session, vm)
            except StillpointError as err:
                progress.event(f"could not remove {build_name} ({vm._moId}): {err}")
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.moref = vm._moId
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _say_identity(progress: Progress, name: str, saved: dict[str, Any], keep: bool,
                  in_place: bool) -> None:
    """What of the source's identity the restored VM carries, said before it is made."""
    _, left = restorable_extra_config(dict(saved.get("extraConfig") or {}))
    how = ("replacing it in place, the VM keeps" if in_place
           else "with --keep-identity, the new VM takes")
    if keep:
        progress.event(f"{name}: {how} the original's BIOS UUID, instance UUID and MAC "
                       "addresses")
    else:
        progress.event(f"{name}: new BIOS UUID, instance UUID and MAC addresses")
    if left:
        progress.event(f"{name}: extraConfig not carried over (not VM configuration): "
                       + ", ".join(left))


def _saved_datastore(saved: dict[str, Any]) -> str:
    for dev in saved.get("devices", []):
        fn = (dev.get("backing") or {}).get("fileName")
        if str(dev.get("_type", "")).endswith("VirtualDisk") and fn:
            return datastore_of(fn)
    raise UsageError("the saved config names no datastore: pass --datastore")


def _restore_images(repo: Repository, rp: RestorePoint, disks: list[rv.RestoredDisk],
                    work: Path, progress: Progress) -> dict[int, Path]:
    images = {}
    for i, d in enumerate(disks):
        record = rp.disk(d.key)
        if record.capacity != d.capacity:
            raise UsageError(f"{d.label}: the config says {d.capacity} bytes, the restore point "
                             f"holds {record.capacity}")
        path = work / f"disk{i}.raw"
        progress.event(f"{d.label}: reading {record.capacity} bytes from the repository")
        repo.restore_disk_to(rp, d.key, path)
        images[d.key] = path
    return images


# --- status ---------------------------------------------------------------------------------


def guest_access_for(profile: Profile, vm: str, source_vm: str | None = None,
                     ) -> GuestAccess:
    """How to reach the restored VM: its own profile entry (the lab adds one when it boots
    the VM), else the source VM's entry (same image: same keys and host key)."""
    access = profile.guests.get(vm) or (profile.guests.get(source_vm) if source_vm else None)
    if access is None:
        raise UsageError(f"the profile has no guest access for {vm}: add it under 'guests' "
                         "(the restored image has the original VM's SSH host key)")
    return access


def agent_paths(access: GuestAccess) -> tuple[str, str]:
    boot = (access.agent or {}).get("boot") or {}
    return (boot.get("result_path") or DEFAULT_RESULT_PATH,
            boot.get("log_path") or DEFAULT_LOG_PATH)


def restored_without_agent(session: VSphereSession | None, vm: str) -> str | None:
    """Why nothing will report from `vm` (its marker says the restore point was taken
    without the agent), or None (an agent is in its image, or we cannot tell)."""
    if session is None:
        return None
    found = rv.find_vm_by_name(session, vm)
    if found is None:
        return None
    try:
        marker = json.loads(rv.vm_extra_config(session, found).get(MARKER_KEY) or "{}")
    except ValueError:
        return None
    if not isinstance(marker, dict) or marker.get("agent") is not False:
        return None
    rp = str(marker.get("restore_point") or "?")[:12]
    return (f"no agent in the image: restore point {rp} was taken with the agent off, so no "
            "post-restore procedure runs and nothing will report; the databases did their "
            f"own crash recovery. Check it with 'stillpoint verify {rp} --boot' (the checks "
            "run from outside)")


def restore_status(profile: Profile, vm: str, source_vm: str | None = None,
                   session: VSphereSession | None = None) -> dict[str, Any]:
    """{"state": "done"|"pending"|"no-agent", "ok", "result", "log", "reason"} from the
    restored guest (with a vCenter session: "no-agent" at once when its image has none)."""
    why = restored_without_agent(session, vm)
    if why is not None:
        return {"vm": vm, "state": "no-agent", "ok": None, "result": None, "log": "",
                "hook_present": False, "reason": why}
    access = guest_access_for(profile, vm, source_vm)
    result_path, log_path = agent_paths(access)
    channel = environment.open_guest_channel(access)
    try:
        got = channel.run(["cat", result_path], timeout=30)
        log = channel.run(["cat", log_path], timeout=30)
        hook = channel.run(["sh", "-c", "ls /etc/stillpoint/boot.d/ 2>/dev/null"], timeout=30)
    finally:
        channel.close()
    log_text = log.stdout.decode("utf-8", "replace") if log.ok else ""
    hook_present = b"stillpoint-restore" in hook.stdout
    if not got.ok:
        return {"vm": vm, "state": "pending", "ok": None, "result": None, "log": log_text,
                "hook_present": hook_present,
                "reason": f"the guest answers; {result_path} is not written yet"
                + ("" if log_text else f" and {log_path} is empty")}
    try:
        doc = json.loads(got.stdout)
    except ValueError as err:
        raise GuestError(f"{vm}: {result_path} is not JSON: {err}") from err
    return {"vm": vm, "state": "done", "ok": bool(doc.get("ok")), "result": doc,
            "log": log_text, "hook_present": hook_present, "reason": ""}


def wait_for_status(profile_loader: Any, vm: str, timeout: float,
                    source_vm: str | None = None, poll: float = 2.0,
                    session: VSphereSession | None = None) -> dict[str, Any]:
    """Poll restore_status until the agent reported (profile reloaded each time: the guest
    access of a freshly booted VM may appear in it meanwhile); at once when the image has
    no agent. A timeout names the newest reason, not the first one seen."""
    why = restored_without_agent(session, vm)
    if why is not None:
        return restore_status(profile_loader(), vm, source_vm, session)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            status = restore_status(profile_loader(), vm, source_vm)
            if status["state"] == "done":
                return status
            last = status.get("reason") or ""
        except StillpointError as err:   # no access in the profile yet, SSH not up yet
            last = str(err)
        time.sleep(poll)
    raise GuestError(f"{vm}: no post-restore result within {timeout:g} s"
                     + (f" (last: {last})" if last else ""))
