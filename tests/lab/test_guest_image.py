"""The lab's guest image boots in plain QEMU and is what the lab expects of it.

One VM for the module, booted twice (a reboot of the same disk at the end): a sparse copy of
the cached image (`ensure_guest_image()`, built if needed), TCG, slirp on loopback with
hostfwd for SSH, PostgreSQL and MariaDB (the lab itself uses taps), the identity and
guestinfo as fw_cfg files, qemu-guest-agent on a unix socket, the serial console in a file,
and an empty second disk. The slirp network is 10.77.1.0/24 (host 10.77.1.1), so the
image's own lab-network grants (pg_hba 10.77.0.0/16, MariaDB lab@10.77.%) are what is tested.
Timings are printed (`-s`) as `guest-image timing: ...`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stillpoint_lab.image import layout

GUEST_IP = "10.77.1.10"
HOST_IP = "10.77.1.1"     # slirp's address of the host: where hostfwd connections come from
BANNER_TIMEOUT_S = 180   # on a machine with a core to spare; more when others keep it busy
SSH_TIMEOUT_S = 120
GUESTINFO_KEY = "guestinfo.stillpoint.test"
GUESTINFO_VALUE = "restore-marker 42 {\"json\": true}"
BANNER_RE = re.compile(rf"{layout.BOOT_BANNER} kernel=(\S+) machine-id=(\S*)")

pytestmark = pytest.mark.timeout(1800)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _budget(seconds: float) -> float:
    """`seconds` scaled by how much more than its cores the machine runs (TCG guests of other
    labs share its 2 cores: a boot takes 3-5 times longer at a load of 8), at most 3 times."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * min(3.0, max(1.0, load))


def _accel() -> list[str]:
    from stillpoint_lab.qemu.accel import accel_argv

    return accel_argv()


class QGA:
    """A minimal qemu-guest-agent client (the test's own: newline-delimited JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._id = int(time.time()) % 100000

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 30) -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            self._id += 1
            sync = {"execute": "guest-sync-delimited", "arguments": {"id": self._id}}
            s.sendall(b"\xff" + json.dumps(sync).encode() + b"\n")
            buf = b""
            while True:   # skip anything before the sentinel and stale replies
                buf += s.recv(65536) or b""
                if b"\xff" in buf:
                    buf = buf.rsplit(b"\xff", 1)[1]
                lines = buf.split(b"\n")
                replies = [json.loads(x) for x in lines[:-1] if x.strip()]
                if any(r.get("return") == self._id for r in replies):
                    break
                buf = lines[-1] if not replies else b""
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"qga closed during {command}")
                buf += chunk
            reply = json.loads(buf.split(b"\n", 1)[0])
        if "error" in reply:
            raise RuntimeError(f"qga {command}: {reply['error']}")
        return reply["return"]

    def wait(self, deadline: float) -> None:
        while True:
            try:
                self.call("guest-ping", timeout=3)
                return
            except (OSError, ValueError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def read_file(self, path: str) -> bytes:
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        try:
            data = b""
            while True:
                chunk = self.call("guest-file-read", {"handle": handle, "count": 65536})
                data += base64.b64decode(chunk["buf-b64"])
                if chunk.get("eof") or not chunk["count"]:
                    return data
        finally:
            self.call("guest-file-close", {"handle": handle})


@dataclass
class VM:
    dir: Path
    disk: Path
    data_disk: Path
    ports: dict[str, int]
    key: Any                              # paramiko.Ed25519Key
    qga: QGA
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    host_key: str = ""

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    def start(self) -> None:
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{self.ports[p]}-{GUEST_IP}:{p}"
                       for p in ("22", "5432", "3306"))
        argv = [
            "qemu-system-x86_64", "-name", "splab-guest-image-test", *_accel(),
            "-smp", "2", "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none",
            "-drive", f"file={self.disk},format=raw,if=virtio",
            "-drive", f"file={self.data_disk},format=raw,if=virtio",
            "-netdev", f"user,id=n0,net=10.77.1.0/24,host={HOST_IP},restrict=on,{fwd}",
            "-device", "virtio-net-pci,netdev=n0",
            "-fw_cfg", f"name={layout.FW_CFG_IDENTITY},file={self.dir / 'identity.json'}",
            "-fw_cfg", f"name={layout.FW_CFG_GUESTINFO},file={self.dir / 'guestinfo.json'}",
            "-chardev", f"socket,path={self.qga.path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", f"virtserialport,chardev=qga0,name={layout.QGA_PORT_NAME}",
            "-serial", f"file:{self.serial}",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "qemu.err", "wb"))  # noqa: SIM115

    def banners(self) -> list[tuple[str, str]]:
        text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        return BANNER_RE.findall(text)

    def wait_banner(self, count: int) -> tuple[str, str]:
        budget = _budget(BANNER_TIMEOUT_S)
        deadline = time.monotonic() + budget
        while len(found := self.banners()) < count:
            assert self.proc and self.proc.poll() is None, \
                f"QEMU exited: {(self.dir / 'qemu.err').read_text()[-2000:]}"
            if time.monotonic() > deadline:
                tail = self.serial.read_text(errors="replace")[-3000:]
                pytest.fail(f"no {layout.BOOT_BANNER} on the serial console within "
                            f"{budget:.0f} s (load {os.getloadavg()[0]:.1f}); its tail:\n{tail}")
            time.sleep(0.5)
        return found[count - 1]

    def ssh(self) -> Any:
        import paramiko

        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{self.ports['22']}", "ssh-ed25519",
                                   paramiko.Ed25519Key(data=base64.b64decode(self.host_key)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        deadline = time.monotonic() + _budget(SSH_TIMEOUT_S)
        while True:
            try:
                client.connect("127.0.0.1", port=self.ports["22"], username=layout.SSH_USER,
                               pkey=self.key, allow_agent=False, look_for_keys=False,
                               timeout=10, banner_timeout=20, auth_timeout=20)
                return client
            except (OSError, paramiko.SSHException) as err:
                if isinstance(err, paramiko.BadHostKeyException):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def run(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        client = self.ssh()
        try:
            _, out, err = client.exec_command(command, timeout=timeout)
            rc = out.channel.recv_exit_status()
            return rc, out.read().decode(), err.read().decode()
        finally:
            client.close()

    def must(self, command: str, timeout: float = 60) -> str:
        rc, out, err = self.run(command, timeout)
        assert rc == 0, f"`{command}` exited {rc}: {err or out}"
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _read_host_key(vm: VM) -> str:
    pub = vm.qga.read_file(layout.SSH_HOST_KEY_PUB).decode().split()
    assert pub[0] == "ssh-ed25519", pub
    return pub[1]


def _timing(name: str, seconds: float) -> None:
    print(f"guest-image timing: {name} = {seconds:.1f} s")


@pytest.fixture(scope="module")
def vm() -> Iterator[VM]:
    if os.geteuid() != 0:
        pytest.skip("the guest image is built and booted as root (loop devices, chroot)")
    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from stillpoint_lab.image import ensure_guest_image

    t0 = time.monotonic()
    image = ensure_guest_image()
    _timing("ensure_guest_image", time.monotonic() - t0)
    # our own dir: pytest's basetemp under /tmp is shared with other sessions and pruned
    d = Path(tempfile.mkdtemp(prefix="splab-guest-image-test-", dir="/var/tmp"))
    t0 = time.monotonic()
    disk = d / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(image.path), str(disk)], check=True)
    _timing("sparse copy", time.monotonic() - t0)
    data_disk = d / "data.raw"
    with open(data_disk, "wb") as f:
        f.truncate(64 << 20)

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    key = paramiko.Ed25519Key(file_obj=io.StringIO(pem))
    (d / "identity.json").write_text(json.dumps({
        "ip_cidr": f"{GUEST_IP}/24", "gateway": HOST_IP,
        "authorized_keys": f"ssh-ed25519 {key.get_base64()} guest-image-test"}))
    (d / "guestinfo.json").write_text(json.dumps({GUESTINFO_KEY: GUESTINFO_VALUE}))
    ports = dict(zip(("22", "5432", "3306"), _free_ports(3), strict=True))
    machine = VM(dir=d, disk=disk, data_disk=data_disk, ports=ports, key=key,
                 qga=QGA(d / "qga.sock"))
    machine.image_kernel = image.kernel_release  # type: ignore[attr-defined]
    machine.start()
    try:
        machine.wait_banner(1)
        machine.timings["banner"] = time.monotonic() - machine.started
        _timing("boot to banner", machine.timings["banner"])
        machine.qga.wait(time.monotonic() + 60)
        machine.host_key = _read_host_key(machine)
        machine.ssh().close()
        machine.timings["ssh"] = time.monotonic() - machine.started
        _timing("boot to SSH (host key via qga)", machine.timings["ssh"])
        print(machine.must("systemd-analyze; systemd-analyze critical-chain "
                           "stillpoint-lab-boot-banner.service; systemd-analyze blame "
                           "| head -15"))
        yield machine
    finally:
        machine.stop()
        if os.environ.get("KEEP_GUEST_IMAGE_TEST"):
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def test_banner_names_the_image_kernel_and_a_machine_id(vm: VM) -> None:
    kernel, machine_id = vm.banners()[0]
    assert kernel == vm.image_kernel  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id), machine_id
    assert vm.must("cat /etc/machine-id").strip() == machine_id


def test_ssh_keys_only_with_sudo(vm: VM) -> None:
    assert vm.must("id -un").strip() == layout.SSH_USER
    vm.must("sudo -n true")
    # the lab's key came from fw_cfg into /run, not into the image
    assert vm.must(f"stat -c '%U %a' {layout.AUTHORIZED_KEYS_DIR}/{layout.SSH_USER}").split() \
        == ["root", "644"]
    effective = vm.must("sudo -n sshd -T")
    assert "permitrootlogin no" in effective
    assert "passwordauthentication no" in effective
    assert "kbdinteractiveauthentication no" in effective
    # one host key, this VM's own (made at its first boot, none in the image)
    assert re.findall(r"^hostkey (\S+)$", effective, re.M) == [layout.SSH_HOST_KEY]
    assert vm.must("ls /etc/ssh/ | grep ssh_host_").split() == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    assert vm.must("test ! -e ~/.ssh/authorized_keys && echo none").strip() == "none"


def test_identity_network_from_fw_cfg(vm: VM) -> None:
    assert f"inet {GUEST_IP}/24" in vm.must("ip -4 addr show")
    assert f"default via {HOST_IP}" in vm.must("ip -4 route")
    assert "Name=en* eth*" in vm.must(f"cat {layout.NETWORK_FILE}")


def test_vmware_rpctool_reads_guestinfo(vm: VM) -> None:
    out = vm.must(f"sudo -n vmware-rpctool 'info-get {GUESTINFO_KEY}'")
    assert out == GUESTINFO_VALUE + "\n"
    rc, out, err = vm.run("sudo -n vmware-rpctool 'info-get guestinfo.not.there'")
    assert (rc, out, err.strip()) == (1, "", "No value found")


def test_qemu_guest_agent_runs_with_the_fsfreeze_hook(vm: VM) -> None:
    assert vm.must("systemctl is-active qemu-guest-agent").strip() == "active"
    assert f"-F{layout.FSFREEZE_HOOK}" in vm.must("ps -o args= -C qemu-ga")


def test_databases_over_tcp(vm: VM) -> None:
    import psycopg
    import pymysql

    assert vm.must(f"systemctl is-active {layout.PG_UNIT} {layout.MY_UNIT}").split() \
        == ["active", "active"]
    # local peer auth through the ident map: splab and root act as postgres
    assert vm.must("psql -U postgres -d postgres -Atc 'select 1'").strip() == "1"
    assert vm.must("sudo -n psql -U postgres -d postgres -Atc 'select 1'").strip() == "1"
    assert vm.must("sudo -n mariadb -N -e 'select 1'").strip() == "1"   # root: unix_socket

    with psycopg.connect(host="127.0.0.1", port=vm.ports["5432"], user="postgres",
                         dbname="postgres", connect_timeout=20, autocommit=True) as pg:
        settings = {name: pg.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                    for name in ("wal_level", "archive_mode", "data_directory",
                                 "max_wal_size", "shared_buffers")}
        assert settings == {"wal_level": "replica", "archive_mode": "on",
                            "data_directory": layout.PGDATA, "max_wal_size": "96MB",
                            "shared_buffers": "32MB"}
        pg.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        pg.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        wal = pg.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
    deadline = time.monotonic() + 60
    while wal not in vm.must(f"sudo -n ls {layout.PG_WAL_ARCHIVE}"):
        assert time.monotonic() < deadline, f"{wal} was not archived"
        time.sleep(1)

    my = pymysql.connect(host="127.0.0.1", port=vm.ports["3306"], user=layout.MY_LAB_USER,
                         password="", connect_timeout=20)
    try:
        with my.cursor() as c:
            c.execute("SELECT CURRENT_USER(), @@log_bin, @@binlog_format, @@sync_binlog, "
                      "@@server_id, @@myisam_recover_options, @@log_bin_basename, @@datadir")
            row = c.fetchone()
            assert row == (f"{layout.MY_LAB_USER}@{layout.MY_LAB_HOST}", 1, "ROW", 1, 1, "OFF",
                           layout.MY_BINLOG_BASENAME, layout.MY_DATADIR + "/")
            c.execute("CREATE DATABASE IF NOT EXISTS splab_test")
            c.execute("CREATE TABLE IF NOT EXISTS splab_test.m (x int) ENGINE=MyISAM")
            c.execute("INSERT INTO splab_test.m VALUES (1), (2)")
        my.commit()
    finally:
        my.close()


def _wait_data_mounted(vm: VM) -> list[str]:
    deadline = time.monotonic() + 60
    while True:
        rc, out, _ = vm.run(f"findmnt -n -o SOURCE,FSTYPE,LABEL {layout.DATA_MOUNT}")
        if rc == 0:
            return out.split()
        assert time.monotonic() < deadline, vm.must(
            "systemctl status --no-pager stillpoint-lab-data-disk data.mount || true")
        time.sleep(1)


def test_data_disk_formatted_and_mounted(vm: VM) -> None:
    assert _wait_data_mounted(vm) == [layout.DATA_DEVICE, "ext4", layout.DATA_LABEL]
    vm.must(f"echo kept | sudo -n tee {layout.DATA_MOUNT}/marker >/dev/null && sync")


def test_fsfreeze_runs_the_hook_dir(vm: VM) -> None:
    hook = f"{layout.FSFREEZE_HOOK_DIR}/50-splab-test"
    vm.must(f"printf '#!/bin/sh\\necho \"$1\" >> /run/splab-hook.log\\n' | sudo -n tee {hook} "
            f">/dev/null && sudo -n chmod 755 {hook} && sync")
    t0 = time.monotonic()
    frozen = vm.qga.call("guest-fsfreeze-freeze", timeout=60)
    t_freeze = time.monotonic() - t0
    try:
        assert vm.qga.call("guest-fsfreeze-status") == "frozen"
        assert frozen >= 2    # / and /data
    finally:
        t0 = time.monotonic()
        thawed = vm.qga.call("guest-fsfreeze-thaw", timeout=60)
        _timing("fsfreeze freeze / thaw", t_freeze)
        _timing("fsfreeze thaw", time.monotonic() - t0)
    assert thawed == frozen
    assert vm.qga.call("guest-fsfreeze-status") == "thawed"
    assert vm.must("cat /run/splab-hook.log").split() == ["freeze", "thaw"]
    vm.must(f"sudo -n rm {hook}")


def test_reboot_keeps_machine_id_host_key_and_data(vm: VM) -> None:
    first_kernel, first_id = vm.banners()[0]
    vm.run("sudo -n systemctl reboot", timeout=20)
    t0 = time.monotonic()
    kernel, machine_id = vm.wait_banner(2)
    _timing("reboot to banner", time.monotonic() - t0)
    assert (kernel, machine_id) == (first_kernel, first_id)
    vm.qga.wait(time.monotonic() + 60)
    assert _read_host_key(vm) == vm.host_key       # made once, at the first boot
    assert _wait_data_mounted(vm) == [layout.DATA_DEVICE, "ext4", layout.DATA_LABEL]
    assert vm.must(f"cat {layout.DATA_MOUNT}/marker").strip() == "kept"
    assert vm.must("cat /etc/machine-id").strip() == first_id
