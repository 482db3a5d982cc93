"""Logged-in vCenter sessions: connect(), keepalive, transparent re-login, credentials.

`connect(endpoint)` checks trust first (CA-verified or thumbprint-pinned, see tls.py), then
logs in. The session keeps itself alive (a light `currentSession` read every few minutes
from a daemon thread) and logs in again by itself when vCenter answers NotAuthenticated
(an expired or terminated session during a long copy), retrying the call once.

The password lives only in VCenterEndpoint (its repr hides it) and is never logged.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Self

from pyVim.connect import SmartStubAdapter
from pyVmomi import SoapStubAdapter, vim, vmodl

from appliance.errors import AuthenticationFailed, TrustError, VSphereError
from appliance.vsphere.credentials import Credentials, load_credentials
from appliance.vsphere.tls import explain_verify_failure, trust_context

__all__ = [
    "DEFAULT_KEEPALIVE_SECONDS",
    "Credentials",
    "VCenterEndpoint",
    "VSphereSession",
    "connect",
    "load_credentials",
]

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE_SECONDS = 300.0  # vCenter's idle session timeout is 30 min by default
_NO_RELOGIN = {"Login", "Logout", "LoginByToken", "LoginExtensionByCertificate"}


@dataclass(frozen=True, kw_only=True)
class VCenterEndpoint:
    """Where vCenter is and how to trust and log in to it (keyword arguments only)."""

    host: str
    port: int = 443
    user: str
    password: str = field(repr=False)
    thumbprint_sha256: str | None = None
    ca_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        return trust_context(self.thumbprint_sha256, self.ca_file)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _ReloginStub(SoapStubAdapter):  # type: ignore[misc]
    """A SOAP stub that logs in again and retries once when vCenter says NotAuthenticated."""

    relogin: Any = None  # set by VSphereSession: a callable taking no argument
    # Set in the thread that is logging in again: its own calls must not recurse.
    in_relogin = threading.local()

    def InvokeMethod(self, mo, info, args, outerStub=None):
        try:
            return self._invoke(mo, info, args, outerStub)
        except ssl.SSLCertVerificationError as err:
            raise TrustError(f"vCenter's certificate no longer verifies: {err}") from err
        except (OSError, http.client.HTTPException) as err:
            # vCenter went away mid-job (connection refused or reset, TLS EOF): a VSphereError,
            # not a foreign exception that the CLI can only call an internal error.
            raise VSphereError(
                f"vCenter {getattr(self, 'host', '')} cannot be reached during "
                f"{getattr(info, 'wsdlName', 'a call')} ({type(err).__name__}: {err}): check "
                "that it is up and reachable, then run again") from err

    def _invoke(self, mo, info, args, outerStub=None):
        try:
            return super().InvokeMethod(mo, info, args, outerStub)
        except vim.fault.NotAuthenticated:
            if (
                self.relogin is None
                or getattr(info, "wsdlName", "") in _NO_RELOGIN
                or getattr(self.in_relogin, "active", False)
            ):
                raise
            log.info("vCenter session expired; logging in again")
            self.relogin()
            return super().InvokeMethod(mo, info, args, outerStub)


class VSphereSession:
    """One logged-in vCenter session. Use `connect()` to make one; `close()` when done."""

    def __init__(
        self,
        endpoint: VCenterEndpoint,
        stub: _ReloginStub,
        keepalive_seconds: float | None = DEFAULT_KEEPALIVE_SECONDS,
    ) -> None:
        self.endpoint = endpoint
        self._stub = stub
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.relogins = 0
        self.si = vim.ServiceInstance("ServiceInstance", stub)
        # Any: pyVmomi's stubs make every ServiceContent member Optional.
        self.content: Any = self.si.RetrieveContent()
        stub.in_relogin = threading.local()
        stub.relogin = self._relogin
        self._login()
        self._keepalive: threading.Thread | None = None
        if keepalive_seconds:
            self._keepalive = threading.Thread(
                target=self._keepalive_loop,
                args=(keepalive_seconds,),
                name=f"vsphere-keepalive-{endpoint.host}",
                daemon=True,
            )
            self._keepalive.start()

    # --- what other layers use ---------------------------------------------------------
    @property
    def cookie(self) -> str:
        """`vmware_soap_session=...` for the datastore HTTP transport (/folder/ URLs)."""
        raw = self._stub.cookie or ""
        return raw.split(";", 1)[0].strip()

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    def ssl_context(self) -> ssl.SSLContext:
        """A new client context with exactly this session's trust (CA or pin)."""
        return self.endpoint.ssl_context()

    def ensure_logged_in(self) -> None:
        """Log in again if the session is gone (e.g. after an HTTP 401 on /folder/)."""
        if self.content.sessionManager.currentSession is None:
            self._relogin()

    @property
    def instance_uuid(self) -> str:
        """The vCenter's own instance UUID: what tells two vCenters' vm-42 apart."""
        return str(getattr(self.content.about, "instanceUuid", "") or "")

    @property
    def api_type(self) -> str:
        return str(self.content.about.apiType)

    def close(self) -> None:
        """Stop the keepalive, log out (best effort) and drop pooled connections."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._stub.relogin = None
        try:
            self.content.sessionManager.Logout()
        except (vmodl.MethodFault, OSError, http.client.HTTPException, VSphereError,
                TrustError) as err:
            log.debug("logout from %s failed: %s", self.endpoint.address, err)
        self._stub.DropConnections()
        if self._keepalive is not None:
            self._keepalive.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------
    def _login(self) -> None:
        try:
            self.content.sessionManager.Login(self.endpoint.user, self.endpoint.password, None)
        except vim.fault.InvalidLogin as err:
            raise AuthenticationFailed(
                f"vCenter {self.endpoint.address} refused the login of {self.endpoint.user}"
            ) from err
        except vmodl.MethodFault as err:
            raise VSphereError(
                f"login to {self.endpoint.address} failed: {getattr(err, 'msg', err)}"
            ) from err

    def _relogin(self) -> None:
        with self._lock:
            if self._closed.is_set():
                raise VSphereError(f"session to {self.endpoint.address} is closed")
            # Other threads wait on the lock meanwhile, then find the session alive.
            self._stub.in_relogin.active = True
            try:
                if self._session_alive():
                    return
                self._stub.cookie = ""
                self._login()
                self.relogins += 1
            finally:
                self._stub.in_relogin.active = False

    def _session_alive(self) -> bool:
        # vCenter answers None for a dead session; the simulator raises NotAuthenticated.
        try:
            return self.content.sessionManager.currentSession is not None
        except vim.fault.NotAuthenticated:
            return False

    def _keepalive_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.ensure_logged_in()
            except Exception as err:  # noqa: BLE001 - a keepalive must never kill the process
                log.warning("keepalive for %s failed: %s", self.endpoint.address, err)


def connect(
    endpoint: VCenterEndpoint,
    keepalive_seconds: float | None = DEFAULT_KEEPALIVE_SECONDS,
    timeout: float = 60.0,
) -> VSphereSession:
    """Check trust, log in and return a session.

    Raises TrustError (certificate not trusted / thumbprint mismatch), AuthenticationFailed
    (wrong user or password), VSphereError (unreachable, not a vCenter/ESXi).
    """
    ctx = endpoint.ssl_context()
    try:
        probe = SmartStubAdapter(
            host=endpoint.host,
            port=endpoint.port,
            sslContext=ctx,
            httpConnectionTimeout=timeout,
        )
        stub = _ReloginStub(
            host=endpoint.host,
            port=endpoint.port,
            version=probe.version,
            sslContext=ctx,
            httpConnectionTimeout=timeout,
        )
        probe.DropConnections()
        return VSphereSession(endpoint, stub, keepalive_seconds)
    except (TrustError, AuthenticationFailed, VSphereError):
        raise
    except ssl.SSLCertVerificationError as err:
        raise explain_verify_failure(endpoint.host, endpoint.port, err) from err
    except (TimeoutError, OSError, http.client.HTTPException) as err:
        raise VSphereError(f"cannot reach vCenter at {endpoint.address}: {err}") from err
    except vmodl.MethodFault as err:
        raise VSphereError(f"vCenter {endpoint.address}: {getattr(err, 'msg', err)}") from err
    except Exception as err:  # pyVmomi raises bare Exception("... is not a VIM server")
        raise VSphereError(f"vCenter {endpoint.address}: {err}") from err
