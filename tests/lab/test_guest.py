"""Lab guests for real: namespaces, sshd, databases on a loop-mounted flat disk, the workload,
the capture hooks, booting a copy of the disk taken while frozen, and a clean teardown."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import os
import pwd
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paramiko
import pytest

from stillpoint_lab import guest as guest_mod
from stillpoint_lab import workload
from stillpoint_lab.config import LabConfig

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="lab guests need root (namespaces, mounts)"),
]

LAB_ID = 8   # our own lab id, so these tests can run beside a lab that is up
VM1, VM2 = "gt-vm1", "gt-vm2"
RESTORE_KEY = "guestinfo.stillpoint.restore"


@dataclass
class Lab:
    cfg: LabConfig
    root: Path
    disk: Path
    disk1: Path
    guestinfo: dict[str, dict[str, str]]
    url: str
    ca_cert: Path
    user_existed: bool


def _self_signed(ip: str, out: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stillpoint-lab-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _guestinfo_server(ip: str, values: dict[str, dict[str, str]], cert: Path,
                      key: Path) -> ThreadingHTTPServer:
    """Stands in for the simulator's /lab/guestinfo/<vm>/<key> endpoint."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            m = re.fullmatch(r"/lab/guestinfo/([^/]+)/([^/]+)", self.path)
            value = values.get(m.group(1), {}).get(m.group(2)) if m else None
            body = (value or "not set").encode()
            self.send_response(200 if value is not None else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer((ip, 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Under /var/tmp, world-traversable: sshd reads authorized_keys as the lab user.
    root = Path(tempfile.mkdtemp(prefix="sp-guest-test-", dir="/var/tmp"))
    root.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLPOINT_LAB_DIR", str(root / "state"))
        cfg = LabConfig(lab_id=LAB_ID)
        guest_mod.teardown_all(cfg)
        try:
            pwd.getpwnam("splab")
            user_existed = True
        except KeyError:
            user_existed = False
        disk = root / "datastore" / VM1 / f"{VM1}-flat.vmdk"
        disk.parent.mkdir(parents=True)
        with open(disk, "wb") as f:
            f.truncate(512 * 1024 * 1024)
        disk1 = disk.with_name(f"{VM1}_1-flat.vmdk")
        with open(disk1, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        guest_mod.setup_network(cfg)
        cert, key = _self_signed(cfg.host_ip, root)
        values: dict[str, dict[str, str]] = {VM1: {}, VM2: {}}
        server = _guestinfo_server(cfg.host_ip, values, cert, key)
        try:
            yield Lab(cfg, root, disk, disk1, values, f"https://{cfg.host_ip}:{server.server_port}",
                      cert, user_existed)
        finally:
            server.shutdown()
            server.server_close()
            guest_mod.teardown_all(cfg)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def vm1(lab: Lab) -> guest_mod.GuestHandle:
    return guest_mod.start_guest(lab.cfg, 0, VM1, [lab.disk, lab.disk1], guestinfo_url=lab.url,
                                 ca_cert=lab.ca_cert, format_disks=True)


def _ssh(g: guest_mod.GuestHandle, host_key_line: str) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    ip, kind, blob = host_key_line.split()
    client.get_host_keys().add(ip, kind, paramiko.PKey.from_type_string(
        kind, base64.b64decode(blob)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(g.ip, username=g.ssh_user, key_filename=str(g.ssh_key_path),
                   look_for_keys=False, allow_agent=False, timeout=10)
    return client


def _exec(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, out, err = client.exec_command(command, timeout=30)
    text = out.read().decode() + err.read().decode()
    return out.channel.recv_exit_status(), text


def test_ssh_verifies_host_key_and_sudo_works(vm1: guest_mod.GuestHandle) -> None:
    public = (vm1.state_dir / "ssh_host_ed25519_key.pub").read_text().split()
    assert vm1.host_key_line == f"{vm1.ip} {public[0]} {public[1]}"
    client = _ssh(vm1, vm1.host_key_line)
    try:
        assert client.get_transport().get_remote_server_key().fingerprint == \
            vm1.host_key_sha256
        assert _exec(client, "id -un") == (0, "splab\n")
        assert _exec(client, "sudo -n id -u") == (0, "0\n")
        rc, mounts = _exec(client, "findmnt -n -o TARGET /data")
        assert (rc, mounts.strip()) == (0, "/data")
    finally:
        client.close()

    other = paramiko.Ed25519Key.from_private_key_file(str(vm1.ssh_key_path))  # not the host's
    wrong = f"{vm1.ip} ssh-ed25519 {other.get_base64()}"
    with pytest.raises(paramiko.BadHostKeyException):
        _ssh(vm1, wrong)

    bare = paramiko.SSHClient()
    bare.get_host_keys().add(vm1.ip, public[0], paramiko.PKey.from_type_string(
        public[0], base64.b64decode(public[1])))
    with pytest.raises(paramiko.AuthenticationException):
        bare.connect(vm1.ip, username="splab", password="x", look_for_keys=False,
                     allow_agent=False, timeout=10)
    bare.close()


def test_databases_run_from_the_vm_disk(vm1: guest_mod.GuestHandle) -> None:
    pg = vm1.run(["psql", "-h", "/run/postgresql", "-U", "postgres", "-Atc",
                  ("SELECT current_setting('data_directory'), current_setting('wal_level'),"
                  " current_setting('archive_mode')")])
    assert pg.stdout.strip() == "/data/pgsql/15/main|replica|on", pg.stderr
    my = vm1.run(["mariadb", "-N", "-e", "SELECT @@datadir, @@log_bin, @@binlog_format"])
    assert my.stdout.split() == ["/data/mysql/", "1", "ROW"], my.stderr
    # The guest's sockets are its own: the host's /run has none of them.
    assert not Path("/run/mysqld/mysqld.sock").exists()
    assert vm1.run(["findmnt", "-n", "-o", "SOURCE", "/opt/stillpoint"]).returncode == 0


def test_vmware_rpctool_reads_guestinfo(lab: Lab, vm1: guest_mod.GuestHandle) -> None:
    lab.guestinfo[VM1]["guestinfo.lab.hello"] = "world"
    got = vm1.run(["vmware-rpctool", "info-get guestinfo.lab.hello"])
    assert (got.returncode, got.stdout) == (0, "world\n"), got.stderr
    unset = vm1.run(["vmware-rpctool", "info-get guestinfo.lab.unset"])
    assert unset.returncode == 1 and "No value found" in unset.stderr


def test_workload_keeps_invariants(vm1: guest_mod.GuestHandle) -> None:
    handle = workload.start_workload(vm1, rate=40)
    try:
        time.sleep(2)
        live = workload.check_invariants(vm1)      # consistent snapshots while it runs
        assert live.ok, live
        vm1.stop_apps()                            # a database restart: it reconnects
        vm1.start_apps()
        restarted = time.time()
        time.sleep(2)
        assert handle.process.poll() is None
    finally:
        workload.stop_workload(handle)
    report = workload.check_invariants(vm1)
    assert report.ok, report
    commits = workload.read_log(handle.log_path)
    for db, seq_max in (("pg", report.pg_seq_max), ("my", report.my_seq_max)):
        ids = [c.id for c in commits if c.db == db]
        assert len(ids) > 40 and max(ids) == seq_max
        assert [c.id for c in commits if c.db == db and c.committed > restarted], db


def _run_hook(argv: list[str]) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_capture_hook_freezes_and_thaws(lab: Lab, vm1: guest_mod.GuestHandle) -> None:
    pre, post = guest_mod.capture_hook_argv(lab.cfg, VM1, 0)
    assert "froze /data" in _run_hook(pre)
    writer = subprocess.Popen(vm1.command(["sh", "-c", "echo x > /data/frozen-probe"]))
    try:
        time.sleep(1.0)
        assert writer.poll() is None, "a write went through a frozen file system"
    finally:
        assert "thawed /data" in _run_hook(post)
    assert writer.wait(timeout=10) == 0

    # Frozen by someone else (the backup agent): the hooks must leave it frozen.
    assert vm1.run(["fsfreeze", "-f", "/data"]).returncode == 0
    try:
        assert "already frozen" in _run_hook(pre)
        assert "not thawing" in _run_hook(post)
        still = vm1.run(["fsfreeze", "-f", "/data"])
        assert still.returncode != 0 and "busy" in still.stderr.lower()
    finally:
        assert vm1.run(["fsfreeze", "-u", "/data"]).returncode == 0

    # Every disk has its own hooks; disk 1 is /data1.
    pre1, post1 = guest_mod.capture_hook_argv(lab.cfg, VM1, 1)
    assert "froze /data1" in _run_hook(pre1)
    assert "thawed /data1" in _run_hook(post1)
    # A VM without a running guest (powered off): the hooks do nothing and succeed.
    pre_off, post_off = guest_mod.capture_hook_argv(lab.cfg, "no-such-vm", 0)
    assert "not mounted" in _run_hook(pre_off)
    assert "not thawing" in _run_hook(post_off)


@contextlib.contextmanager
def _mariadb_read_lock(g: guest_mod.GuestHandle) -> Iterator[None]:
    """FLUSH TABLES WITH READ LOCK, held by a live session until the block ends."""
    session = subprocess.Popen(g.command(["mariadb", "--unbuffered", "-N"]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert session.stdin is not None and session.stdout is not None
    try:
        session.stdin.write("FLUSH TABLES WITH READ LOCK; SELECT 'locked';\n")
        session.stdin.flush()
        assert session.stdout.readline() == "locked\n"
        yield
    finally:
        # UNLOCK and a clean disconnect: killing the client would leave the server-side
        # session (and its lock) behind until the server noticed.
        session.communicate("UNLOCK TABLES;\n", timeout=30)


BOOT_SCRIPT = """#!/bin/sh
# Records what the world looked like when boot.d ran: the databases must not be up yet.
if [ -S /run/postgresql/.s.PGSQL.5432 ] || [ -S /run/mysqld/mysqld.sock ]; then
    echo apps-up; else echo apps-down; fi > /data/var/log/boot-mark
vmware-rpctool "info-get guestinfo.stillpoint.restore" >> /data/var/log/boot-mark
"""


def test_copy_taken_while_frozen_boots_as_restored_guest(
        lab: Lab, vm1: guest_mod.GuestHandle) -> None:
    # The agent's boot hook is on the VM's disk: it runs at the next boot of a copy.
    vm1.run(["sh", "-c", ("cat > /etc/stillpoint/boot.d/10-mark && "
             "chmod +x /etc/stillpoint/boot.d/10-mark")], input=BOOT_SCRIPT)
    lab.guestinfo[VM2][RESTORE_KEY] = "restore-point-42"
    copy = lab.root / "datastore" / VM2 / f"{VM2}-flat.vmdk"
    copy.parent.mkdir(parents=True, exist_ok=True)
    pre, post = guest_mod.capture_hook_argv(lab.cfg, VM1, 0)
    handle = workload.start_workload(vm1, rate=40)
    try:
        time.sleep(2)
        # MyISAM is not crash safe: a file-system freeze alone can leave its header behind
        # its data (CHECK TABLE: "Record-count is not ok"). So, like the agent, hold
        # FLUSH TABLES WITH READ LOCK across the freeze; InnoDB and PostgreSQL need nothing.
        with _mariadb_read_lock(vm1):
            before_freeze = time.time()
            _run_hook(pre)
            try:
                subprocess.run(["cp", "--sparse=always", str(lab.disk), str(copy)], check=True)
            finally:
                _run_hook(post)
            after_thaw = time.time()
        time.sleep(1)
    finally:
        workload.stop_workload(handle)

    vm2 = guest_mod.start_guest(lab.cfg, 1, VM2, [copy], guestinfo_url=lab.url,
                                ca_cert=lab.ca_cert, format_disks=False)
    assert vm2.boot_ok
    assert vm2.run(["cat", "/data/var/log/boot-mark"]).stdout == "apps-down\nrestore-point-42\n"
    report = workload.check_invariants(vm2)
    assert report.ok, report
    # Exactly the transactions committed before the freeze are in the copy, and none
    # that were sent after the thaw.
    commits = workload.read_log(handle.log_path)
    for db, seq_max in (("pg", report.pg_seq_max), ("my", report.my_seq_max)):
        mine = [c for c in commits if c.db == db]
        assert all(c.id <= seq_max for c in mine if c.committed < before_freeze)
        assert all(c.sent < after_thaw for c in mine if c.id <= seq_max)
        assert any(c.id > seq_max for c in mine), "the copy should predate later commits"
    # The original still runs on its own disk, and is consistent too.
    assert workload.check_invariants(vm1).ok
    assert f" {vm2.ip}/24 " in vm2.run(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout


def _guest_namespaces(lab: Lab) -> set[int]:
    """Inodes of the lab's guest namespaces (net and mnt), to find processes left in them."""
    files = [*Path("/run/netns").glob(f"sp{LAB_ID}-*"), *lab.cfg.state_dir.glob("ns/*.mnt")]
    return {f.stat().st_ino for f in files}


def _lab_traces(lab: Lab, namespaces: frozenset[int] | set[int] = frozenset()) -> list[str]:
    traces = []
    netns = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    traces += [f"netns {n}" for n in netns.split() if n.startswith(f"sp{LAB_ID}-")]
    links = subprocess.run(["ip", "-o", "link"], check=False, capture_output=True, text=True).stdout
    traces += [f"link {m}" for m in re.findall(rf"\d+: (sp(?:br)?{LAB_ID}\S*?)[@:]", links)]
    loops = subprocess.run(["losetup", "-a"], check=False, capture_output=True, text=True).stdout
    traces += [f"loop {line}" for line in loops.splitlines() if str(lab.root) in line]
    mounts = Path("/proc/self/mountinfo").read_text()
    traces += [f"mount {line}" for line in mounts.splitlines() if str(lab.root) in line]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        try:
            ns = {os.stat(proc / "ns" / kind).st_ino for kind in ("net", "mnt")}
        except OSError:
            continue
        if state != "Z" and (str(lab.root) in cmdline or ns & namespaces):
            traces.append(f"process {proc.name} {cmdline}")
    if Path(f"/etc/sudoers.d/stillpoint-lab{LAB_ID}").exists():
        traces.append("sudoers file")
    return traces


def test_teardown_leaves_nothing_and_is_idempotent(lab: Lab,
                                                   vm1: guest_mod.GuestHandle) -> None:
    assert _lab_traces(lab), "the lab should be up before teardown"
    namespaces = _guest_namespaces(lab)
    assert len(namespaces) == 4
    guest_mod.teardown_all(lab.cfg)
    assert _lab_traces(lab, namespaces) == []
    guest_mod.teardown_all(lab.cfg)
    assert _lab_traces(lab, namespaces) == []
    if not lab.user_existed and not list(Path("/etc/sudoers.d").glob("stillpoint-lab*")):
        with pytest.raises(KeyError):
            pwd.getpwnam("splab")
    assert not list(lab.cfg.state_dir.glob("guests/*"))


CRASHER = """
import sys
from pathlib import Path
from stillpoint_lab import guest, workload
from stillpoint_lab.config import LabConfig
g = guest.start_guest(LabConfig(lab_id=int(sys.argv[1])), 2, sys.argv[2], [Path(sys.argv[3])])
workload.start_workload(g, rate=20)
print("up", flush=True)
sys.stdin.read()
"""


def test_teardown_after_the_process_that_started_the_guest_died(lab: Lab) -> None:
    disk = lab.root / "datastore" / "gt-crash" / "gt-crash-flat.vmdk"
    disk.parent.mkdir(parents=True)
    with open(disk, "wb") as f:
        f.truncate(512 * 1024 * 1024)
    proc = subprocess.Popen([str(workload.PYTHON), "-c", CRASHER, str(LAB_ID), "gt-crash",
                             str(disk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    finally:
        proc.kill()                       # no cleanup of its own: a crash
        proc.wait()
    assert _lab_traces(lab), "the crashed process's guest should still be up"
    namespaces = _guest_namespaces(lab)
    assert len(namespaces) == 2
    guest_mod.teardown_all(lab.cfg)
    assert _lab_traces(lab, namespaces) == []
