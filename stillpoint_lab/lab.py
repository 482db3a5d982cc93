"""`lab up / status / down`: the simulator and the guests together, and the lab profile.

`lab_up` starts the extended vCenter simulator with one VM per lab guest (plus a Windows VM
without a guest), boots a real Linux guest on each Linux VM's disk, and writes a profile
(0600) that the rest of the CLI uses. `lab_down` removes everything the lab made, by name,
also after a crash of the process that made it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from appliance.errors import LabError
from stillpoint_lab import guest as guest_mod
from stillpoint_lab import hypervisor
from stillpoint_lab import vcsim as vcsim_mod
from stillpoint_lab.config import LabConfig
from appliance.profile import write_private

Say = Callable[[str], None]


@dataclass
class LabHandle:
    config: LabConfig
    vcsim: vcsim_mod.VcsimHandle
    guests: dict[str, guest_mod.GuestHandle]
    profile_path: Path


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, loop devices, mounts)")


def lab_up(cfg: LabConfig, say: Say = lambda _m: None) -> LabHandle:
    require_root()
    if _state_file(cfg).exists():
        raise LabError(f"lab {cfg.lab_id} is already up: run 'stillpoint-lab down' first")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    _state_file(cfg).write_text(json.dumps({"lab_id": cfg.lab_id, "status": "starting"}))
    try:
        return _start(cfg, say)
    except BaseException:
        lab_down(cfg)
        raise


def _start(cfg: LabConfig, say: Say) -> LabHandle:
    say(f"building the vCenter simulator ({vcsim_mod.__name__})")
    vcsim_mod.build_vcsim()
    guest_mod.setup_network(cfg)
    vms = []
    for index, spec in enumerate(cfg.vms):
        disks = []
        for disk_index, disk in enumerate(spec.disks):
            pre, post = (guest_mod.capture_hook_argv(cfg, spec.name, disk_index)
                         if spec.has_guest else ([], []))
            disks.append(vcsim_mod.VcsimDisk(disk.size_mib << 20, tuple(pre), tuple(post)))
        vms.append(vcsim_mod.VcsimVM(
            name=spec.name,
            guest_id=spec.guest_id,
            tools_running=spec.tools_running,
            ip=cfg.guest_ip(index) if spec.has_guest else "",
            hostname=spec.name if spec.has_guest else "",
            disks=tuple(disks),
        ))
    say("starting the vCenter simulator")
    vc = vcsim_mod.start_vcsim(cfg, cfg.state_dir, vms,
                               span_cap_bytes=cfg.cbt_span_cap_mib << 20)
    guests: dict[str, guest_mod.GuestHandle] = {}
    for index, spec in enumerate(cfg.vms):
        if not spec.has_guest:
            continue
        say(f"booting guest {spec.name} at {cfg.guest_ip(index)}")
        disks = [d.flat_file for d in vc.vms[spec.name].disks]
        guests[spec.name] = guest_mod.start_guest(
            cfg, index, spec.name, disks, apps=spec.apps,
            guestinfo_url=f"https://{cfg.host_ip}:{vc.port}/lab/guestinfo", ca_cert=vc.cert_pem_path,
            format_disks=True,
        )
    profile = write_lab_profile(cfg, vc, guests)
    # --- the lab hypervisor: power-on boots a guest from the VM's disk (hypervisor.py) ---
    say("starting the lab hypervisor")
    hypervisor.start_hypervisor(cfg)
    _state_file(cfg).write_text(json.dumps({"lab_id": cfg.lab_id, "status": "up",
                                            "vcsim_pid": vc.pid, "url": vc.url,
                                            "guests": sorted(guests)}))
    say(f"lab {cfg.lab_id} is up; profile: {profile}")
    return LabHandle(cfg, vc, guests, profile)


def write_lab_profile(cfg: LabConfig, vc: vcsim_mod.VcsimHandle,
                      guests: dict[str, guest_mod.GuestHandle]) -> Path:
    secrets_dir = cfg.state_dir / "secrets"
    passphrase_file = secrets_dir / "repository.passphrase"
    write_private(passphrase_file, secrets.token_urlsafe(24))
    write_private(secrets_dir / "vcenter.password", vc.password)
    doc: dict[str, Any] = {
        "vcenter": {
            "host": vc.host, "port": vc.port, "user": vc.user,
            "password_file": str(secrets_dir / "vcenter.password"),
            "thumbprint_sha256": vc.thumbprint_sha256,
            # --transport nbd: the lab has no VDDK; nbdkit's file plugin serves the
            # snapshot's flat file straight from the datastore directory.
            "nbd": {"mode": "file", "datastores": {"LocalDS_0": str(vc.datastore_dir)}},
        },
        "repository": {"path": str(cfg.state_dir / "repository"),
                       "passphrase_file": str(passphrase_file)},
        "guests": {
            name: {
                "transport": "ssh", "host": g.ip, "port": 22, "user": g.ssh_user,
                "key_file": str(g.ssh_key_path), "host_key": g.host_key_line, "sudo": True,
                # Only the VM's disk may be frozen: the lab guest shares the host's root.
                "agent": {"filesystems": {"include": ["/data"]},
                          # The restore log and result on the VM's disk, not the host's /var.
                          "boot": {"log_path": "/data/var/log/stillpoint-restore.log",
                                   "result_path": "/data/var/log/stillpoint-restore.json"}},
            }
            for name, g in guests.items()
        },
        "lab": {"id": cfg.lab_id, "state_dir": str(cfg.state_dir)},
    }
    write_private(cfg.profile_path, json.dumps(doc, indent=2))
    return cfg.profile_path


def lab_agent_config() -> dict[str, Any]:
    """What the agent is told in the lab. Only the VM's disk may be frozen (the guests
    share the host's root file system), and the databases are named rather than discovered
    (the guests share one PID namespace, so discovery would see every guest's servers)."""
    from stillpoint_lab import guest_apps

    return {
        "filesystems": {"include": ["/data"]},
        "postgresql": {"discover": False, "clusters": [{
            "data_dir": guest_apps.PGDATA, "socket_dir": guest_apps.PG_SOCKET_DIR,
            "port": 5432, "os_user": "postgres", "archive_dir": guest_apps.PG_WAL_ARCHIVE}]},
        "mariadb": {"discover": False, "instances": [{
            "socket": guest_apps.MY_SOCKET, "os_user": "mysql", "user": "root"}]},
    }


def lab_status(cfg: LabConfig) -> dict[str, Any]:
    if not _state_file(cfg).exists():
        return {"lab_id": cfg.lab_id, "status": "down"}
    state = json.loads(_state_file(cfg).read_text())
    pid = state.get("vcsim_pid")
    state["vcsim_running"] = bool(pid) and Path(f"/proc/{pid}").exists()
    state["profile"] = str(cfg.profile_path) if cfg.profile_path.exists() else None
    return state


def lab_down(cfg: LabConfig, say: Say = lambda _m: None) -> None:
    """Remove everything the lab made. Idempotent; works after a crash of `lab up`."""
    require_root()
    hypervisor.stop_hypervisor(cfg)  # first: it would boot guests again
    say(f"stopping lab {cfg.lab_id} guests")
    guest_mod.teardown_all(cfg)
    say("stopping the vCenter simulator")
    vcsim_mod.stop_vcsim_by_pidfile(cfg.state_dir)
    if cfg.state_dir.exists():
        shutil.rmtree(cfg.state_dir)
    say(f"lab {cfg.lab_id} is down")


def _state_file(cfg: LabConfig) -> Path:
    return cfg.state_dir / "lab.json"
