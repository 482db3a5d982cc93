"""WinRM implementation of the guest channel: run PowerShell in a Windows guest over WS-Man.

One WinRM shell is opened per channel and kept open until `close()`: every command (the
agent's long-running JSON-lines process included) runs inside it, so the agent stays alive
across freeze, snapshot and thaw.

Security rules (the channel refuses to start otherwise):
  * HTTPS (5986) with the certificate verified against a CA bundle (or the system store), or
    pinned by its SHA-256 thumbprint. Never unverified.
  * HTTP (5985) only when `allow_http` is set, and then only with an auth that encrypts the
    messages (NTLM, Kerberos, CredSSP): pywinrm `message_encryption="always"`.
  * Basic auth only over HTTPS.

Files are pushed through the stdin of a small PowerShell receiver (`winrm_push.py`): base64
lines sized to fit MaxEnvelopeSizekb, a sha256 check in the guest, an atomic rename.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import requests
from requests.adapters import HTTPAdapter
from winrm.exceptions import WinRMOperationTimeoutError
from winrm.protocol import Protocol

from appliance.errors import GuestError, UsageError
from appliance.guest import winrm_push
from appliance.guest.channel import RunResult
from appliance.guest.winrm_faults import memory_quota_error, translate

Auth = Literal["ntlm", "kerberos", "credssp", "basic"]
_ENCRYPTING_AUTHS = ("ntlm", "kerberos", "credssp")
POWERSHELL = "powershell.exe"
PS_ARGS = ("-NoLogo", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass")
# CreateProcess allows 32767 characters; keep a margin for the interpreter's own arguments.
_MAX_COMMAND_LINE = 30000


@dataclass(frozen=True)
class WinRMOptions:
    """How to reach one Windows guest. `password` never appears in repr or logs."""

    host: str
    username: str
    password: str = field(repr=False)
    auth: Auth = "ntlm"
    port: int | None = None
    ca_bundle: str | None = None            # PEM file; None = the system trust store
    thumbprint_sha256: str | None = None    # pin instead of a CA ("AB:CD:..." or hex)
    allow_http: bool = False                # only with message encryption
    max_envelope_kb: int = 500              # WinRM's default MaxEnvelopeSizekb
    operation_timeout: int = 20
    read_timeout: int = 30
    path: str = "/wsman"

    @property
    def scheme(self) -> str:
        return "http" if self.allow_http else "https"

    @property
    def endpoint(self) -> str:
        port = self.port or (5985 if self.allow_http else 5986)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{port}{self.path}"

    def validate(self) -> None:
        if self.allow_http:
            if self.auth not in _ENCRYPTING_AUTHS:
                raise UsageError(
                    f"WinRM over HTTP needs message encryption; auth {self.auth!r} has none "
                    "(use ntlm, kerberos or credssp, or HTTPS)"
                )
            if self.ca_bundle or self.thumbprint_sha256:
                raise UsageError("a CA bundle or thumbprint makes no sense over HTTP")
        if self.thumbprint_sha256 is not None and len(normalise_thumbprint(
                self.thumbprint_sha256)) != 64:
            raise UsageError("the WinRM thumbprint must be a SHA-256 (64 hex digits)")
        if self.auth == "kerberos" and _is_ip(self.host):
            raise UsageError(
                "Kerberos needs the guest's DNS name (its SPN), not an IP address; use NTLM "
                "over HTTPS for an address"
            )
        if self.max_envelope_kb < 16:
            raise UsageError("max_envelope_kb must be at least 16")


def _no_sudo(sudo: bool | None) -> None:
    if sudo:
        raise UsageError("sudo has no meaning over WinRM: connect as an administrator")


def normalise_thumbprint(value: str) -> str:
    return value.replace(":", "").replace(" ", "").lower()


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _PinnedAdapter(HTTPAdapter):
    """An HTTPS adapter that accepts exactly one certificate, by its SHA-256 fingerprint.

    urllib3 checks `assert_fingerprint` on the DER certificate after the handshake, so the
    connection is verified by the pin instead of a CA chain (a mismatch is an SSLError).
    """

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):  # type: ignore[no-untyped-def]
        pool_kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):  # type: ignore[no-untyped-def]
        # The CA chain is replaced by the pin; urllib3 still refuses a wrong certificate.
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, False, cert)
        pool_kwargs["assert_fingerprint"] = self._fingerprint
        return host_params, pool_kwargs


def encode_powershell(script: str) -> str:
    """`-EncodedCommand` takes base64 of the UTF-16LE script."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


def powershell_argv(script: str) -> list[str]:
    """argv that runs `script` in Windows PowerShell 5.1 without profile or prompts."""
    return [POWERSHELL, *PS_ARGS, "-EncodedCommand", encode_powershell(script)]


def _command_line(argv: Sequence[str]) -> tuple[str, list[str]]:
    # WinRM takes one command line; quote each argument the way the MS C runtime parses it.
    if not argv:
        raise UsageError("empty argv")
    quoted = [subprocess.list2cmdline([a]) for a in argv]
    if sum(len(q) + 1 for q in quoted) > _MAX_COMMAND_LINE:
        raise UsageError("command line too long for Windows; push a script file instead")
    return quoted[0], quoted[1:]


class WinRMProcess:
    """A process started in the channel's shell with a stdin pipe: JSON lines in and out."""

    def __init__(self, channel: WinRMChannel, command_id: str, what: str) -> None:
        self._channel = channel
        self._command_id = command_id
        self._what = what
        self._buffer = b""
        self._stderr = b""
        self.exit_code: int | None = None

    def write_line(self, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        self._channel._call(
            lambda p: p.send_command_input(self._channel.shell_id, self._command_id, data))

    def read_line(self, timeout: float) -> str | None:
        """The next stdout line without its newline; None at EOF; GuestError on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self.exit_code is not None:
                quota = memory_quota_error(self._what, self._stderr)
                if quota is not None:
                    raise quota
                if self._buffer:
                    line, self._buffer = self._buffer, b""
                    return line.decode("utf-8").rstrip("\r")
                return None
            if time.monotonic() > deadline:
                raise GuestError(f"{self._what}: no answer within {timeout:.0f} s")
            self._receive()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8").rstrip("\r")

    def _receive(self) -> None:
        try:
            out, err, code, done = self._channel.protocol.get_command_output_raw(
                self._channel.shell_id, self._command_id)
        except WinRMOperationTimeoutError:
            return  # nothing written within the operation timeout: ask again
        except Exception as err_:  # noqa: BLE001 - translated at this boundary
            raise translate(err_, self._channel.where, pinned=self._channel.pinned) from err_
        self._buffer += out
        self._stderr += err
        if done:
            self.exit_code = code

    def stderr_text(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    def close(self, timeout: float = 10.0) -> int | None:
        """Close stdin, wait briefly for the exit, then terminate and free the command."""
        ch = self._channel
        try:
            if self.exit_code is None:
                ch._call(lambda p: p.send_command_input(ch.shell_id, self._command_id, b"",
                                                        end=True))
                deadline = time.monotonic() + timeout
                while self.exit_code is None and time.monotonic() < deadline:
                    self._receive()
        finally:
            # Signal terminate + free the command id, even if the process already ended.
            ch._call(lambda p: p.cleanup_command(ch.shell_id, self._command_id))
        return self.exit_code


class WinRMChannel:
    """GuestChannel over WinRM: put_file / run / open_process / close."""

    def __init__(self, options: WinRMOptions, protocol: Protocol | None = None) -> None:
        options.validate()
        self.options = options
        self.where = f"winrm {options.username}@{options.host}"
        self.pinned = options.thumbprint_sha256 is not None
        self.protocol = protocol or self._make_protocol()
        self._shell_id: str | None = None

    # --- connection ---------------------------------------------------------------------
    def _make_protocol(self) -> Protocol:
        o = self.options
        protocol = Protocol(
            endpoint=o.endpoint,
            transport=o.auth,
            username=o.username,
            password=o.password,
            server_cert_validation="validate",
            # None: no env-var CA; the system store (True) unless a bundle is given.
            ca_trust_path=o.ca_bundle if o.ca_bundle else None,  # type: ignore[arg-type]
            message_encryption="always" if o.allow_http else "auto",
            operation_timeout_sec=o.operation_timeout,
            read_timeout_sec=o.read_timeout,
            proxy=None,
        )
        protocol.max_env_sz = o.max_envelope_kb * 1024
        if o.thumbprint_sha256:
            transport = protocol.transport
            fingerprint = normalise_thumbprint(o.thumbprint_sha256)
            original = transport.build_session

            def build_pinned() -> requests.Session:
                fresh = transport.session is None
                session = original()
                if fresh:
                    session.verify = False  # replaced by the pin below, never unverified
                    session.mount("https://", _PinnedAdapter(fingerprint))
                return session

            transport.build_session = build_pinned  # type: ignore[method-assign]
        return protocol

    def _call(self, fn):  # type: ignore[no-untyped-def]
        try:
            return fn(self.protocol)
        except Exception as err:  # noqa: BLE001 - translated at this boundary
            raise translate(err, self.where, pinned=self.pinned) from err

    @property
    def shell_id(self) -> str:
        if self._shell_id is None:
            self._shell_id = self._call(lambda p: p.open_shell(codepage=65001))
        return self._shell_id

    # --- GuestChannel -------------------------------------------------------------------
    def run(self, argv: Sequence[str], stdin: bytes | None = None, sudo: bool | None = None,
            timeout: float = 60.0) -> RunResult:
        """Run argv to completion in the shell; a non-zero exit is a result."""
        _no_sudo(sudo)
        command, args = _command_line(argv)
        command_id = self._call(lambda p: p.run_command(
            self.shell_id, command, args, console_mode_stdin=stdin is None, skip_cmd_shell=True))
        out, err, code = b"", b"", -1
        deadline = time.monotonic() + timeout
        try:
            if stdin is not None:
                self._call(lambda p: p.send_command_input(self.shell_id, command_id, stdin,
                                                          end=True))
            while True:
                try:
                    o, e, code, done = self.protocol.get_command_output_raw(self.shell_id,
                                                                            command_id)
                except WinRMOperationTimeoutError:
                    o, e, done = b"", b"", False
                except Exception as exc:  # noqa: BLE001 - translated at this boundary
                    raise translate(exc, self.where, pinned=self.pinned) from exc
                out, err = out + o, err + e
                if done:
                    break
                if time.monotonic() > deadline:
                    raise GuestError(f"{self.where}: {argv[0]} did not finish in {timeout:.0f} s")
        finally:
            self._call(lambda p: p.cleanup_command(self.shell_id, command_id))
        quota = memory_quota_error(self.where, err) if code != 0 else None
        if quota is not None:
            raise quota
        return RunResult(tuple(argv), code, out, err)

    def run_powershell(self, script: str, timeout: float = 60.0) -> RunResult:
        return self.run(powershell_argv(script), timeout=timeout)

    def open_process(self, argv: Sequence[str], sudo: bool | None = None) -> WinRMProcess:
        """Start argv with a stdin pipe in the channel's long-lived shell."""
        _no_sudo(sudo)
        command, args = _command_line(argv)
        command_id = self._call(lambda p: p.run_command(
            self.shell_id, command, args, console_mode_stdin=False, skip_cmd_shell=True))
        return WinRMProcess(self, command_id, f"{self.where}: {argv[0]}")

    def chunk_size(self) -> int:
        """Raw bytes per stdin line so one Send envelope stays under MaxEnvelopeSizekb."""
        return winrm_push.chunk_size(self.options.max_envelope_kb)

    def put_file(self, source: Path | bytes, remote: str, mode: int = 0o600,
                 timeout: float = 600.0) -> None:
        """Copy a file into the guest through the receiver, verified by sha256 there.

        `mode` has no Windows meaning: the agent's directory ACL (SYSTEM and
        Administrators only) is what protects the files.
        """
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        proc = self.open_process(powershell_argv(winrm_push.receiver_script(remote, digest)))
        try:
            size = self.chunk_size()
            for start in range(0, len(data), size):
                proc.write_line(base64.b64encode(data[start:start + size]).decode("ascii"))
            proc.write_line(winrm_push.END_MARKER)
            line = proc.read_line(timeout)
        finally:
            proc.close()
        try:
            answer = json.loads(line or "{}")
        except ValueError:
            answer = {"error": (line or "")[:200]}
        if not answer.get("ok") or answer.get("sha256") != digest:
            raise GuestError(
                f"{self.where}: pushed {remote} but the guest computed sha256 "
                f"{answer.get('sha256')}, expected {digest} {answer.get('error', '')} "
                f"{proc.stderr_text()[-300:]}".rstrip()
            )

    def close(self) -> None:
        if self._shell_id is not None:
            shell_id, self._shell_id = self._shell_id, None
            try:
                self.protocol.close_shell(shell_id)
            except Exception as err:  # noqa: BLE001 - translated at this boundary
                raise translate(err, self.where, pinned=self.pinned) from err

    def __enter__(self) -> WinRMChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
