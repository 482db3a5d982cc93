"""SSHChannel pieces that need no server: key parsing, fingerprints, sudo command lines.
(Connecting, host-key rejection and auth failure are in tests/lab/test_agent_local.py.)"""

from __future__ import annotations

import base64
import hashlib

import paramiko
import pytest

from appliance.errors import GuestError, UsageError
from appliance.guest.ssh import SSHChannel, fingerprint, parse_public_key


def test_parse_known_hosts_and_pub_lines() -> None:
    blob = paramiko.ECDSAKey.generate().asbytes()
    b64 = base64.b64encode(blob).decode()
    for line in (f"ecdsa-sha2-nistp256 {b64} root@guest", f"[10.0.0.5]:22 ecdsa-sha2-nistp256 {b64}"):
        parsed = parse_public_key(line)
        assert parsed.asbytes() == blob
        expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        assert fingerprint(parsed) == expected


def test_bad_keys_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        parse_public_key("not a key")
    with pytest.raises(UsageError):
        SSHChannel("127.0.0.1", 22, "root", known_host_key="ssh-ed25519 AAAA")


def test_unreachable_is_a_guest_error() -> None:
    blob = base64.b64encode(paramiko.ECDSAKey.generate().asbytes()).decode()
    with pytest.raises(GuestError, match="cannot reach"):
        SSHChannel("127.0.0.1", 1, "root", password="x", connect_timeout=2,
                   known_host_key=f"ecdsa-sha2-nistp256 {blob}")


def test_sudo_password_goes_to_stdin_not_argv() -> None:
    chan = SSHChannel.__new__(SSHChannel)
    chan.sudo, chan._password = True, "s3cret pass"
    command, preamble = chan._command(["stillpoint-agent", "serve"], None)
    assert "s3cret" not in command and command.startswith("sudo -S -p '' -- ")
    assert preamble == b"s3cret pass\n"
    chan._password = None
    assert chan._command(["id"], None) == ("sudo -n -- id", b"")
    assert chan._command(["id"], False) == ("id", b"")
