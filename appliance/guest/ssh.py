"""`SSHChannel`: the GuestChannel over SSH (paramiko), with the host key pinned.

The caller passes the guest's expected host public key ("ssh-ed25519 AAAA..." as in
known_hosts or a .pub file); anything else is refused before authentication
(RejectPolicy; a different key -> TrustError showing both SHA256 fingerprints). paramiko's
exceptions never leave this module: auth -> AuthenticationFailed, host key -> TrustError,
no connection / broken channel -> GuestError. Passwords never go into argv or logs: sudo
with a password reads it on stdin (`sudo -S -p ''`).
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import shlex
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import paramiko

from appliance.errors import AuthenticationFailed, GuestError, TrustError, UsageError
from appliance.guest.channel import RunResult


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_public_key(text: str) -> paramiko.PKey:
    """A key from "[host] type base64 [comment]" (known_hosts or .pub line)."""
    tokens = text.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                return paramiko.PKey.from_type_string(tok, base64.b64decode(tokens[i + 1]))
            except (ValueError, paramiko.SSHException) as err:
                raise UsageError(f"not a usable SSH public key: {err}") from err
    raise UsageError("known_host_key must look like 'ssh-ed25519 AAAA...'")


class SSHStream:
    """The agent process's stdin/stdout over one SSH session channel."""

    def __init__(self, chan: paramiko.Channel, preamble: bytes = b"") -> None:
        self._chan = chan
        self._buf = bytearray()
        self._err = bytearray()
        self._eof = False
        if preamble:
            self._send(preamble)

    def _send(self, data: bytes) -> None:
        try:
            self._chan.sendall(data)
        except (OSError, paramiko.SSHException) as err:
            raise GuestError(f"SSH channel to the agent is closed: {err}") from err

    def write_line(self, line: str) -> None:
        self._send(line.encode() + b"\n")

    def _drain_stderr(self) -> None:
        while self._chan.recv_stderr_ready():
            self._err.extend(self._chan.recv_stderr(65536))

    def read_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                if self._buf:
                    line, self._buf = bytes(self._buf), bytearray()
                    return line.decode("utf-8", "replace")
                return None
            self._drain_stderr()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"no answer from the agent within {timeout:.0f} s")
            self._chan.settimeout(min(left, 0.5))
            try:
                chunk = self._chan.recv(65536)
            except TimeoutError:
                continue
            except (OSError, paramiko.SSHException) as err:
                raise GuestError(f"SSH channel to the agent broke: {err}") from err
            if not chunk:
                self._eof = True
            self._buf.extend(chunk)
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode("utf-8", "replace")

    def stderr_text(self) -> str:
        self._drain_stderr()
        return bytes(self._err).decode("utf-8", "replace")

    def close(self) -> int | None:
        try:
            self._chan.shutdown_write()
            deadline = time.monotonic() + 30
            while not self._chan.exit_status_ready() and time.monotonic() < deadline:
                self._drain_stderr()
                if self._chan.recv_ready():
                    self._chan.recv(65536)
                time.sleep(0.05)
            status = self._chan.recv_exit_status() if self._chan.exit_status_ready() else None
        except (OSError, paramiko.SSHException):
            status = None
        self._chan.close()
        return status


class SSHChannel:
    def __init__(self, host: str, port: int, user: str, *, known_host_key: str,
                 key_path: str | Path | None = None, password: str | None = None,
                 sudo: bool = False, connect_timeout: float = 15.0) -> None:
        if key_path is None and password is None:
            raise UsageError("SSHChannel needs key_path or password")
        self.host, self.port, self.user, self.sudo = host, port, user, sudo
        self._password = password
        self._sftp: paramiko.SFTPClient | None = None
        expected = parse_public_key(known_host_key)
        self._client = paramiko.SSHClient()
        name = host if port == 22 else f"[{host}]:{port}"
        self._client.get_host_keys().add(name, expected.get_name(), expected)
        self._client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self._client.connect(
                host, port=port, username=user, password=password,
                key_filename=str(key_path) if key_path else None, timeout=connect_timeout,
                banner_timeout=connect_timeout, auth_timeout=connect_timeout,
                allow_agent=False, look_for_keys=False,
            )
        except paramiko.BadHostKeyException as err:
            self._client.close()
            raise TrustError(
                f"SSH host key of {host}:{port} does not match: got {fingerprint(err.key)}, "
                f"expected {fingerprint(err.expected_key)}") from err
        except paramiko.AuthenticationException as err:
            self._client.close()
            raise AuthenticationFailed(f"SSH authentication as {user}@{host}:{port} failed") from err
        except paramiko.SSHException as err:
            self._client.close()
            if "known_hosts" in str(err) or "host key" in str(err).lower():
                raise TrustError(f"SSH host key of {host}:{port} is not the expected "
                                 f"{fingerprint(expected)}: {err}") from err
            raise GuestError(f"SSH to {host}:{port} failed: {err}") from err
        except (OSError, EOFError) as err:
            self._client.close()
            raise GuestError(f"cannot reach {host}:{port} over SSH: {err}") from err
        transport = self._client.get_transport()
        if transport is not None:
            # The agent session stays open across the snapshot and the disk copy: keep
            # idle connections alive through NAT and firewalls.
            transport.set_keepalive(30)

    # --- helpers -------------------------------------------------------------------------
    def _command(self, argv: Sequence[str], sudo: bool | None) -> tuple[str, bytes]:
        """The remote command line and the bytes to send first (a sudo password)."""
        use_sudo = self.sudo if sudo is None else sudo
        if not use_sudo:
            return shlex.join(argv), b""
        if self._password is not None:
            return shlex.join(["sudo", "-S", "-p", "", "--", *argv]), (
                self._password.encode() + b"\n")
        return shlex.join(["sudo", "-n", "--", *argv]), b""

    def _session(self) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"SSH connection to {self.host}:{self.port} is closed")
        try:
            return transport.open_session()
        except paramiko.SSHException as err:
            raise GuestError(f"cannot open an SSH session: {err}") from err

    # --- GuestChannel --------------------------------------------------------------------
    def run(self, argv: Sequence[str], stdin: bytes | None = None, sudo: bool | None = None,
            timeout: float = 60.0) -> RunResult:
        command, preamble = self._command(argv, sudo)
        chan = self._session()
        try:
            chan.exec_command(command)
            if preamble or stdin:
                chan.sendall(preamble + (stdin or b""))
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out.extend(chan.recv(65536))
                elif chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(65536))
                elif chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                elif time.monotonic() > deadline:
                    raise GuestError(f"{argv[0]} did not finish within {timeout:.0f} s")
                else:
                    time.sleep(0.01)
            return RunResult(tuple(argv), chan.recv_exit_status(), bytes(out), bytes(err))
        except (OSError, paramiko.SSHException) as err:
            raise GuestError(f"running {argv[0]} over SSH failed: {err}") from err
        finally:
            chan.close()

    def open_process(self, argv: Sequence[str], sudo: bool | None = None) -> SSHStream:
        command, preamble = self._command(argv, sudo)
        chan = self._session()
        try:
            chan.exec_command(command)
        except paramiko.SSHException as err:
            chan.close()
            raise GuestError(f"cannot start {argv[0]} over SSH: {err}") from err
        return SSHStream(chan, preamble)

    def put_file(self, source: Path | bytes, remote: str, mode: int = 0o600) -> None:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        use_sudo = self.sudo
        try:
            if self._sftp is None:
                self._sftp = self._client.open_sftp()
            sftp = self._sftp
        except (OSError, paramiko.SSHException) as err:
            raise GuestError(f"cannot open SFTP: {err}") from err
        try:
            # Upload beside the target (or to the user's /tmp when sudo must move it), then
            # rename: the target never exists half-written.
            tmp = f"/tmp/.stillpoint-{uuid.uuid4().hex}" if use_sudo else \
                f"{remote}.part-{uuid.uuid4().hex[:8]}"
            with sftp.open(tmp, "wb") as fh:
                fh.write(data)
            sftp.chmod(tmp, 0o600 if use_sudo else mode)
            if not use_sudo:
                sftp.posix_rename(tmp, remote)
        except (OSError, paramiko.SSHException) as err:
            try:
                sftp.remove(tmp)
            except (OSError, paramiko.SSHException):
                pass    # it may never have been created
            raise GuestError(f"cannot upload {remote}: {err}"
                             + self._full_note(posixpath.dirname(tmp), len(data))) from err
        if use_sudo:
            res = self.run(["install", "-m", f"{mode:o}", "-o", "root", "-g", "root", tmp, remote])
            self.run(["rm", "-f", tmp], sudo=False)
            if not res.ok:
                raise GuestError(f"cannot install {remote}: {res.text()}")

    def _full_note(self, directory: str, need: int) -> str:
        """Why an upload failed when it was space: SFTP says only "Failure" on ENOSPC."""
        try:
            res = self.run(["df", "-Pk", directory], sudo=False, timeout=30)
            free = int(res.stdout.decode().splitlines()[-1].split()[3]) * 1024
        except (GuestError, ValueError, IndexError):
            return ""
        if free >= need:
            return ""
        return (f"; the guest's file system holding {directory} is full ({free} bytes free, "
                f"{need} needed)")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SSHChannel", "SSHStream", "fingerprint", "parse_public_key"]
