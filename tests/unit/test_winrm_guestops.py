"""The guest-operations fallback channel against an in-test guest operations manager.

No ESXi runs here (the govmomi 0.24 simulator's guest operations need container-backed
VMs), so `FakeGuestOps` stands in for vCenter's GuestOperationsManager with pyVmomi's own
types and faults, and a real local HTTPS server serves the transfer URLs, so TLS
verification and pinning of the file transfers are real. The "guest" runs the command
line that the channel built for cmd.exe: the agent in `-Mode once` is the fake agent
process of test_winrm_wsman_endpoint.py.
"""

from __future__ import annotations

import http.server
import re
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim
from test_winrm_wsman_endpoint import Cert, make_cert, sandbox_path, split_command_line

from appliance.errors import AuthenticationFailed, GuestError, TrustError
from appliance.guest.client import AgentClient
from appliance.guest.guestops_channel import GuestOpsChannel, GuestOpsOptions
from appliance.guest.winrm_deploy import agent_argv

ENDPOINT_MODULE = Path(__file__).resolve().parent / "test_winrm_wsman_endpoint.py"
INSTALL = r"C:\ProgramData\Stillpoint\agent"


class FileServer:
    """HTTPS PUT/GET of guest files by transfer id, like ESXi's /guestFile URLs."""

    def __init__(self, cert: Cert, root: Path) -> None:
        self.files: dict[str, Path] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_PUT(self) -> None:
                path = server.files[self.path.split("id=")[1]]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                data = server.files[self.path.split("id=")[1]].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert_pem, cert.key_pem)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: Path) -> str:
        key = str(len(self.files))
        self.files[key] = path
        return f"https://*:{self.port}/guestFile?id={key}"


class FakeGuestOps:
    def __init__(self, root: Path, files: FileServer, password: str) -> None:
        self.root, self.server, self.password = root, files, password
        self.processes: dict[int, vim.vm.guest.ProcessManager.ProcessInfo] = {}
        self.fileManager, self.processManager = self, self
        self.guestOperationsManager = self

    def _login(self, auth: Any) -> None:
        if auth.password != self.password:
            raise vim.fault.InvalidGuestLogin(msg="Failed to authenticate")

    def InitiateFileTransferToGuest(self, vm, auth, guestFilePath, fileAttributes, fileSize,
                                    overwrite):  # noqa: N802
        self._login(auth)
        return self.server.url(sandbox_path(self.root, guestFilePath))

    def InitiateFileTransferFromGuest(self, vm, auth, guestFilePath):  # noqa: N802
        self._login(auth)
        path = sandbox_path(self.root, guestFilePath)
        if not path.exists():
            raise vim.fault.FileNotFound(file=guestFilePath, msg=f"{guestFilePath} not found")
        return vim.vm.guest.FileManager.FileTransferInformation(
            url=self.server.url(path), size=path.stat().st_size)

    def DeleteFileInGuest(self, vm, auth, filePath):  # noqa: N802
        path = sandbox_path(self.root, filePath)
        if not path.exists():
            raise vim.fault.FileNotFound(file=filePath)
        path.unlink()

    def StartProgramInGuest(self, vm, auth, spec):  # noqa: N802
        self._login(auth)
        assert spec.programPath == r"C:\Windows\System32\cmd.exe"
        m = re.fullmatch(r'/S /C "(.*) > "([^"]+)" 2> "([^"]+)"(?: < "([^"]+)")?"',
                         spec.arguments)
        assert m, spec.arguments
        argv = split_command_line(m.group(1))
        stdin = sandbox_path(self.root, m.group(4)).read_bytes() if m.group(4) else b""
        code, out, err = self._execute(argv, stdin)
        for name, data in ((m.group(2), out), (m.group(3), err)):
            target = sandbox_path(self.root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        pid = len(self.processes) + 100
        self.processes[pid] = vim.vm.guest.ProcessManager.ProcessInfo(
            pid=pid, name=argv[0], exitCode=code, endTime=None if code is None else
            vim.vm.guest.ProcessManager.ProcessInfo().startTime)
        if code is not None:
            from datetime import datetime, timezone
            self.processes[pid].endTime = datetime.now(timezone.utc)
        return pid

    def ListProcessesInGuest(self, vm, auth, pids):  # noqa: N802
        return [self.processes[p] for p in pids]

    def TerminateProcessInGuest(self, vm, auth, pid):  # noqa: N802
        self.processes[pid].exitCode = 1

    def _execute(self, argv: list[str], stdin: bytes) -> tuple[int | None, bytes, bytes]:
        if argv[0] == "sleep-forever.exe":
            return None, b"", b""
        if argv[0] == "echo.exe":
            return 0, " ".join(argv[1:]).encode() + stdin, b""
        if "-Mode" in argv and argv[argv.index("-Mode") + 1] == "once":
            request = sandbox_path(self.root, argv[argv.index("-RequestFile") + 1]).read_bytes()
            install = sandbox_path(self.root, argv[argv.index("-File") + 1]).parent
            res = subprocess.run([sys.executable, str(ENDPOINT_MODULE), "--fake-agent",
                                  str(install)], input=request + b"\n", capture_output=True,
                                 timeout=30)
            sandbox_path(self.root, argv[argv.index("-ResponseFile") + 1]).write_bytes(res.stdout)
            return res.returncode, b"", res.stderr
        return 1, b"", b"not found\r\n"


@pytest.fixture
def guest(tmp_path: Path):
    cert = make_cert(tmp_path / "tls")
    files = FileServer(cert, tmp_path / "guest")
    ops = FakeGuestOps(tmp_path / "guest", files, "pw")
    try:
        yield ops, cert
    finally:
        files.httpd.shutdown()
        files.httpd.server_close()


def channel(ops: FakeGuestOps, cert: Cert, **kw: Any) -> GuestOpsChannel:
    base = dict(username="Administrator", password="pw", vsphere_host="127.0.0.1",
                ca_bundle=str(cert.cert_pem))
    base.update(kw)
    return GuestOpsChannel(ops, vm=None, options=GuestOpsOptions(**base))


def test_put_file_and_run_with_output_files(guest: tuple[FakeGuestOps, Cert]) -> None:
    ops, cert = guest
    ch = channel(ops, cert)
    ch.put_file(b"hello", r"C:\Temp\a.txt")
    assert sandbox_path(ops.root, r"C:\Temp\a.txt").read_bytes() == b"hello"
    res = ch.run(["echo.exe", "one two"], stdin=b"!")
    assert (res.exit_code, res.stdout) == (0, b"one two!")
    # The redirect files and the stdin file were removed from the guest.
    assert list((ops.root / "C" / "Windows" / "Temp").iterdir()) == []


def test_agent_one_request_per_process(guest: tuple[FakeGuestOps, Cert]) -> None:
    ops, cert = guest
    install = sandbox_path(ops.root, INSTALL)
    install.mkdir(parents=True)
    client = AgentClient(channel(ops, cert).open_process(agent_argv(INSTALL, "serve")))
    assert client.hello()["capabilities"]["quiesce"] == "vmware-tools-vss"
    assert "raw" in client.gather_metadata()
    client.uninstall()
    assert not install.exists()


def test_bad_guest_password(guest: tuple[FakeGuestOps, Cert]) -> None:
    ops, cert = guest
    with pytest.raises(AuthenticationFailed, match="rejected the login"):
        channel(ops, cert, password="nope").put_file(b"x", r"C:\Temp\x")


def test_transfer_certificate_is_verified(guest: tuple[FakeGuestOps, Cert],
                                          tmp_path: Path) -> None:
    ops, cert = guest
    other = make_cert(tmp_path / "other", "other")
    with pytest.raises(TrustError):
        channel(ops, cert, ca_bundle=str(other.cert_pem)).put_file(b"x", r"C:\Temp\x")
    channel(ops, cert, ca_bundle=None, thumbprint_sha256=cert.sha256).put_file(b"x", r"C:\T\x")
    with pytest.raises(TrustError):
        channel(ops, cert, ca_bundle=None, thumbprint_sha256="00" * 32).put_file(b"x", r"C:\T\y")


def test_run_timeout_terminates(guest: tuple[FakeGuestOps, Cert],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    ops, cert = guest
    monkeypatch.setattr("appliance.guest.guestops_channel._POLL_S", 0.01)
    start = time.monotonic()
    with pytest.raises(GuestError, match="did not finish"):
        channel(ops, cert).run(["sleep-forever.exe"], timeout=0.2)
    assert time.monotonic() - start < 5
    assert [p.exitCode for p in ops.processes.values()] == [1]


def test_missing_output_file_is_a_guest_error(guest: tuple[FakeGuestOps, Cert]) -> None:
    ops, cert = guest
    with pytest.raises(GuestError, match="not found"):
        channel(ops, cert).get_file(r"C:\nope.txt")
