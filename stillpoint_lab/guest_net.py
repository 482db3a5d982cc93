"""The lab network: one bridge per lab, one veth pair and network namespace per guest.

Names derive from the lab id so that teardown finds them without any state:
bridge `cfg.bridge` (host address cfg.host_ip/24), host-side veth `sp<lab>h<index>`,
guest-side veth `sp<lab>g<index>` renamed to eth0 inside netns `cfg.netns(vm)`.
"""

from __future__ import annotations

import json
import re

from stillpoint_lab.config import LabConfig
from stillpoint_lab.guest_ns import sh


def host_veth(cfg: LabConfig, index: int) -> str:
    return f"sp{cfg.lab_id}h{index}"


def _links() -> list[str]:
    out = sh(["ip", "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def setup_network(cfg: LabConfig) -> None:
    """Create the lab bridge with the host's address on it (idempotent)."""
    if cfg.bridge not in _links():
        sh(["ip", "link", "add", cfg.bridge, "type", "bridge"])
    addrs = sh(["ip", "-o", "-4", "addr", "show", "dev", cfg.bridge]).stdout
    if f" {cfg.host_ip}/" not in addrs:
        sh(["ip", "addr", "add", f"{cfg.host_ip}/24", "dev", cfg.bridge])
    sh(["ip", "link", "set", cfg.bridge, "up"])


def add_guest_link(cfg: LabConfig, index: int, vm_name: str) -> None:
    """Create netns + veth pair for guest `index`; guest side is eth0 with guest_ip/24."""
    ns = cfg.netns(vm_name)
    host, peer = host_veth(cfg, index), f"sp{cfg.lab_id}g{index}"
    sh(["ip", "netns", "add", ns])
    sh(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
    sh(["ip", "link", "set", peer, "netns", ns])
    sh(["ip", "link", "set", host, "master", cfg.bridge])
    sh(["ip", "link", "set", host, "up"])
    inside = ["ip", "-n", ns]
    sh([*inside, "link", "set", "lo", "up"])
    sh([*inside, "link", "set", peer, "name", "eth0"])
    sh([*inside, "addr", "add", f"{cfg.guest_ip(index)}/24", "dev", "eth0"])
    sh([*inside, "link", "set", "eth0", "up"])
    sh([*inside, "route", "add", "default", "via", cfg.host_ip])


def remove_guest_link(cfg: LabConfig, vm_name: str, index: int | None) -> None:
    if index is not None and host_veth(cfg, index) in _links():
        sh(["ip", "link", "del", host_veth(cfg, index)], check=False)
    if cfg.netns(vm_name) in lab_netns(cfg):
        sh(["ip", "netns", "del", cfg.netns(vm_name)], check=False)


def lab_netns(cfg: LabConfig) -> list[str]:
    out = sh(["ip", "netns", "list"]).stdout
    prefix = cfg.netns("")
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def remove_lab_links(cfg: LabConfig) -> None:
    """Every host veth of this lab, then the bridge (by name pattern, no state needed)."""
    pattern = re.compile(rf"^sp{cfg.lab_id}[hg]\d+$")
    for name in _links():
        if pattern.match(name.split("@")[0]):
            sh(["ip", "link", "del", name.split("@")[0]], check=False)
    if cfg.bridge in _links():
        sh(["ip", "link", "del", cfg.bridge], check=False)
