"""WinRMChannel against a real local WS-Man endpoint over TLS: pywinrm's own code paths.

Covers certificate validation (CA bundle, SHA-256 pin, both failing), Basic and NTLM
authentication (a 401 becomes AuthenticationFailed), an unreachable port, the WS-Man quota
fault, the chunked push with its guest-side sha256 check, run/exit codes, and the agent's
JSON-lines process kept alive in one shell.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from test_winrm_wsman_endpoint import (
    DOMAIN,
    PASSWORD,
    USER,
    Cert,
    WSManEndpoint,
    free_port,
    make_cert,
    sandbox_path,
    start_endpoint,
)

from appliance.errors import AuthenticationFailed, GuestError, TrustError, UsageError
from appliance.guest import winrm_push
from appliance.guest.winrm_channel import WinRMChannel, WinRMOptions, powershell_argv
from appliance.guest.winrm_faults import WinRMQuotaError


@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    return make_cert(tmp_path / "tls")


@pytest.fixture
def endpoint(tmp_path: Path, cert: Cert):
    ep = start_endpoint(tmp_path, cert)
    try:
        yield ep
    finally:
        ep.stop()


def options(ep: WSManEndpoint, cert: Cert | None, **kw) -> WinRMOptions:
    base = dict(host="127.0.0.1", port=ep.port, username=USER, password=PASSWORD, auth="basic",
                ca_bundle=str(cert.cert_pem) if cert else None, operation_timeout=5,
                read_timeout=10)
    base.update(kw)
    return WinRMOptions(**base)  # type: ignore[arg-type]


def test_ca_bundle_verified_run(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.handlers.append((r"Write-Output 'hello'", lambda s: (b"hello\r\n", b"", 0)))
    endpoint.handlers.append((r"exit 7", lambda s: (b"", b"boom\r\n", 7)))
    with WinRMChannel(options(endpoint, cert)) as ch:
        res = ch.run_powershell("Write-Output 'hello'")
        assert (res.exit_code, res.stdout, res.ok) == (0, b"hello\r\n", True)
        bad = ch.run_powershell("exit 7")
        assert (bad.exit_code, bad.stderr, bad.ok) == (7, b"boom\r\n", False)
        assert len(endpoint.shells) == 1     # both commands ran in the one shell
    assert endpoint.shells == {}             # close() deleted it
    ops = [op for op, _ in endpoint.envelopes]
    assert ops[0] == "Create" and ops[-1] == "Delete"
    assert ops.count("Command") == 2 and ops.count("Signal") == 2


def test_wrong_ca_is_a_trust_error(endpoint: WSManEndpoint, tmp_path: Path) -> None:
    other = make_cert(tmp_path / "other", "other")
    with pytest.raises(TrustError, match="could not be verified"):
        WinRMChannel(options(endpoint, other)).run_powershell("x")
    assert endpoint.envelopes == []


def test_system_store_does_not_trust_a_self_signed_listener(endpoint: WSManEndpoint) -> None:
    # No bundle and no pin: the system store is used, never "unverified".
    with pytest.raises(TrustError):
        WinRMChannel(options(endpoint, None)).run_powershell("x")


def test_pinned_thumbprint(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.handlers.append((r"pinned", lambda s: (b"ok\r\n", b"", 0)))
    pin = ":".join(cert.sha256[i:i + 2] for i in range(0, 64, 2)).upper()
    ch = WinRMChannel(options(endpoint, None, thumbprint_sha256=pin))
    try:
        assert ch.run_powershell("'pinned'").stdout == b"ok\r\n"
    finally:
        ch.close()


def test_wrong_pin_is_a_trust_error(endpoint: WSManEndpoint) -> None:
    ch = WinRMChannel(options(endpoint, None, thumbprint_sha256="ab" * 32))
    with pytest.raises(TrustError, match="pinned SHA-256"):
        ch.run_powershell("x")
    assert endpoint.envelopes == []


def test_bad_password_is_authentication_failed(endpoint: WSManEndpoint, cert: Cert) -> None:
    ch = WinRMChannel(options(endpoint, cert, password="wrong"))
    with pytest.raises(AuthenticationFailed) as info:
        ch.run_powershell("x")
    assert "wrong" not in str(info.value) and PASSWORD not in str(info.value)


def test_password_never_in_repr(endpoint: WSManEndpoint, cert: Cert) -> None:
    assert PASSWORD not in repr(options(endpoint, cert))


def test_unreachable_host_is_a_guest_error(cert: Cert) -> None:
    opts = WinRMOptions(host="127.0.0.1", port=free_port(), username=USER, password=PASSWORD,
                        auth="basic", ca_bundle=str(cert.cert_pem), operation_timeout=2,
                        read_timeout=3)
    with pytest.raises(GuestError, match="unreachable"):
        WinRMChannel(opts).run_powershell("x")


def test_ntlm_over_https(tmp_path: Path, cert: Cert, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "ntlm-users"
    users.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n")
    users.chmod(0o600)
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    ep = start_endpoint(tmp_path, cert, auth="ntlm")
    ep.handlers.append((r"whoami", lambda s: (b"lab\\stillpoint-test\r\n", b"", 0)))
    try:
        ch = WinRMChannel(options(ep, cert, auth="ntlm", username=f"{DOMAIN}\\{USER}"))
        try:
            assert ch.run_powershell("whoami").stdout == b"lab\\stillpoint-test\r\n"
        finally:
            ch.close()
        bad = WinRMChannel(options(ep, cert, auth="ntlm", username=f"{DOMAIN}\\{USER}",
                                   password="nope"))
        with pytest.raises(AuthenticationFailed):
            bad.run_powershell("whoami")
    finally:
        ep.stop()


@pytest.mark.parametrize("kw, message", [
    (dict(allow_http=True, auth="basic"), "message encryption"),
    (dict(allow_http=True, auth="ntlm", ca_bundle="/x.pem"), "makes no sense over HTTP"),
    (dict(thumbprint_sha256="abcd"), "64 hex digits"),
    (dict(auth="kerberos"), "DNS name"),
    (dict(max_envelope_kb=4), "at least 16"),
])
def test_refused_configurations(kw: dict, message: str) -> None:
    base = dict(host="127.0.0.1", username=USER, password=PASSWORD)
    base.update(kw)
    with pytest.raises(UsageError, match=message):
        WinRMChannel(WinRMOptions(**base))  # type: ignore[arg-type]


def test_http_only_with_message_encryption() -> None:
    ch = WinRMChannel(WinRMOptions(host="win.example", username=USER, password=PASSWORD,
                                   auth="ntlm", allow_http=True))
    assert ch.options.endpoint == "http://win.example:5985/wsman"
    assert ch.protocol.transport.message_encryption == "always"
    https = WinRMChannel(WinRMOptions(host="win.example", username=USER, password=PASSWORD))
    assert https.options.endpoint == "https://win.example:5986/wsman"
    assert https.protocol.transport.server_cert_validation == "validate"


def test_max_envelope_quota_fault(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.max_request_bytes = 6000
    ch = WinRMChannel(options(endpoint, cert))
    try:
        with pytest.raises(WinRMQuotaError, match="MaxEnvelopeSizekb") as info:
            ch.run_powershell("Write-Output '" + "x" * 5000 + "'")
        assert info.value.quota == "MaxEnvelopeSizekb"
    finally:
        endpoint.max_request_bytes = None
        ch.close()


@pytest.mark.parametrize("code, text, quota", [
    (2150859173, "This user is allowed a maximum number of 5 concurrent shells",
     "MaxShellsPerUser"),
    (2150859174, "allowed a maximum number of 15 concurrent operations",
     "MaxConcurrentOperationsPerUser"),
])
def test_other_quota_faults(endpoint: WSManEndpoint, cert: Cert, code: int, text: str,
                            quota: str) -> None:
    endpoint.fault_next = (code, text)
    with pytest.raises(WinRMQuotaError) as info:
        WinRMChannel(options(endpoint, cert)).run_powershell("x")
    assert info.value.quota == quota


def test_unknown_fault_keeps_the_reason(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.fault_next = (2150858778, "The specified class does not exist")
    with pytest.raises(GuestError, match="class does not exist"):
        WinRMChannel(options(endpoint, cert)).run_powershell("x")


def test_memory_quota_recognised_from_stderr(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.handlers.append((r"big", lambda s: (
        b"", b"Exception of type 'System.OutOfMemoryException' was thrown.\r\n", 1)))
    with pytest.raises(WinRMQuotaError, match="MaxMemoryPerShellMB"):
        WinRMChannel(options(endpoint, cert)).run_powershell("big")


def test_chunked_push_fits_the_envelope_and_is_verified(endpoint: WSManEndpoint,
                                                        cert: Cert) -> None:
    data = bytes(range(256)) * 400                       # 100 KiB
    ch = WinRMChannel(options(endpoint, cert, max_envelope_kb=24))
    endpoint.max_request_bytes = 24 * 1024               # the guest's MaxEnvelopeSizekb
    try:
        remote = r"C:\ProgramData\Stillpoint\agent\it's here.bin"
        ch.put_file(data, remote)
    finally:
        ch.close()
    target = sandbox_path(endpoint.sandbox, remote)
    assert target.read_bytes() == data
    sends = [size for op, size in endpoint.envelopes if op == "Send"]
    chunk = winrm_push.chunk_size(24)
    assert endpoint.pushed_lines[str(target)] == -(-len(data) // chunk) > 1
    assert max(sends) <= 24 * 1024


def test_corrupted_push_is_caught_in_the_guest(endpoint: WSManEndpoint, cert: Cert) -> None:
    endpoint.corrupt_push = True
    ch = WinRMChannel(options(endpoint, cert))
    try:
        with pytest.raises(GuestError, match="expected " + hashlib.sha256(b"payload").hexdigest()):
            ch.put_file(b"payload", r"C:\ProgramData\Stillpoint\x.bin")
    finally:
        ch.close()
    assert not sandbox_path(endpoint.sandbox, r"C:\ProgramData\Stillpoint\x.bin").exists()


def test_receiver_script_carries_path_and_hash() -> None:
    script = winrm_push.receiver_script(r"C:\a'b\c.txt", "ab" * 32)
    assert script.startswith(winrm_push.RECEIVER_TAG)
    assert r"$path = 'C:\a''b\c.txt'" in script and "$expected = '" + "ab" * 32 + "'" in script
    argv = powershell_argv(script)
    assert base64.b64decode(argv[-1]).decode("utf-16-le") == script


def test_sudo_is_refused(endpoint: WSManEndpoint, cert: Cert) -> None:
    with pytest.raises(UsageError, match="sudo"):
        WinRMChannel(options(endpoint, cert)).run(["cmd.exe"], sudo=True)


def test_open_process_lines_and_eof(endpoint: WSManEndpoint, cert: Cert, tmp_path: Path) -> None:
    # The receiver is the simplest stdin-driven process: one JSON line back, then EOF.
    ch = WinRMChannel(options(endpoint, cert))
    try:
        proc = ch.open_process(powershell_argv(
            winrm_push.receiver_script(r"C:\t\f.txt", hashlib.sha256(b"").hexdigest())))
        proc.write_line(".")
        assert json.loads(proc.read_line(10) or "")["ok"] is True
        assert proc.read_line(10) is None
        assert proc.close() == 0
    finally:
        ch.close()


def test_http_with_ntlm_message_encryption(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain HTTP: every WS-Man message is sealed with the NTLM session key (MS-WSMV
    # 2.2.9.1.1); the endpoint refuses anything unencrypted, as WinRM does by default.
    users = tmp_path / "ntlm-users"
    users.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n")
    users.chmod(0o600)
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    ep = start_endpoint(tmp_path, None, auth="ntlm")
    ep.handlers.append((r"hostname", lambda s: (b"WIN-TEST\r\n", b"", 0)))
    try:
        ch = WinRMChannel(WinRMOptions(host="127.0.0.1", port=ep.port,
                                       username=f"{DOMAIN}\\{USER}", password=PASSWORD,
                                       auth="ntlm", allow_http=True, operation_timeout=5,
                                       read_timeout=10))
        try:
            assert ch.run_powershell("hostname").stdout == b"WIN-TEST\r\n"
            ch.put_file(b"sealed bytes", r"C:\t\sealed.bin")
        finally:
            ch.close()
        assert sandbox_path(ep.sandbox, r"C:\t\sealed.bin").read_bytes() == b"sealed bytes"
        assert ep.encrypted_requests == len(ep.envelopes) > 5
        assert ep.refused_plaintext == 0
    finally:
        ep.stop()


def test_silent_process_times_out_and_is_cleaned_up(endpoint: WSManEndpoint,
                                                   cert: Cert) -> None:
    ch = WinRMChannel(options(endpoint, cert))
    try:
        proc = ch.open_process(powershell_argv(
            winrm_push.receiver_script(r"C:\t\never.bin", "0" * 64)))
        with pytest.raises(GuestError, match="no answer within"):
            proc.read_line(0.5)
        proc.close(timeout=1)
        [shell] = endpoint.shells.values()
        assert shell.commands == {}          # Signal freed the command in the guest
    finally:
        ch.close()
