"""The appliance image that packer builds (stillpoint_lab/appliance_image.py): it boots, and
it is the appliance provision.sh promises.

The image (from the cache, or built now: a real `packer build -only=qemu.lab`, tens of
minutes under TCG) is booted from sparse copies of its two disks with plain QEMU: user-mode
network with SSH forwarded on 127.0.0.1, the lab's fw_cfg identity carrying a key made for
this test, qemu-guest-agent on a unix socket. The SSH host key, made by the VM at its first
boot, is read through the guest agent (`guest-file-read`), the hypervisor's channel, and
pinned: the network is never trusted for it. Then, over that one SSH connection (the
appliance's firewall rate-limits new SSH connections): the CLI, the units, the service
user, the repository disk, no lab code, guestinfo through the lab's vmware-rpctool.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2 * 3600)]

BOOT_TIMEOUT_S = 600      # TCG on a loaded 2-core machine: 30 s to several minutes
GUESTINFO_KEY = "guestinfo.stillpoint.lab-check"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (packer, QEMU, the guest image's loop devices)")


# --- the booted appliance --------------------------------------------------------------


@dataclass
class Booted:
    image: Any
    ssh: paramiko.SSHClient
    boot_s: float              # QEMU start → the boot banner on the serial console
    ssh_s: float               # QEMU start → SSH logged in
    machine_id: str
    host_key_line: str
    guestinfo_value: str
    serial_log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_banner(serial: Path, proc: subprocess.Popen[bytes], deadline: float) -> str:
    from stillpoint_lab.image import layout

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {proc.returncode}")
        text = serial.read_text(errors="replace") if serial.exists() else ""
        for line in text.splitlines():
            # after a serial getty's prompt, on its line, when that came first
            if (at := line.find(layout.BOOT_BANNER + " ")) >= 0:
                return line[at:]
        time.sleep(0.5)
    tail = serial.read_text(errors="replace")[-3000:] if serial.exists() else "(none)"
    raise AssertionError(f"no boot banner within {BOOT_TIMEOUT_S} s; serial:\n{tail}")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    _need_root()
    from stillpoint_lab import appliance_image
    from stillpoint_lab.image import layout
    from stillpoint_lab.qemu.accel import accel_argv
    from stillpoint_lab.qemu.qga import QGA

    image = appliance_image.ensure_appliance_image(progress=lambda m: print(f"  {m}",
                                                                           flush=True))
    tmp = tmp_path_factory.mktemp("appliance")
    system, repo = tmp / "system.raw", tmp / "repository.raw"
    for src, dst in ((image.path, system), (image.repository_path, repo)):
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    key = tmp / "test-key"
    public = appliance_image.new_ssh_key(key, "stillpoint-appliance-test")
    identity = appliance_image.write_identity(tmp / "identity.json", public,
                                              hostname="stillpoint-test")
    guestinfo_value = secrets.token_hex(8)
    guestinfo = tmp / "guestinfo.json"
    guestinfo.write_text(json.dumps({GUESTINFO_KEY: guestinfo_value}))
    guestinfo.chmod(0o600)
    port = _free_port()
    serial, qga_sock = tmp / "serial.log", tmp / "qga.sock"
    argv = ["qemu-system-x86_64", "-machine", "pc", *accel_argv(), "-smp", "2", "-m", "1536",
            "-nodefaults", "-display", "none", "-serial", f"file:{serial}",
            "-drive", f"file={system},format=raw,if=virtio,discard=unmap",
            "-drive", f"file={repo},format=raw,if=virtio,discard=unmap",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-fw_cfg", f"name={layout.FW_CFG_IDENTITY},file={identity}",
            "-fw_cfg", f"name={layout.FW_CFG_GUESTINFO},file={guestinfo}",
            "-chardev", f"socket,id=qga0,path={qga_sock},server=on,wait=off",
            "-device", "virtio-serial",
            "-device", f"virtserialport,chardev=qga0,name={layout.QGA_PORT_NAME}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "qemu.stderr", "wb"))  # noqa: SIM115
    ssh: paramiko.SSHClient | None = None
    try:
        deadline = t0 + BOOT_TIMEOUT_S
        banner = _wait_banner(serial, proc, deadline)
        boot_s = time.monotonic() - t0
        machine_id = banner.split("machine-id=")[1].split()[0]
        agent = QGA(qga_sock)
        try:
            while not agent.ping(timeout=3):
                assert time.monotonic() < deadline, "the guest agent does not answer"
                time.sleep(1)
            host_pub = agent.file_read(layout.SSH_HOST_KEY_PUB).decode().split()
        finally:
            agent.close()
        kind, blob = host_pub[0], host_pub[1]
        ssh = paramiko.SSHClient()
        ssh.get_host_keys().add(f"[127.0.0.1]:{port}", kind,
                                paramiko.PKey.from_type_string(kind, base64.b64decode(blob)))
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        ssh.connect("127.0.0.1", port=port, username=layout.SSH_USER, key_filename=str(key),
                    look_for_keys=False, allow_agent=False, timeout=30, banner_timeout=60,
                    auth_timeout=60)
        ssh_s = time.monotonic() - t0
        print(f"  appliance booted in {boot_s:.1f} s (banner), SSH after {ssh_s:.1f} s",
              flush=True)
        yield Booted(image=image, ssh=ssh, boot_s=boot_s, ssh_s=ssh_s, machine_id=machine_id,
                     host_key_line=f"{kind} {blob}", guestinfo_value=guestinfo_value,
                     serial_log=serial)
    finally:
        if ssh is not None:
            ssh.close()
        proc.kill()
        proc.wait(30)


def _run(b: Booted, command: str, timeout: float = 60) -> tuple[int, str, str]:
    _, out, err = b.ssh.exec_command(command, timeout=timeout)
    stdout, stderr = out.read().decode(), err.read().decode()
    return out.channel.recv_exit_status(), stdout, stderr


def _ok(b: Booted, command: str) -> str:
    """stdout of a command that must succeed (stderr may hold sudo's warning that the host
    name the lab gave is not in /etc/hosts)."""
    rc, stdout, stderr = _run(b, command)
    assert rc == 0, f"{command}: exit {rc}: {stdout}{stderr}"
    return stdout.strip()


# --- the checks ------------------------------------------------------------------------


def test_image_is_two_sparse_flat_disks(booted: Booted) -> None:
    meta = booted.image.meta
    assert meta["system_size_bytes"] >= 4 << 30
    assert meta["system_allocated_bytes"] < meta["system_size_bytes"] * 0.7   # still sparse
    assert meta["repository_allocated_bytes"] < 256 << 20
    assert meta["packer"].startswith("Packer v")
    with open(booted.image.path, "rb") as f:
        head = f.read(512)
    assert head[510:512] == b"\x55\xaa"        # an MBR: a raw disk, not a qcow2


def test_boots_with_its_own_host_key_and_machine_id(booted: Booted) -> None:
    # The host key SSH verified is the one the agent read; it was made at this boot.
    fp = booted.ssh.get_transport().get_remote_server_key()   # type: ignore[union-attr]
    assert f"{fp.get_name()} {fp.get_base64()}" == booted.host_key_line
    assert _ok(booted, "cat /etc/machine-id") == booted.machine_id
    assert _ok(booted, "hostname") == "stillpoint-test"     # the lab's identity names it
    assert _ok(booted, "cat /etc/hostname") == "stillpoint"
    assert _ok(booted, "id -un") == "splab"
    assert _ok(booted, "sudo -n id -u") == "0"
    # Nothing failed at boot (nftables, the units provision.sh installed, ssh, ...).
    assert _ok(booted, "systemctl --failed --no-legend --plain") == ""


def test_stillpoint_is_installed_with_its_units_and_user(booted: Booted) -> None:
    assert _ok(booted, "stillpoint --version").startswith("stillpoint, version ")
    assert _ok(booted, "/opt/stillpoint/venv/bin/stillpoint --version").startswith(
        "stillpoint, version ")
    enabled = _ok(booted, "systemctl is-enabled stillpoint-serve stillpoint-firstboot "
                          "nftables").split()
    assert enabled == ["enabled"] * 3
    # Not configured yet: first boot found no guestinfo.stillpoint.vcenter and said so;
    # serve waits for /etc/stillpoint/profile.json.
    assert _ok(booted, "systemctl is-active stillpoint-firstboot") == "active"
    journal = _ok(booted, "sudo journalctl -b -u stillpoint-firstboot --no-pager -o cat")
    assert "no guestinfo.stillpoint.vcenter" in journal
    _, state, _ = _run(booted, "systemctl is-active stillpoint-serve")
    assert state.strip() == "inactive"
    # First boot logs in to vCenter: it starts once the network is up, not before.
    assert _ok(booted, "systemctl is-active systemd-networkd-wait-online") == "active"
    online = int(_ok(booted, "systemctl show -P ActiveEnterTimestampMonotonic "
                             "systemd-networkd-wait-online"))
    started = int(_ok(booted, "systemctl show -P ExecMainStartTimestampMonotonic "
                              "stillpoint-firstboot"))
    assert 0 < online <= started
    passwd = _ok(booted, "getent passwd stillpoint").split(":")
    assert passwd[5:] == ["/var/lib/stillpoint", "/usr/sbin/nologin"]
    assert _ok(booted, "stat -c '%U %a' /var/lib/stillpoint") == "stillpoint 750"
    assert " L " in _ok(booted, "sudo passwd -S stillpoint-admin")
    sshd = _ok(booted, "sudo sshd -T")
    assert "passwordauthentication no" in sshd and "permitrootlogin no" in sshd
    ruleset = _ok(booted, "sudo nft list chain inet filter input")
    assert "policy drop" in ruleset and "tcp dport 22" in ruleset
    # The lab guest's databases are not part of the appliance.
    assert _run(booted, "dpkg-query -W postgresql-15 mariadb-server")[0] != 0


def test_no_lab_code_is_shipped(booted: Booted) -> None:
    for path in ("/opt/stillpoint/src/stillpoint_lab", "/opt/stillpoint/src/tests",
                 "/opt/stillpoint/src/bench", "/opt/stillpoint/venv/bin/stillpoint-lab"):
        assert _run(booted, f"test -e {path}")[0] != 0, f"{path} is in the appliance"
    assert _ok(booted, "test -d /opt/stillpoint/src/agent_payload/linux && echo ok") == "ok"
    assert _run(booted, "command -v stillpoint-lab")[0] != 0
    rc, _, err = _run(booted, "/opt/stillpoint/venv/bin/python -c 'import stillpoint_lab'")
    assert rc != 0 and "ModuleNotFoundError" in err


def test_repository_disk_is_mounted(booted: Booted) -> None:
    assert _ok(booted, "sudo blkid -o value -s LABEL /dev/vdb") == "stillpoint-repo"
    src = _ok(booted, "findmnt -n -o SOURCE,FSTYPE /var/lib/stillpoint/repository").split()
    assert src == ["/dev/vdb", "ext4"]
    assert _run(booted, "findmnt /data")[0] != 0      # not a lab guest's data disk
    free = int(_ok(booted, "df --output=avail -B1 / | tail -1"))
    assert free > 1 << 30, f"only {free >> 20} MiB free on the system disk"


def test_guestinfo_comes_from_the_lab_hypervisor(booted: Booted) -> None:
    # stillpoint-setup --from-guestinfo asks vmware-rpctool: in the lab that is the image's
    # reader of fw_cfg opt/stillpoint/guestinfo, kept when provision.sh installs open-vm-tools.
    value = _ok(booted, f"sudo vmware-rpctool 'info-get {GUESTINFO_KEY}'")
    assert value == booted.guestinfo_value
    diversion = _ok(booted, "dpkg-divert --list /usr/bin/vmware-rpctool")
    assert "/usr/bin/vmware-rpctool.open-vm-tools" in diversion
