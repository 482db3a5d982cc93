"""Translate pywinrm / requests failures into Stillpoint errors with an actionable message.

WinRM reports most problems as a SOAP fault whose `<f:WSManFault Code="...">` is a Windows
HRESULT in decimal. The codes we name here are the ones operators actually meet (quota limits
and the client-side TrustedHosts refusal); anything else keeps the server's own reason text.

    2150858793  0x80338029  operation timeout (a normal empty Receive; pywinrm retries it)
    2150859025  0x80338111  request exceeded MaxEnvelopeSizekb
    2150859173  0x803381A5  MaxShellsPerUser exceeded
    2150859174  0x803381A6  MaxConcurrentOperationsPerUser exceeded
    2150858770  0x80338012  client cannot connect / TrustedHosts refusal
"""

from __future__ import annotations

import requests
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)

from appliance.errors import (
    AuthenticationFailed,
    GuestError,
    StillpointError,
    TrustError,
)

FAULT_MAX_ENVELOPE = 2150859025
FAULT_MAX_SHELLS = 2150859173
FAULT_MAX_OPERATIONS = 2150859174
FAULT_CANNOT_CONNECT = 2150858770

_QUOTA_HINTS = {
    FAULT_MAX_ENVELOPE: (
        "MaxEnvelopeSizekb",
        "raise it in the guest (Set-Item WSMan:\\localhost\\MaxEnvelopeSizekb 8192) or lower "
        "the profile's winrm max_envelope_kb",
    ),
    FAULT_MAX_SHELLS: (
        "MaxShellsPerUser",
        "close stale shells (Restart-Service WinRM) or raise winrs MaxShellsPerUser",
    ),
    FAULT_MAX_OPERATIONS: (
        "MaxConcurrentOperationsPerUser",
        "raise winrm/config/service MaxConcurrentOperationsPerUser",
    ),
}

# Texts that identify a quota when the fault carries no (or an unknown) code.
_QUOTA_TEXTS = (
    ("maxenvelopesize", FAULT_MAX_ENVELOPE),
    ("maximum envelope size", FAULT_MAX_ENVELOPE),
    ("concurrent shells", FAULT_MAX_SHELLS),
    ("concurrent operations", FAULT_MAX_OPERATIONS),
)

# A shell that hit MaxMemoryPerShellMB does not get a WS-Man fault: its processes die with
# these messages on stderr. They are checked by `memory_quota_error`.
_MEMORY_TEXTS = ("outofmemoryexception", "paging file is too small", "maxmemorypershellmb")


class WinRMQuotaError(GuestError):
    """A WinRM quota in the guest was exceeded."""

    def __init__(self, message: str, quota: str) -> None:
        super().__init__(message)
        self.quota = quota


def _quota_from_fault(err: WSManFaultError) -> int | None:
    if err.wsman_fault_code in _QUOTA_HINTS:
        return err.wsman_fault_code
    text = f"{err.reason} {err.response}".lower()
    for needle, code in _QUOTA_TEXTS:
        if needle in text:
            return code
    return None


def memory_quota_error(where: str, stderr: bytes) -> WinRMQuotaError | None:
    """Recognise a process killed by MaxMemoryPerShellMB from its stderr."""
    text = stderr.decode("utf-8", "replace").lower()
    if any(needle in text for needle in _MEMORY_TEXTS):
        return WinRMQuotaError(
            f"{where}: the guest process ran out of memory inside its WinRM shell "
            "(MaxMemoryPerShellMB): raise it (Set-Item "
            "WSMan:\\localhost\\Plugin\\Microsoft.PowerShell\\Quotas\\MaxMemoryPerShellMB 2048)",
            "MaxMemoryPerShellMB",
        )
    return None


def translate(err: BaseException, where: str, *, pinned: bool) -> StillpointError:
    """Map one pywinrm/requests exception to a Stillpoint error; `where` names the endpoint."""
    if isinstance(err, StillpointError):
        return err
    if isinstance(err, requests.exceptions.SSLError):
        if pinned:
            return TrustError(
                f"{where}: the WinRM certificate does not match the pinned SHA-256 thumbprint "
                f"(has the listener certificate been renewed?): {err}"
            )
        return TrustError(
            f"{where}: the WinRM certificate could not be verified with the configured CA "
            f"bundle; give the issuing CA or pin the thumbprint: {err}"
        )
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return GuestError(
            f"{where}: WinRM endpoint unreachable (is the HTTPS listener on and the firewall "
            f"open? `winrm quickconfig -transport:https`): {type(err).__name__}"
        )
    if isinstance(err, InvalidCredentialsError):
        return AuthenticationFailed(
            f"{where}: WinRM rejected the credentials (HTTP 401). Check user and password; a "
            "local (non-domain) administrator over NTLM also needs "
            "LocalAccountTokenFilterPolicy=1, Kerberos needs a DNS name with an SPN"
        )
    if isinstance(err, WSManFaultError):
        quota = _quota_from_fault(err)
        if quota is not None:
            name, hint = _QUOTA_HINTS[quota]
            return WinRMQuotaError(f"{where}: WinRM quota {name} exceeded: {hint}", name)
        if err.wsman_fault_code == FAULT_CANNOT_CONNECT or "trustedhosts" in err.reason.lower():
            return TrustError(
                f"{where}: WinRM refused the connection as untrusted (TrustedHosts): use "
                f"HTTPS with a verified certificate, or Kerberos with a DNS name: {err.reason}"
            )
        return GuestError(
            f"{where}: WinRM fault {err.wsman_fault_code or err.fault_subcode}: {err.reason}"
        )
    if isinstance(err, WinRMOperationTimeoutError):
        return GuestError(f"{where}: WinRM operation timed out")
    if isinstance(err, WinRMTransportError):
        return GuestError(f"{where}: WinRM HTTP {err.code}: {err.response_text[:200]}")
    if isinstance(err, WinRMError):
        return GuestError(f"{where}: WinRM error: {err}")
    if isinstance(err, OSError):
        return GuestError(f"{where}: {err}")
    return GuestError(f"{where}: {type(err).__name__}: {err}")
