"""The lab's "hypervisor": powering on a VM in the simulator boots a lab guest from its disk.

The simulator only flips `runtime.powerState`. This background process
(`stillpoint-lab-hypervisor`, started by `lab up`, pid file
`<state_dir>/hypervisor/hypervisor.pid`) watches the simulator's VMs through the vSphere API
and, for each VM that is powered on, is not one of the lab's own VMs (those are booted by
`lab up`), has no guest yet and whose disk 0 holds a file system, boots a lab guest
(`guest.start_guest(..., format_disks=False)`) on that VM's flat disk files with guest index
FIRST_INDEX+ (addresses <subnet>.30+). The guest reads the VM's guestinfo.* (extraConfig),
so the agent inside a restored image finds its restore marker at boot, before the databases
start. Power off (or destroy) stops the guest.

Sandboxes: a VM with extraConfig `stillpoint.sandbox` set is isolated: inside its network
namespace only the host's address (the appliance and the simulator's guestinfo endpoint) is
routed; the rest of the lab subnet, including the original VM's address, and the default
route are removed (applied as soon as the namespace exists, before the boot hook runs).

For each guest it runs, it writes `<state_dir>/hypervisor/<vm>.json` (index, ip, host key,
boot result or error) and adds the VM's guest access to the lab profile, as an operator
would after a restore.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.errors import LabError, StillpointError
from stillpoint_lab import guest as guest_mod
from stillpoint_lab.config import REPO_ROOT, LabConfig
from stillpoint_lab.guest_net import lab_netns
from stillpoint_lab.guest_ns import guests_dir, sh
from appliance.profile import write_private

PROCESS_NAME = "stillpoint-lab-hypervisor"
FIRST_INDEX = 20
POLL_S = 1.0
SANDBOX_KEY = "stillpoint.sandbox"
log = logging.getLogger(__name__)


def state_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "hypervisor"


def guest_record(cfg: LabConfig, vm: str) -> dict[str, Any] | None:
    """What the hypervisor wrote about the guest of `vm` (None: it runs none)."""
    try:
        return dict(json.loads((state_dir(cfg) / f"{vm}.json").read_text()))
    except (OSError, ValueError):
        return None


def wait_for_guest(cfg: LabConfig, vm: str, timeout: float = 300) -> dict[str, Any]:
    """Block until the guest of `vm` booted (or failed to); returns its record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = guest_record(cfg, vm)
        if rec and rec.get("status") in ("running", "failed"):
            return rec
        time.sleep(0.2)
    raise LabError(f"no lab guest booted for VM {vm} within {timeout:g} s")


def guest_handle(cfg: LabConfig, vm: str) -> guest_mod.GuestHandle:
    """A handle on the running guest of `vm` (to run commands in it, e.g. checks)."""
    rec = guest_record(cfg, vm)
    if not rec or rec.get("status") != "running":
        raise LabError(f"no running lab guest for VM {vm}: {rec}")
    from stillpoint_lab.guest_ns import guest_dir, mntns_path
    from stillpoint_lab.guest_ssh import SSH_USER, client_key_path

    return guest_mod.GuestHandle(
        cfg=cfg, index=int(rec["index"]), name=vm, netns=cfg.netns(vm), ip=rec["ip"],
        ssh_user=SSH_USER, ssh_key_path=client_key_path(cfg), host_key_line=rec["host_key"],
        host_key_sha256="", mntns_path=mntns_path(cfg, vm), state_dir=guest_dir(cfg, vm))


# --- the process -----------------------------------------------------------------------------


def start_hypervisor(cfg: LabConfig) -> int:
    """Start the background process for lab `cfg` (called by lab_up); returns its pid."""
    d = state_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "hypervisor.log", "ab") as out:
        proc = subprocess.Popen(
            [PROCESS_NAME, "-m", "stillpoint_lab.hypervisor", "run", str(cfg.lab_id),
             json.dumps([v.name for v in cfg.vms])],
            executable=sys.executable, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO_ROOT),
            # argv[0] is our name, so Python cannot find the venv from it: pass its paths.
            env={**os.environ, "STILLPOINT_LAB_DIR": cfg.lab_root, "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *(p for p in sys.path if p.endswith("-packages"))])})
    (d / "hypervisor.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _is_ours(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0.decode(errors="replace")) == PROCESS_NAME


def stop_hypervisor(cfg: LabConfig) -> None:
    """Stop the process (checked by its argv[0]); its guests are removed by lab teardown."""
    pidfile = state_dir(cfg) / "hypervisor.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if _is_ours(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _is_ours(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


class Hypervisor:
    """The watch loop; one boot/stop thread per VM at a time."""

    def __init__(self, cfg: LabConfig, lab_vms: set[str]) -> None:
        self.cfg = cfg
        self.lab_vms = lab_vms
        self.busy: dict[str, threading.Thread] = {}
        self.skipped: set[str] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.profile = json.loads(cfg.profile_path.read_text())
        self.session: Any = None

    def _connect(self) -> Any:
        from appliance.jobs import environment
        from appliance.profile import load_profile

        return environment.open_vcenter(load_profile(self.cfg.profile_path))

    def run(self) -> None:
        from pyVmomi import vim

        from appliance.vsphere.props import view_properties

        self.session = self._connect()
        try:
            while not self.stop.is_set():
                try:
                    # Only name and power state each round; the rest when booting one.
                    vms = view_properties(self.session, self.session.content.rootFolder,
                                          vim.VirtualMachine, ["name", "runtime.powerState"])
                except StillpointError as err:
                    log.warning("listing VMs failed: %s", err)
                    self.stop.wait(2)
                    continue
                self._reconcile({p.get("name", ""): p for p in vms.values()})
                self.stop.wait(POLL_S)
        finally:
            for t in list(self.busy.values()):
                t.join(timeout=60)
            self.session.close()

    def _reconcile(self, vms: dict[str, dict[str, Any]]) -> None:
        ours = {p.stem for p in state_dir(self.cfg).glob("*.json")}
        for name, props in vms.items():
            if name in self.lab_vms or not name:
                continue
            on = str(props.get("runtime.powerState")) == "poweredOn"
            if on and name not in ours and name not in self.skipped:
                self._spawn(name, self._boot, props)
            elif not on:
                self.skipped.discard(name)
                if name in ours:
                    self._spawn(name, self._halt)
        for name in ours - set(vms):
            self._spawn(name, self._halt)

    def _spawn(self, name: str, fn: Any, *args: Any) -> None:
        t = self.busy.get(name)
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=fn, args=(name, *args), name=f"hv-{name}", daemon=True)
        self.busy[name] = t
        t.start()

    def _flat_files(self, props: dict[str, Any]) -> list[Path]:
        hw = props.get("config.hardware")
        files = []
        for dev in hw.device if hw else []:
            fn = getattr(getattr(dev, "backing", None), "fileName", None)
            if fn and fn.endswith(".vmdk") and hasattr(dev, "capacityInKB"):
                rel = fn.split("] ", 1)[1]
                files.append(self.cfg.state_dir / "vcsim" / "datastore" /
                             (rel[:-len(".vmdk")] + "-flat.vmdk"))
        return files

    def _free_index(self) -> int:
        used = set()
        for meta in guests_dir(self.cfg).glob("*/guest.json"):
            try:
                used.add(int(json.loads(meta.read_text())["index"]))
            except (OSError, ValueError, KeyError):
                continue
        for rec in state_dir(self.cfg).glob("*.json"):
            try:
                used.add(int(json.loads(rec.read_text())["index"]))
            except (OSError, ValueError, KeyError):
                continue
        index = FIRST_INDEX
        while index in used:
            index += 1
        return index

    def _boot(self, name: str, props: dict[str, Any]) -> None:
        from appliance.vsphere.props import retrieve_one

        try:
            props = dict(props, **retrieve_one(self.session, props["obj"],
                                               ["config.hardware", "config.extraConfig"]))
        except StillpointError as err:
            log.warning("%s: cannot read its configuration: %s", name, err)
            return
        disks = self._flat_files(props)
        if not disks or not disks[0].is_file() or not guest_mod._has_ext4(disks[0]):
            log.info("%s: powered on, disk 0 holds no file system: no guest", name)
            self.skipped.add(name)
            return
        extra = {o.key: str(o.value) for o in props.get("config.extraConfig") or []}
        sandbox = SANDBOX_KEY in extra
        with self.lock:
            index = self._free_index()
            record = {"vm": name, "index": index, "ip": self.cfg.guest_ip(index),
                      "sandbox": sandbox, "status": "booting", "started": time.time()}
            self._write_record(name, record)
        log.info("%s: powered on: booting guest %d at %s%s", name, index, record["ip"],
                 " (isolated sandbox)" if sandbox else "")
        isolating = None
        if sandbox:
            isolating = threading.Thread(target=self._isolate_when_up, args=(name,), daemon=True)
            isolating.start()
        url = f"https://{self.cfg.host_ip}:{self.profile['vcenter']['port']}/lab/guestinfo"
        try:
            handle = guest_mod.start_guest(
                self.cfg, index, name, disks, apps=("postgresql", "mariadb"),
                guestinfo_url=url, ca_cert=self.cfg.state_dir / "vcsim" / "cert.pem",
                format_disks=False)
        except StillpointError as err:
            log.warning("%s: guest failed to boot: %s", name, err)
            record.update(status="failed", error=str(err))
            self._write_record(name, record)
            return
        if sandbox:
            isolate(self.cfg, name)
        record.update(status="running", boot_ok=handle.boot_ok, host_key=handle.host_key_line,
                      booted=time.time())
        self._write_record(name, record)
        self._publish_access(name, handle)
        log.info("%s: guest up at %s (boot hooks ok: %s)", name, handle.ip, handle.boot_ok)

    def _isolate_when_up(self, name: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.cfg.netns(name) in lab_netns(self.cfg):
                try:
                    isolate(self.cfg, name)
                    return
                except LabError:
                    pass        # eth0 not there yet
            time.sleep(0.02)

    def _halt(self, name: str) -> None:
        log.info("%s: powered off or gone: stopping its guest", name)
        guest_mod.stop_guest(self.cfg, name)
        (state_dir(self.cfg) / f"{name}.json").unlink(missing_ok=True)
        self._unpublish_access(name)

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        path = state_dir(self.cfg) / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _publish_access(self, name: str, handle: guest_mod.GuestHandle) -> None:
        with self.lock:
            doc = json.loads(self.cfg.profile_path.read_text())
            template: dict[str, Any] = next(iter(doc.get("guests", {}).values()), {})
            doc.setdefault("guests", {})[name] = {
                "transport": "ssh", "host": handle.ip, "port": 22, "user": handle.ssh_user,
                "key_file": str(handle.ssh_key_path), "host_key": handle.host_key_line,
                "sudo": True, "agent": template.get("agent", {})}
            write_private(self.cfg.profile_path, json.dumps(doc, indent=2))

    def _unpublish_access(self, name: str) -> None:
        with self.lock:
            doc = json.loads(self.cfg.profile_path.read_text())
            if doc.get("guests", {}).pop(name, None) is not None:
                write_private(self.cfg.profile_path, json.dumps(doc, indent=2))


def isolate(cfg: LabConfig, vm: str) -> None:
    """Only the host's address stays routed in the guest's namespace (idempotent)."""
    ns = ["ip", "-n", cfg.netns(vm)]
    sh([*ns, "route", "replace", f"{cfg.host_ip}/32", "dev", "eth0"])
    for route in (["default"], [f"{cfg.subnet_prefix}.0/24"]):
        sh([*ns, "route", "del", *route], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROCESS_NAME)
    parser.add_argument("command", choices=["run"])
    parser.add_argument("lab_id", type=int)
    parser.add_argument("lab_vms", help="JSON list of the lab's own VM names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from stillpoint_lab.config import default_config

    cfg = LabConfig(lab_id=args.lab_id, vms=default_config(0, args.lab_id).vms)
    hv = Hypervisor(cfg, set(json.loads(args.lab_vms)))
    signal.signal(signal.SIGTERM, lambda *_: hv.stop.set())
    hv.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
