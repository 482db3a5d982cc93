"""Create a VM through an OVF import lease and stream its disks into it: the path that works
on every datastore type (vSAN and vVols have no flat files a datastore PUT could write).

    lease = ImportLease.open(session, spec, placement)   # ResourcePool.ImportVApp, lease ready
    lease.vm                                             # the VM being imported
    for url, vmdk in zip(lease.disk_urls(), streams):    # disks in device order
        lease.upload(url, vmdk, advance)                 # POST application/x-vnd.vmware-streamVmdk
    lease.complete()                                     # or lease.abort(): vCenter drops the VM

The disks go as streamOptimized VMDKs (appliance/transport/stream_optimized.py), the only
form an import lease takes for a disk. The lease expires unless told of progress: uploads
report it (HttpNfcLeaseProgress) at least every PROGRESS_EVERY_S.

Trust: a device URL on the vCenter host itself (or "*", which means it) uses the session's
context (pinned or CA-verified). A URL on an ESXi host needs a CA-verified session: the lease
offers only a SHA-1 thumbprint, which this appliance does not take as a pin.
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl

from appliance.errors import TransportError, TrustError, VSphereError
from appliance.vsphere.props import retrieve_one
from appliance.vsphere.session import VSphereSession
from appliance.vsphere.tls import PinnedSSLContext

__all__ = ["ImportLease", "LEASE_READY_TIMEOUT_S"]

LEASE_READY_TIMEOUT_S = 600.0
PROGRESS_EVERY_S = 20.0
PIECE = 1 << 20
STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"


def _fault_text(err: Any) -> str:
    return str(getattr(err, "msg", "") or getattr(err, "localizedMessage", "") or err)


@dataclass
class ImportLease:
    session: VSphereSession
    lease: Any
    vm: Any
    device_urls: list[Any]
    _last_progress: float = 0.0

    @classmethod
    def open(cls, session: VSphereSession, spec: vim.vm.ConfigSpec, where: Any,
             timeout_s: float = LEASE_READY_TIMEOUT_S) -> ImportLease:
        """ImportVApp of a VM made from `spec` in `where` (a Placement); waits until the
        lease is ready."""
        try:
            lease = where.pool.ImportVApp(spec=vim.vm.VmImportSpec(configSpec=spec),
                                          folder=where.folder, host=where.host)
        except vmodl.MethodFault as err:
            raise VSphereError(f"importing VM {spec.name} failed: {_fault_text(err)}") from err
        deadline = time.monotonic() + timeout_s
        while True:
            props = retrieve_one(session, lease, ["state", "error", "info"])
            state = str(props.get("state", ""))
            if state == "ready":
                break
            if state == "error":
                raise VSphereError(f"the import lease for {spec.name} failed: "
                                   f"{_fault_text(props.get('error'))}")
            if state == "done":
                raise VSphereError(f"the import lease for {spec.name} ended before any upload")
            if time.monotonic() > deadline:
                raise VSphereError(f"the import lease for {spec.name} was not ready after "
                                   f"{timeout_s:.0f} s (state {state or 'unknown'})")
            time.sleep(1.0)
        info = props["info"]
        return cls(session, lease, info.entity, list(info.deviceUrl or []))

    def disk_urls(self) -> list[Any]:
        """The lease's disk device URLs, in the VM's device order."""
        return [u for u in self.device_urls if getattr(u, "disk", False)]

    # -- transfer ---------------------------------------------------------------------------

    def _endpoint(self, url: str) -> tuple[str, int, str, ssl.SSLContext, bool]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https":
            raise TransportError(f"the import lease offered a non-HTTPS URL: {url}")
        host = parts.hostname or "*"
        on_vcenter = host in ("*", self.session.host)
        ctx = self.session.ssl_context()
        if not on_vcenter and isinstance(ctx, PinnedSSLContext):
            raise TrustError(f"the import lease sends the disks to ESXi host {host}, whose "
                             "certificate this session cannot verify: it pins vCenter's only "
                             "(give the profile vcenter.ca_file, the VMCA root, to reach hosts)")
        if host == "*":   # "the host you asked": vCenter, on the session's port
            host, port = self.session.host, self.session.port
        else:
            port = parts.port or 443
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        return host, port, target, ctx, on_vcenter

    def upload(self, device_url: Any, vmdk: Path, total_bytes: int, done_bytes: int,
               advance: Callable[[int], None] = lambda _n: None) -> None:
        """POST one streamOptimized VMDK to its device URL. `done_bytes` / `total_bytes`
        (over all disks) is what the lease is told as progress."""
        host, port, target, ctx, on_vcenter = self._endpoint(device_url.url)
        size = vmdk.stat().st_size
        self.session.ensure_logged_in()
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=300)
        sent = 0
        try:
            conn.putrequest("POST", target)
            if on_vcenter:
                conn.putheader("Cookie", self.session.cookie)
            conn.putheader("Content-Type", STREAM_VMDK)
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            with open(vmdk, "rb") as f:
                for piece in iter(lambda: f.read(PIECE), b""):
                    conn.send(piece)
                    sent += len(piece)
                    advance(len(piece))
                    self.progress(done_bytes + sent, total_bytes)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status not in (200, 201, 204):
                raise TransportError(f"upload of {device_url.targetId or target}: HTTP "
                                     f"{resp.status} {body[:300].decode(errors='replace')}")
        except (OSError, http.client.HTTPException) as err:
            raise TransportError(f"upload of {device_url.targetId or target} failed after "
                                 f"{sent} of {size} bytes: {err}") from err
        finally:
            conn.close()

    def progress(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        percent = min(99, int(100 * done / total)) if total else 0
        try:
            self.lease.HttpNfcLeaseProgress(percent=percent)
        except vmodl.MethodFault as err:
            raise VSphereError(f"the import lease ended during the upload: "
                               f"{_fault_text(err)}") from err

    # -- end --------------------------------------------------------------------------------

    def complete(self) -> None:
        try:
            self.lease.HttpNfcLeaseComplete()
        except vmodl.MethodFault as err:
            raise VSphereError(f"completing the import failed: {_fault_text(err)}") from err

    def abort(self) -> None:
        """Give up: vCenter removes the VM being imported. Never raises (called while
        another error is on its way)."""
        try:
            self.lease.HttpNfcLeaseAbort()
        except Exception:  # noqa: BLE001 - the lease may be gone already; the caller cleans up
            pass
