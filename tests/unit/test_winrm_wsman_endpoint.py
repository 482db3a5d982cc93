"""A local WS-Management endpoint for the WinRM tests, and the tests of the endpoint itself.

`WSManEndpoint` is a real HTTPS server (a self-signed certificate made with `cryptography`)
that speaks the part of WS-Man that pywinrm uses: Create (shell), Command, Send, Receive,
Signal, Delete. Authentication is Basic or real NTLM (pyspnego's acceptor, the server side
of the handshake requests_ntlm does). Every envelope it gets is parsed and checked
(namespace, Action, ResourceURI, ShellId selector, MessageID) and kept in `envelopes`.

What runs behind it, standing in for powershell.exe:
  * the file receiver (`winrm_push.receiver_script`, recognised by its tag): emulated here,
    the base64 lines it gets are decoded into a sandbox directory and hashed;
  * `stillpoint-agent.ps1 -Mode verify|serve`: the pushed payload is checked against its
    MANIFEST.sha256 (as the PowerShell does), then `serve` starts a real Python process
    speaking the agent protocol (`fake_agent_main`, this file run with --fake-agent);
  * the deploy snippets (`# stillpoint:prepare-dir|remove|leftovers`): emulated on the
    sandbox;
  * anything else: `handlers` the test registers.
Windows paths map into the sandbox: C:\\ProgramData\\x -> <sandbox>/C/ProgramData/x.

Fault injection: `max_request_bytes` (a MaxEnvelopeSizekb fault, WSManFault 2150859025),
`fault_next` (a given fault for the next request), `corrupt_push` (flip a byte of a pushed
chunk, so the guest-side sha256 check must catch it).
"""

from __future__ import annotations

import abc
import base64
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}
SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
ACTIONS = {
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create": "Create",
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete": "Delete",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command": "Command",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Send": "Send",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive": "Receive",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal": "Signal",
}
RECEIVER_TAG = "# stillpoint:receiver v1"
FAULT_TIMEOUT = 2150858793
FAULT_MAX_ENVELOPE = 2150859025
USER, PASSWORD, DOMAIN = "stillpoint-test", "correct horse battery staple", "LAB"


# --- certificates ------------------------------------------------------------------------

@dataclass
class Cert:
    cert_pem: Path
    key_pem: Path
    sha256: str


def make_cert(directory: Path, name: str = "winrm") -> Cert:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = directory / f"{name}.crt", directory / f"{name}.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key_pem.chmod(0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return Cert(cert_pem, key_pem, hashlib.sha256(der).hexdigest())


# --- guest emulation ---------------------------------------------------------------------

def sandbox_path(sandbox: Path, windows_path: str) -> Path:
    drive, _, rest = windows_path.partition(":")
    parts = [p for p in rest.replace("/", "\\").split("\\") if p]
    return sandbox.joinpath(drive.upper(), *parts)


def split_command_line(line: str) -> list[str]:
    """Inverse of subprocess.list2cmdline for the arguments our channel produces."""
    out, cur, quoted, i, has = [], [], False, 0, False
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            j = i
            while j < len(line) and line[j] == "\\":
                j += 1
            if j < len(line) and line[j] == '"':
                cur.append("\\" * ((j - i) // 2))
                if (j - i) % 2:
                    cur.append('"')
                    i = j + 1
                else:
                    i = j
                continue
            cur.append(line[i:j])
            i = j
            continue
        if ch == '"':
            quoted, has = not quoted, True
        elif ch in " \t" and not quoted:
            if cur or has:
                out.append("".join(cur))
            cur, has = [], False
        else:
            cur.append(ch)
        i += 1
    if cur or has:
        out.append("".join(cur))
    return out


class GuestProcess(abc.ABC):
    """One Command in a shell: stdin in, stdout/stderr out, an exit code at the end."""

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit_code: int | None = None
        self.lock = threading.Condition()

    @abc.abstractmethod
    def feed(self, data: bytes, end: bool) -> None:
        """Bytes that arrived on stdin; `end` closes it."""

    def emit(self, out: bytes = b"", err: bytes = b"", code: int | None = None) -> None:
        with self.lock:
            self.stdout += out
            self.stderr += err
            if code is not None:
                self.exit_code = code
            self.lock.notify_all()

    def take(self, wait: float) -> tuple[bytes, bytes, int | None]:
        with self.lock:
            if not self.stdout and not self.stderr and self.exit_code is None:
                self.lock.wait(wait)
            out, err = bytes(self.stdout), bytes(self.stderr)
            self.stdout.clear()
            self.stderr.clear()
            return out, err, self.exit_code

    def terminate(self) -> None:
        if self.exit_code is None:
            self.emit(code=-1)


class Finished(GuestProcess):
    def __init__(self, out: bytes, err: bytes, code: int) -> None:
        super().__init__()
        self.emit(out, err, code)

    def feed(self, data: bytes, end: bool) -> None:
        pass


class Receiver(GuestProcess):
    """The push receiver, emulated: base64 lines -> <path>.part, sha256, rename."""

    def __init__(self, endpoint: WSManEndpoint, script: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.path = sandbox_path(endpoint.sandbox, _ps_literal(script, "path"))
        self.expected = _ps_literal(script, "expected")
        self.buffer = b""
        self.data = bytearray()
        self.lines = 0

    def feed(self, data: bytes, end: bool) -> None:
        self.buffer += data
        while b"\n" in self.buffer and self.exit_code is None:
            line, _, self.buffer = self.buffer.partition(b"\n")
            text = line.decode("ascii").strip()
            if text == ".":
                self._finish()
                return
            chunk = bytearray(base64.b64decode(text))
            self.lines += 1
            if self.endpoint.corrupt_push and self.lines == 1 and chunk:
                chunk[0] ^= 0xFF
            self.data += chunk
        if end and self.exit_code is None:
            self._finish()

    def _finish(self) -> None:
        actual = hashlib.sha256(self.data).hexdigest()
        self.endpoint.pushed_lines[str(self.path)] = self.lines
        if actual != self.expected:
            self.emit(json.dumps({"ok": False, "sha256": actual,
                                  "error": "hash mismatch"}).encode() + b"\r\n", code=3)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(bytes(self.data))
        self.emit(json.dumps({"ok": True, "sha256": actual}).encode() + b"\r\n", code=0)


class AgentProcess(GuestProcess):
    """`stillpoint-agent.ps1 -Mode serve`: a real Python process speaking the protocol."""

    def __init__(self, endpoint: WSManEndpoint, install: Path) -> None:
        super().__init__()
        env = dict(os.environ, STILLPOINT_FAKE_SCENARIO=endpoint.scenario)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--fake-agent", str(install)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        endpoint.processes.append(self.proc)
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream: Any, is_out: bool) -> None:
        for chunk in iter(lambda: stream.readline(), b""):
            self.emit(chunk, b"") if is_out else self.emit(b"", chunk)
        if is_out:
            self.emit(code=self.proc.wait())

    def feed(self, data: bytes, end: bool) -> None:
        assert self.proc.stdin is not None
        try:
            if data:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            if end:
                self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        super().terminate()


def _ps_literal(script: str, var: str) -> str:
    m = re.search(rf"^\${var} = '((?:[^']|'')*)'$", script, re.M)
    assert m, f"${var} not found in script"
    return m.group(1).replace("''", "'")


def check_manifest(root: Path) -> list[str]:
    """What the agent's Test-PayloadIntegrity does, on the sandbox copy."""
    listed = []
    for line in (root / "MANIFEST.sha256").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
        listed.append(rel)
    return listed


# --- the endpoint ------------------------------------------------------------------------

@dataclass
class Shell:
    id: str
    commands: dict[str, GuestProcess] = field(default_factory=dict)


class WSManEndpoint:
    def __init__(self, sandbox: Path, cert: Cert | None, auth: str = "basic") -> None:
        self.sandbox = sandbox
        self.cert = cert
        self.auth = auth
        self.shells: dict[str, Shell] = {}
        self.envelopes: list[tuple[str, int]] = []      # (operation, request bytes)
        self.handlers: list[tuple[str, Callable[[str], tuple[bytes, bytes, int]]]] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pushed_lines: dict[str, int] = {}
        self.max_request_bytes: int | None = None
        self.fault_next: tuple[int, str] | None = None
        self.corrupt_push = False
        self.encrypted_requests = 0
        self.refused_plaintext = 0
        self.scenario = "ok"
        self.receive_wait = 0.2
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert.cert_pem, cert.key_pem)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WSManEndpoint:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for shell in self.shells.values():
            for proc in shell.commands.values():
                proc.terminate()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    # --- SOAP ----------------------------------------------------------------------------
    def handle(self, body: bytes) -> tuple[int, bytes]:
        root = ET.fromstring(body)
        assert root.tag == f"{{{NS['s']}}}Envelope", root.tag
        header = root.find("s:Header", NS)
        assert header is not None
        action = header.findtext("a:Action", namespaces=NS)
        message_id = header.findtext("a:MessageID", namespaces=NS)
        assert message_id and message_id.startswith("uuid:"), message_id
        assert header.findtext("w:ResourceURI", namespaces=NS) == SHELL_URI
        op = ACTIONS.get(action or "")
        assert op, f"unexpected action {action}"
        with self.lock:
            self.envelopes.append((op, len(body)))
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            return 500, fault(message_id, FAULT_MAX_ENVELOPE,
                              "The WS-Management service cannot process the request because "
                              "the request size exceeded the configured MaxEnvelopeSize quota.")
        if self.fault_next is not None:
            (code, text), self.fault_next = self.fault_next, None
            return 500, fault(message_id, code, text)
        shell_id = header.findtext("w:SelectorSet/w:Selector[@Name='ShellId']", namespaces=NS)
        body_el = root.find("s:Body", NS)
        assert body_el is not None
        if op == "Create":
            shell = Shell(new_id())
            self.shells[shell.id] = shell
            return 200, response(message_id, action or "",
                                 f'<rsp:Shell><w:Selector Name="ShellId">{shell.id}</w:Selector>'
                                 f"<rsp:ShellId>{shell.id}</rsp:ShellId></rsp:Shell>")
        assert shell_id in self.shells, f"unknown shell {shell_id}"
        shell = self.shells[shell_id]
        if op == "Delete":
            for proc in shell.commands.values():
                proc.terminate()
            del self.shells[shell_id]
            return 200, response(message_id, action or "", "")
        if op == "Command":
            line = body_el.findtext("rsp:CommandLine/rsp:Command", namespaces=NS) or ""
            args = body_el.findtext("rsp:CommandLine/rsp:Arguments", namespaces=NS) or ""
            command_id = new_id()
            shell.commands[command_id] = self.start_command(split_command_line(line)
                                                            + split_command_line(args))
            return 200, response(message_id, action or "",
                                 f"<rsp:CommandResponse><rsp:CommandId>{command_id}"
                                 "</rsp:CommandId></rsp:CommandResponse>")
        stream = body_el.find("rsp:Send/rsp:Stream", NS)
        if op == "Send":
            assert stream is not None and stream.get("Name") == "stdin"
            proc = shell.commands[stream.get("CommandId", "")]
            proc.feed(base64.b64decode(stream.text or ""), stream.get("End") == "true")
            return 200, response(message_id, action or "", "<rsp:SendResponse/>")
        if op == "Receive":
            desired = body_el.find("rsp:Receive/rsp:DesiredStream", NS)
            assert desired is not None
            command_id = desired.get("CommandId", "")
            out, err, code = shell.commands[command_id].take(self.receive_wait)
            if not out and not err and code is None:
                return 500, fault(message_id, FAULT_TIMEOUT,
                                  "The WS-Management service cannot complete the operation "
                                  "within the time specified in OperationTimeout.")
            parts = []
            if out:
                parts.append(f'<rsp:Stream Name="stdout" CommandId="{command_id}">'
                             f"{base64.b64encode(out).decode()}</rsp:Stream>")
            if err:
                parts.append(f'<rsp:Stream Name="stderr" CommandId="{command_id}">'
                             f"{base64.b64encode(err).decode()}</rsp:Stream>")
            state = "Done" if code is not None else "Running"
            exit_xml = f"<rsp:ExitCode>{code}</rsp:ExitCode>" if code is not None else ""
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="http://schemas.'
                         f'microsoft.com/wbem/wsman/1/windows/shell/CommandState/{state}">'
                         f"{exit_xml}</rsp:CommandState>")
            body_xml = "<rsp:ReceiveResponse>" + "".join(parts) + "</rsp:ReceiveResponse>"
            return 200, response(message_id, action or "", body_xml)
        if op == "Signal":
            signal = body_el.find("rsp:Signal", NS)
            assert signal is not None
            proc = shell.commands.pop(signal.get("CommandId", ""))
            proc.terminate()
            return 200, response(message_id, action or "", "<rsp:SignalResponse/>")
        raise AssertionError(op)  # pragma: no cover

    def start_command(self, argv: list[str]) -> GuestProcess:
        assert argv and argv[0].lower() == "powershell.exe", argv
        if "-EncodedCommand" in argv:
            script = base64.b64decode(argv[argv.index("-EncodedCommand") + 1]).decode("utf-16-le")
            if script.startswith(RECEIVER_TAG):
                return Receiver(self, script)
            tag = script.splitlines()[0]
            if tag == "# stillpoint:prepare-dir":
                sandbox_path(self.sandbox, _ps_literal(script, "dir")).joinpath("lib").mkdir(
                    parents=True, exist_ok=True)
                return Finished(b"", b"", 0)
            if tag == "# stillpoint:remove":
                import shutil
                shutil.rmtree(sandbox_path(self.sandbox, _ps_literal(script, "dir")),
                              ignore_errors=True)
                return Finished(b"", b"", 0)
            if tag == "# stillpoint:leftovers":
                path = _ps_literal(script, "dir")
                left = [path] if sandbox_path(self.sandbox, path).exists() else []
                return Finished(json.dumps(left).encode() + b"\r\n", b"", 0)
            for pattern, handler in self.handlers:
                if re.search(pattern, script):
                    return Finished(*handler(script))
            return Finished(b"", b"unknown script\r\n", 1)
        if "-File" in argv:
            script = argv[argv.index("-File") + 1]
            mode = argv[argv.index("-Mode") + 1]
            install = sandbox_path(self.sandbox, script).parent
            try:
                listed = check_manifest(install)
            except (AssertionError, OSError) as err:
                return Finished(b"", f"payload check failed: {err}\r\n".encode(), 1)
            if mode == "verify":
                return Finished(json.dumps({"ok": True, "files": listed}).encode() + b"\r\n",
                                b"", 0)
            if mode == "serve":
                return AgentProcess(self, install)
        return Finished(b"", f"unsupported command {argv[:3]}\r\n".encode(), 1)

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            authenticated = False
            ntlm: Any = None

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if body:
                    self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorise(self) -> bool:
                header = self.headers.get("Authorization", "")
                if endpoint.auth == "basic":
                    expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                    if header == f"Basic {expected}":
                        return True
                    self._send(401, headers={"WWW-Authenticate": 'Basic realm="WSMAN"'})
                    return False
                if self.authenticated:
                    return True
                scheme, _, token = header.partition(" ")
                if scheme not in ("Negotiate", "NTLM") or not token:
                    self._send(401, headers={"WWW-Authenticate": "Negotiate"})
                    return False
                import spnego

                if self.ntlm is None:
                    self.ntlm = spnego.server(protocol="ntlm")
                try:
                    out = self.ntlm.step(base64.b64decode(token))
                except Exception:  # noqa: BLE001 - any NTLM failure is a 401
                    self.ntlm = None
                    self._send(401, headers={"WWW-Authenticate": "Negotiate"})
                    return False
                if not self.ntlm.complete:
                    self._send(401, headers={
                        "WWW-Authenticate": f"{scheme} {base64.b64encode(out or b'').decode()}"})
                    return False
                self.authenticated = True
                return True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not self._authorise():
                    return
                if not body:
                    self._send(200)
                    return
                encrypted = self.headers.get("Content-Type", "").startswith(
                    "multipart/encrypted")
                if endpoint.cert is None and not encrypted:
                    # What WinRM does with AllowUnencrypted = false on HTTP.
                    endpoint.refused_plaintext += 1
                    self._send(400)
                    return
                if encrypted:
                    body = unwrap(self.ntlm, body)
                    endpoint.encrypted_requests += 1
                status, payload = endpoint.handle(body)
                if encrypted:
                    content_type, payload = wrap(self.ntlm, payload)
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._send(status, payload)

        return Handler


BOUNDARY = b"--Encrypted Boundary"
SPNEGO_ENCRYPTED = "application/HTTP-SPNEGO-session-encrypted"


def unwrap(ctx: Any, body: bytes) -> bytes:
    """MS-WSMV 2.2.9.1.1: a sealed NTLM message in a two-part MIME body."""
    parts = [p for p in body.split(BOUNDARY + b"\r\n") if p]
    header, payload = parts[0], parts[1]
    length = int(header.split(b"Length=")[1].strip())
    if payload.endswith(BOUNDARY + b"--\r\n"):
        payload = payload[: -len(BOUNDARY + b"--\r\n")]
    data = payload.replace(b"\tContent-Type: application/octet-stream\r\n", b"", 1)
    sig_len = int.from_bytes(data[:4], "little")
    plain = ctx.unwrap_winrm(data[4:4 + sig_len], data[4 + sig_len:])
    assert len(plain) == length
    return plain


def wrap(ctx: Any, plain: bytes) -> tuple[str, bytes]:
    wrapped = ctx.wrap_winrm(plain)
    sealed = len(wrapped.header).to_bytes(4, "little") + wrapped.header + wrapped.data
    body = (BOUNDARY + b"\r\n\tContent-Type: " + SPNEGO_ENCRYPTED.encode() + b"\r\n"
            b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
            + str(len(plain)).encode() + b"\r\n" + BOUNDARY + b"\r\n"
            b"\tContent-Type: application/octet-stream\r\n" + sealed + BOUNDARY + b"--\r\n")
    return (f'multipart/encrypted;protocol="{SPNEGO_ENCRYPTED}";'
            'boundary="Encrypted Boundary"'), body


def new_id() -> str:
    # Not uuid.uuid4: the cassette tests make that deterministic for the client's message ids.
    return str(uuid.UUID(bytes=os.urandom(16), version=4)).upper()


def response(relates_to: str, action: str, body: str) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" '
        f'xmlns:rsp="{NS["rsp"]}"><s:Header><a:Action>{action}Response</a:Action>'
        f"<a:MessageID>uuid:{new_id().lower()}</a:MessageID>"
        f"<a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def fault(relates_to: str, code: int, text: str) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" '
        f'xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault">'
        f"<s:Header><a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body><s:Fault>"
        f"<s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>w:InternalError</s:Value>"
        f'</s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{text}</s:Text></s:Reason>'
        f'<s:Detail><f:WSManFault Code="{code}" Machine="WIN-TEST"><f:Message>{text}'
        f"</f:Message></f:WSManFault></s:Detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


# --- the fake agent (run as a separate process) ------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "cassettes" / "winrm" / "outputs"


def fake_agent_main(install: Path) -> int:
    """The agent protocol as the Windows agent speaks it, with canned writer facts."""
    scenario = os.environ.get("STILLPOINT_FAKE_SCENARIO", "ok")
    state = {"state": "idle", "targets": None}
    before = (FIXTURES / "vssadmin_list_writers_stable.txt").read_text()
    after_name = {"sql-failed-after": "vssadmin_list_writers_sql_failed.txt"}.get(
        scenario, "vssadmin_list_writers_stable.txt")
    thaw_facts = json.loads((FIXTURES / "thaw_results_sql_exchange.json").read_text())

    def writers(text: str) -> list[dict[str, Any]]:
        out = []
        for block in text.split("Writer name: ")[1:]:
            name = block.split("'")[1]
            st = int(re.search(r"State: \[(\d+)\]", block).group(1))  # type: ignore[union-attr]
            out.append({"name": name, "state": st})
        return out

    def handle(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "hello":
            return {"protocol_version": 1, "agent_version": "0.1.0", "install_dir": str(install),
                    "capabilities": {"ops": ["hello"], "quiesce": "vmware-tools-vss",
                                     "max_freeze_s": 60}, "host": {"hostname": "WIN-TEST"}}
        if op == "gather-metadata":
            return {"writers": [{"name": "vss:" + w["name"], "kind": "vss"}
                                for w in writers(before)], "raw": {"vssadmin_list_writers": before}}
        if op == "prepare":
            if scenario == "sql-failed-before":
                w = "SqlServerWriter"
                raise AgentFailure("writer-failed", f"VSS writer '{w}' is in state [8] failed "
                                   "at prepare snapshot (last error: Non-retryable error) "
                                   "before the snapshot", w)
            state["state"] = "prepared"
            return {"state": "prepared"}
        if op == "freeze":
            state["state"] = "frozen"
            return {"state": "frozen", "deadline_s": 60,
                    "quiesce": {"by": "vmware-tools-vss", "snapshot_quiesce": True,
                                "vss_backup_type": "copy"}}
        if op == "thaw":
            bad = [w for w in writers((FIXTURES / after_name).read_text()) if w["state"] != 1]
            if bad:
                raise AgentFailure("writer-failed", f"VSS writer '{bad[0]['name']}' after the "
                                   f"snapshot: state [{bad[0]['state']}]", bad[0]["name"])
            state["state"] = "thawed"
            return {"state": "thawed", "results": thaw_facts}
        if op == "status":
            return {"state": state["state"]}
        if op == "backup-complete":
            state["targets"] = args.get("targets")
            state["state"] = "completed"
            return {"state": "completed", "completed": {"success": args.get("success"),
                                                        "truncate": args.get("truncate"),
                                                        "targets": args.get("targets")}}
        if op == "install-boot-hook":
            (install / "boot-task").write_text("RestoreOnBoot")
            return {"task": "\\Stillpoint\\RestoreOnBoot"}
        if op == "uninstall":
            import shutil
            shutil.rmtree(install, ignore_errors=True)
            return {"removed": True}
        raise AgentFailure("unknown-op", f"unknown op '{op}'")

    for line in sys.stdin:
        if not line.strip():
            continue
        start = time.monotonic()
        req = json.loads(line)
        try:
            resp: dict[str, Any] = {"ok": True, "result": handle(req["op"], req.get("args", {}))}
        except AgentFailure as err:
            resp = {"ok": False, "error": err.to_json()}
        resp.update(v=1, id=req.get("id"), duration_ms=int((time.monotonic() - start) * 1000))
        sys.stdout.write(json.dumps(resp) + "\r\n")
        sys.stdout.flush()
        if req["op"] == "uninstall":
            break
    return 0


class AgentFailure(Exception):
    def __init__(self, code: str, message: str, writer: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.writer = code, message, writer

    def to_json(self) -> dict[str, Any]:
        out = {"code": self.code, "message": self.message}
        if self.writer:
            out["writer"] = self.writer
        return out


# --- fixtures shared by the WinRM tests --------------------------------------------------

@pytest.fixture
def certs(tmp_path: Path) -> tuple[Cert, Cert]:
    return make_cert(tmp_path / "tls", "winrm"), make_cert(tmp_path / "tls", "other")


def start_endpoint(tmp_path: Path, cert: Cert | None, auth: str = "basic") -> WSManEndpoint:
    return WSManEndpoint(tmp_path / "guest", cert, auth).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- tests of the endpoint itself --------------------------------------------------------

def test_command_line_round_trip() -> None:
    argv = ["powershell.exe", "-File", r"C:\Program Files\x y\a.ps1", 'say "hi"', "", "a\\b\\"]
    assert split_command_line(subprocess.list2cmdline(argv)) == argv


def test_endpoint_rejects_wrong_basic_credentials(tmp_path: Path) -> None:
    import requests

    cert = make_cert(tmp_path / "tls")
    ep = start_endpoint(tmp_path, cert)
    try:
        r = requests.post(f"https://127.0.0.1:{ep.port}/wsman", data=b"<x/>",
                          auth=(USER, "wrong"), verify=str(cert.cert_pem), timeout=5)
        assert r.status_code == 401
        assert ep.envelopes == []
    finally:
        ep.stop()


def test_sandbox_path_maps_drive_letters(tmp_path: Path) -> None:
    assert sandbox_path(tmp_path, r"C:\ProgramData\Stillpoint\agent\lib\A.ps1") == (
        tmp_path / "C" / "ProgramData" / "Stillpoint" / "agent" / "lib" / "A.ps1")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--fake-agent":
    sys.exit(fake_agent_main(Path(sys.argv[2])))
