"""Select VMs by vSphere tag, through the vSphere Automation REST API (best effort).

Tags are not part of the SOAP API that pyVmomi speaks: they live in the Automation REST
API (`/rest/com/vmware/cis/tagging/...`, vCenter 6.5 and later). This module opens a
short REST session with the endpoint's credentials and the session's TLS trust (same CA
or pin), looks the tag up and lists the VMs attached to it. Where the REST API is not
served (ESXi without vCenter, or a simulator without it) it raises TagsUnavailable with a
clear message rather than guessing.
"""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any, Self
from urllib.parse import quote

from pyVmomi import vim

from appliance.errors import AuthenticationFailed, NotFound, UsageError, VSphereError
from appliance.vsphere.session import VSphereSession

__all__ = ["RestSession", "TagsUnavailable", "find_vms_by_tag"]

_BASE = "/rest/com/vmware/cis"


class TagsUnavailable(VSphereError):
    """vSphere tags are not available here (the vSphere Automation REST API is missing)."""


class RestSession:
    """A vSphere Automation REST session (context manager: logged out on exit)."""

    def __init__(self, session: VSphereSession, timeout: float = 60.0) -> None:
        self._vs = session
        self._conn = http.client.HTTPSConnection(
            session.host, session.port, context=session.ssl_context(), timeout=timeout
        )
        self._id: str | None = None

    def __enter__(self) -> Self:
        ep = self._vs.endpoint
        basic = base64.b64encode(f"{ep.user}:{ep.password}".encode()).decode()
        status, body = self._request(
            "POST", f"{_BASE}/session", None, {"Authorization": f"Basic {basic}"}
        )
        if status in (404, 405, 501):
            self._conn.close()
            raise TagsUnavailable(
                f"vSphere tags are not available at {ep.address}: it does not serve the "
                f"vSphere Automation REST API (HTTP {status} for {_BASE}/session); select "
                f"VMs by name, inventory path, moref or folder instead"
            )
        if status in (401, 403):
            self._conn.close()
            raise AuthenticationFailed(
                f"the vSphere REST API at {ep.address} refused the login of {ep.user}"
            )
        if status != 200 or not isinstance(body, dict) or "value" not in body:
            self._conn.close()
            raise VSphereError(f"REST login at {ep.address} failed: HTTP {status}")
        self._id = str(body["value"])
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._id is not None:
                self._request("DELETE", f"{_BASE}/session", None, {})
        except VSphereError:
            pass
        finally:
            self._conn.close()

    def _request(
        self, method: str, path: str, payload: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        hdrs = {"Accept": "application/json", **headers}
        if self._id is not None:
            hdrs["vmware-api-session-id"] = self._id
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            self._conn.request(method, path, body=data, headers=hdrs)
            resp = self._conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as err:
            self._conn.close()
            raise VSphereError(
                f"REST {method} {path} at {self._vs.endpoint.address}: {err}"
            ) from err
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        """`path` below /rest/com/vmware/cis; returns the "value" of the answer."""
        status, body = self._request(method, f"{_BASE}{path}", payload, {})
        if status == 404:
            raise NotFound(f"REST {path}: not found")
        if status != 200:
            raise VSphereError(f"REST {method} {path}: HTTP {status} {body!r:.200}")
        return body.get("value") if isinstance(body, dict) else None


def find_vms_by_tag(session: VSphereSession, tag: str) -> list[vim.VirtualMachine]:
    """VMs attached to `tag` ("name" or "category/name"), sorted by moref."""
    category, _, name = tag.rpartition("/")
    if not name:
        raise UsageError(f"not a tag: {tag!r} (use 'name' or 'category/name')")
    with RestSession(session) as rest:
        matches = []
        for tag_id in rest.call("GET", "/tagging/tag") or []:
            info = rest.call("GET", f"/tagging/tag/id:{quote(tag_id, safe=':')}")
            if info.get("name") != name:
                continue
            if category:
                cat = rest.call(
                    "GET", f"/tagging/category/id:{quote(info['category_id'], safe=':')}"
                )
                if cat.get("name") != category:
                    continue
            matches.append(tag_id)
        if not matches:
            raise NotFound(f"no vSphere tag {tag!r}")
        if len(matches) > 1:
            raise UsageError(
                f"{len(matches)} tags are named {name!r} (in different categories); "
                f"write it as 'category/{name}'"
            )
        objects = (
            rest.call(
                "POST",
                f"/tagging/tag-association/id:{quote(matches[0], safe=':')}"
                "?~action=list-attached-objects",
                {},
            )
            or []
        )
    stub = session.si._stub
    return [
        vim.VirtualMachine(o["id"], stub)
        for o in sorted(objects, key=lambda o: o.get("id", ""))
        if o.get("type") == "VirtualMachine"
    ]
