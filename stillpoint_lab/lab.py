"""`lab up / status / down`: the simulator, the host agent and the QEMU guests, and the profile.

`lab_up` builds (or takes the cached) guest image, puts a copy of it on the datastore as disk 0
of each Linux VM, starts the extended vCenter simulator and the lab's host agent (hostd, which
runs the QEMU VMs: docs/lab-hypervisor.md), powers the VMs on through the vSphere API as an
administrator would, waits until each guest has booted its own OS and its databases answer,
and writes a profile (0600) that the rest of the CLI uses. `lab_down` removes everything the
lab made, by name, also after a crash of the process that made it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from appliance.errors import LabError
from appliance.profile import write_private
from stillpoint_lab import hostd, hostd_net
from stillpoint_lab import vcsim as vcsim_mod
from stillpoint_lab.config import LabConfig
from stillpoint_lab.guest_vm import (
    LAB_SSH_USER,
    GuestHandle,
    ensure_lab_client_key,
    lab_client_key,
)
from stillpoint_lab.image import layout

Say = Callable[[str], None]
BOOT_TIMEOUT_S = 420     # TCG on 2 shared cores: 15-25 s alone, much more under load


@dataclass
class LabHandle:
    config: LabConfig
    vcsim: vcsim_mod.VcsimHandle
    guests: dict[str, GuestHandle]
    profile_path: Path


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (QEMU, taps on a bridge, loop devices)")


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
    from stillpoint_lab.image.build import ensure_guest_image

    say("building the vCenter simulator")
    vcsim_mod.build_vcsim()
    guest_vms = [s for s in cfg.vms if s.has_guest]
    image = ensure_guest_image(progress=say) if guest_vms else None
    if image is not None:
        say(f"guest image: Debian 12, kernel {image.kernel_release} ({image.recipe_hash[:12]})")
    ensure_lab_client_key(cfg)
    hostd_net.ensure_bridge(cfg, sandbox=False)
    vms = []
    for spec in cfg.vms:
        disks = [vcsim_mod.VcsimDisk(d.size_bytes) for d in spec.disks]
        if spec.has_guest and image is not None:
            disks[0] = vcsim_mod.VcsimDisk(max(image.path.stat().st_size,
                                               spec.disks[0].size_bytes))
        vms.append(vcsim_mod.VcsimVM(
            name=spec.name, folder=spec.folder, guest_id=spec.guest_id, tools_running=spec.tools_running,
            disks=tuple(disks), hypervisor=spec.hypervisor or ("qemu" if spec.has_guest else "files"),
            memory_mib=spec.memory_mib if spec.has_guest else 0,
            cpus=spec.cpus if spec.has_guest else 0))
    say("starting the vCenter simulator")
    vc = vcsim_mod.start_vcsim(cfg, cfg.state_dir, vms, span_cap_bytes=cfg.cbt_span_cap_mib << 20,
                               hostd_socket=hostd.socket_path(cfg))
    for spec in guest_vms:
        if image is not None:
            _place_system_disk(vc.vms[spec.name].disks[0].flat_file, image.path)
    write_lab_profile(cfg, vc, {})
    say("starting the lab's host agent (hostd: the QEMU VMs)")
    hostd.start_hostd(cfg, vcsim_url=vc.base_url(), ca_cert=vc.cert_pem_path,
                      lab_token_file=vc.lab_token_path, profile_path=cfg.profile_path,
                      lab_vms={s.name: i for i, s in enumerate(cfg.vms)})
    for spec in guest_vms:
        say(f"powering on {spec.name} (QEMU, {_accel_name()})")
    if guest_vms:
        power_on(vc, [s.name for s in guest_vms])
    guests: dict[str, GuestHandle] = {}
    for spec in guest_vms:
        t0 = time.monotonic()
        guests[spec.name] = wait_for_guest(cfg, spec.name, apps=spec.apps)
        say(f"{spec.name} booted at {guests[spec.name].ip} in {time.monotonic() - t0:.0f} s")
    profile = write_lab_profile(cfg, vc, guests)
    _state_file(cfg).write_text(json.dumps({"lab_id": cfg.lab_id, "status": "up",
                                            "vcsim_pid": vc.pid, "url": vc.url,
                                            "guests": sorted(guests)}))
    say(f"lab {cfg.lab_id} is up; profile: {profile}")
    return LabHandle(cfg, vc, guests, profile)


def _accel_name() -> str:
    from stillpoint_lab.qemu.accel import accel_argv

    return " ".join(accel_argv())


def _place_system_disk(flat: Path, image: Path) -> None:
    """Disk 0 of a Linux VM, still powered off: the guest image, copied sparsely onto the
    datastore's flat file the simulator made (its capacity stays)."""
    capacity = flat.stat().st_size
    subprocess.run(["cp", "--sparse=always", str(image), str(flat)], check=True)
    os.truncate(flat, capacity)


def power_on(vc: vcsim_mod.VcsimHandle, names: list[str]) -> None:
    """PowerOnVM_Task through the vSphere API, as an administrator would."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVim.task import WaitForTasks
    from pyVmomi import vim

    si = SmartConnect(host=vc.host, port=vc.port, user=vc.user, pwd=vc.password,
                      sslContext=vc.ssl_context())
    try:
        view = si.content.viewManager.CreateContainerView(
            si.content.rootFolder, [vim.VirtualMachine], True)
        try:
            by_name = {vm.name: vm for vm in view.view}
        finally:
            view.Destroy()
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LabError(f"the simulator has no VM {', '.join(missing)}")
        WaitForTasks([by_name[n].PowerOnVM_Task() for n in names], si=si)
    except vim.fault.VimFault as err:
        reason = getattr(err, "msg", None) or str(err)
        raise LabError(f"powering on {', '.join(names)}: {reason}") from err
    finally:
        Disconnect(si)


def wait_for_guest(cfg: LabConfig, vm: str, *, apps: tuple[str, ...] = ("postgresql", "mariadb"),
                   timeout: float = BOOT_TIMEOUT_S, data_mount: str = "/data") -> GuestHandle:
    """Until the VM's guest has booted: its guest agent answered with an address and the
    SSH host key, SSH works with that key pinned, its second disk (if any) is mounted on
    `data_mount` and its databases answer."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = hostd.call(cfg, "/vm/status", {"vm": vm})
        if not status.get("running"):
            raise LabError(f"{vm} is not running: {status}")
        if status.get("host_key") and status.get("ip"):
            break
        time.sleep(1)
    else:
        raise LabError(f"{vm}: its guest did not come up within {timeout:g} s "
                       f"(last status {status}; serial log {serial_log(cfg, vm)})")
    guest = guest_handle(cfg, vm, status, apps=apps)
    guest.wait_ssh(timeout=max(30.0, deadline - time.monotonic()))
    # The data disk is mounted once udev names it, off the boot path (lab-guest-image.md).
    left = int(max(30.0, deadline - time.monotonic()))
    mount = shlex.quote(data_mount)
    if guest.sh(f"[ ! -e /dev/vdb ] || for i in $(seq {left}); do mountpoint -q {mount} && exit 0;"
                f" sleep 1; done; mountpoint -q {mount}", timeout=left + 30).returncode != 0:
        raise LabError(f"{vm}: its data disk was not mounted on {data_mount} within {left} s")
    guest.wait_apps(timeout=max(60.0, deadline - time.monotonic()))
    return guest


def guest_handle(cfg: LabConfig, vm: str, status: dict[str, Any] | None = None, *,
                 apps: tuple[str, ...] = ("postgresql", "mariadb")) -> GuestHandle:
    """A handle on the running guest of `vm` (what hostd learned from its guest agent)."""
    status = status or hostd.call(cfg, "/vm/status", {"vm": vm})
    if not status.get("running") or not status.get("host_key"):
        raise LabError(f"no running lab guest for VM {vm}: {status}")
    return GuestHandle(cfg=cfg, index=int(status.get("index") or 0), name=vm, ip=status["ip"],
                       ssh_user=LAB_SSH_USER, ssh_key_path=lab_client_key(cfg),
                       host_key_line=status["host_key"], state_dir=cfg.state_dir / "guests" / vm,
                       apps=apps)


def boot_scratch_vm(cfg: LabConfig, name: str, disks: list[Path], *, sandbox: bool = True,
                    apps: tuple[str, ...] = ("postgresql", "mariadb"),
                    timeout: float = BOOT_TIMEOUT_S, memory_mib: int = 1024,
                    guestinfo: dict[str, str] | None = None,
                    data_mount: str = "/data") -> GuestHandle:
    """Boot disk files (e.g. restored images, the appliance) as a VM hostd runs outside
    the inventory; isolated like SureBackup's lab unless `sandbox=False`; `guestinfo`
    reaches it as a VM's guestinfo.* extraConfig does. Remove it with `remove_scratch_vm`."""
    mac = "02:%02x:%02x:%02x:%02x:%02x" % tuple(secrets.token_bytes(5))
    hostd.call(cfg, "/vm/power-on", {
        "vm": name, "mac": mac, "memory_mib": memory_mib, "cpus": 2, "sandbox": sandbox,
        "guestinfo": dict(guestinfo or {}),
        "disks": [{"key": 2000 + i, "flat": str(Path(d).resolve())}
                  for i, d in enumerate(disks)]}, timeout=120)
    return wait_for_guest(cfg, name, apps=apps, timeout=timeout, data_mount=data_mount)


def remove_scratch_vm(cfg: LabConfig, name: str) -> None:
    """Power a scratch VM off and drop hostd's state of it (idempotent)."""
    hostd.call(cfg, "/vm/forget", {"vm": name}, timeout=120)


def serial_log(cfg: LabConfig, vm: str) -> Path:
    return hostd.vm_dir(cfg, vm) / "serial.log"


def write_lab_profile(cfg: LabConfig, vc: vcsim_mod.VcsimHandle,
                      guests: dict[str, GuestHandle]) -> Path:
    secrets_dir = cfg.state_dir / "secrets"
    passphrase_file = secrets_dir / "repository.passphrase"
    if not passphrase_file.exists():
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
                "agent": lab_agent_config(),
            }
            for name, g in guests.items()
        },
        "lab": {"id": cfg.lab_id, "state_dir": str(cfg.state_dir)},
    }
    write_private(cfg.profile_path, json.dumps(doc, indent=2))
    return cfg.profile_path


def lab_agent_config() -> dict[str, Any]:
    """What the agent is told in the lab: a whole Debian system of its own, so it discovers
    the databases and freezes every local file system (the root included) like on any VM;
    its post-restore unit is a real systemd unit in the image."""
    return {
        "filesystems": {"allow_root": True},
        "postgresql": {"discover": True},
        "mariadb": {"discover": True},
        "boot": {"systemd_dir": "/etc/systemd/system"},
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
    from stillpoint_lab.qemu.machine import kill_all, process_title

    require_root()
    say(f"stopping lab {cfg.lab_id}'s VMs and its host agent")
    hostd.stop_hostd(cfg)                        # powers its VMs off (QMP quit)
    kill_all(process_title(hostd.qemu_lab_name(cfg), ""))   # anything a crash left
    hostd_net.remove_lab_taps(cfg)
    say("stopping the vCenter simulator")
    vcsim_mod.stop_vcsim_by_pidfile(cfg.state_dir)
    _remove_bridges(cfg)
    if cfg.state_dir.exists():
        shutil.rmtree(cfg.state_dir)
    say(f"lab {cfg.lab_id} is down")


def _remove_bridges(cfg: LabConfig) -> None:
    hostd_net.remove_lab_bridge(cfg)
    hostd_net.remove_lab_taps(cfg)          # the sandbox bridge too


def _state_file(cfg: LabConfig) -> Path:
    return cfg.state_dir / "lab.json"


__all__ = ["LabHandle", "boot_scratch_vm", "guest_handle", "remove_scratch_vm", "lab_down", "lab_status", "lab_up", "layout",
           "power_on", "serial_log", "wait_for_guest", "write_lab_profile"]
