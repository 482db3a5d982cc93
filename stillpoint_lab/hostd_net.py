"""hostd's share of the lab network.

Network (names derive from the lab id, so teardown needs no state):

    lab bridge      cfg.bridge (spbr<lab>, host address cfg.host_ip/24; setup_network)
    sandbox bridge  spsb<lab>: no address of its own, every port isolated (no VM-to-VM
                    traffic), no IP forwarding from it; the host answers each sandbox VM
                    through a /32 route (src cfg.host_ip). A sandbox VM reaches the host's
                    address (the appliance, the simulator's guestinfo endpoint) and nothing
                    else: not the production guests, even when it is their restored copy.
    taps            sp<lab>t<index>, one per running VM, on one of the two bridges

What a VM reads from its hypervisor (fw_cfg `opt/stillpoint/lab-identity`
{ip_cidr, gateway, authorized_keys} and `opt/stillpoint/guestinfo`) hostd hands to
HostVM.power_on (PowerOnSpec.identity / .guestinfo), which writes the 0600 files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stillpoint_lab.config import LabConfig
from stillpoint_lab.shell import sh

def sandbox_bridge(cfg: LabConfig) -> str:
    return f"spsb{cfg.lab_id}"


def tap_name(cfg: LabConfig, index: int) -> str:
    return f"sp{cfg.lab_id}t{index}"


def _links() -> list[str]:
    out = sh(["ip", "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def setup_network(cfg: LabConfig) -> None:
    """The lab bridge with the host's address on it (idempotent): guests reach the
    simulator and the appliance at cfg.host_ip."""
    if cfg.bridge not in _links():
        sh(["ip", "link", "add", cfg.bridge, "type", "bridge"])
    addrs = sh(["ip", "-o", "-4", "addr", "show", "dev", cfg.bridge]).stdout
    if f" {cfg.host_ip}/" not in addrs:
        sh(["ip", "addr", "add", f"{cfg.host_ip}/24", "dev", cfg.bridge])
    sh(["ip", "link", "set", cfg.bridge, "up"])


def remove_lab_bridge(cfg: LabConfig) -> None:
    if cfg.bridge in _links():
        sh(["ip", "link", "del", cfg.bridge], check=False)


def ensure_bridge(cfg: LabConfig, *, sandbox: bool) -> str:
    """The bridge a VM's tap goes on (created if missing, idempotent); its name."""
    setup_network(cfg)  # the lab bridge always: the sandbox route's src is its address
    if not sandbox:
        return cfg.bridge
    br = sandbox_bridge(cfg)
    if br not in _links():
        sh(["ip", "link", "add", br, "type", "bridge"])
    sh(["ip", "link", "set", br, "up"])
    # Nothing received on the sandbox bridge is routed on (whatever ip_forward says).
    sh(["sysctl", "-qw", f"net.ipv4.conf.{br}.forwarding=0"])
    return br


def add_tap(cfg: LabConfig, index: int, *, sandbox: bool) -> str:
    """A tap for VM `index` on its bridge (an old one of that name is replaced); its name."""
    br = ensure_bridge(cfg, sandbox=sandbox)
    tap = tap_name(cfg, index)
    sh(["ip", "link", "del", tap], check=False)
    sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    sh(["ip", "link", "set", tap, "master", br])
    if sandbox:
        sh(["ip", "link", "set", tap, "type", "bridge_slave", "isolated", "on"])
        sh(["ip", "route", "replace", f"{cfg.guest_ip(index)}/32", "dev", br,
            "src", cfg.host_ip])
    sh(["ip", "link", "set", tap, "up"])
    return tap


def remove_tap(cfg: LabConfig, index: int) -> None:
    """The VM's tap and its sandbox route, if any (idempotent)."""
    sh(["ip", "route", "del", f"{cfg.guest_ip(index)}/32", "dev", sandbox_bridge(cfg)],
       check=False)
    if tap_name(cfg, index) in _links():
        sh(["ip", "link", "del", tap_name(cfg, index)], check=False)


def remove_lab_taps(cfg: LabConfig) -> None:
    """Every tap of this lab and the sandbox bridge (by name pattern: for teardown). The lab
    bridge goes with remove_lab_bridge."""
    pattern = re.compile(rf"^sp{cfg.lab_id}t\d+$")
    for name in _links():
        if pattern.match(name):
            sh(["ip", "link", "del", name], check=False)
    if sandbox_bridge(cfg) in _links():
        sh(["ip", "link", "del", sandbox_bridge(cfg)], check=False)


# --- files -----------------------------------------------------------------------------


def write_private_json(path: Path, doc: object) -> None:
    """Write JSON to a 0600 file atomically (created 0600: never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, sort_keys=True)
    os.replace(tmp, path)


__all__ = [
    "add_tap", "ensure_bridge", "remove_lab_taps", "remove_tap", "sandbox_bridge", "tap_name",
    "write_private_json",
]
