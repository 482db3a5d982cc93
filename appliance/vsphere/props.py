"""PropertyCollector reads that fetch only the named properties (pathSet).

One round trip for many objects instead of one per attribute access; vmodl faults for
objects that vanished are translated to NotFound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from appliance.errors import NotFound, VSphereError
from appliance.vsphere.session import VSphereSession

__all__ = ["retrieve", "retrieve_one", "view_properties"]

_PC = vmodl.query.PropertyCollector


def _contents_to_dict(contents: Iterable[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for oc in contents:
        props = {p.name: p.val for p in oc.propSet}
        props["obj"] = oc.obj
        out[oc.obj._moId] = props
    return out


def retrieve(
    session: VSphereSession, objs: Sequence[Any], paths: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{moid: {path: value, "obj": mo}} for objects of one type; unset paths are absent."""
    if not objs:
        return {}
    spec = _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=o, skip=False) for o in objs],
        propSet=[_PC.PropertySpec(type=type(objs[0]), pathSet=list(paths), all=False)],
    )
    return _retrieve_all(session, spec)


def retrieve_one(session: VSphereSession, obj: Any, paths: Sequence[str]) -> dict[str, Any]:
    """The named properties of one object; NotFound when it does not exist (any more)."""
    found = retrieve(session, [obj], paths)
    if obj._moId not in found:
        raise NotFound(f"{obj._moId} not found")
    return found[obj._moId]


def view_properties(
    session: VSphereSession,
    root: vim.ManagedEntity,
    obj_type: type,
    paths: Sequence[str],
    recursive: bool = True,
) -> dict[str, dict[str, Any]]:
    """Properties of every object of `obj_type` below `root`, through a ContainerView that
    is destroyed afterwards."""
    view = session.content.viewManager.CreateContainerView(root, [obj_type], recursive)
    try:
        traverse = _PC.TraversalSpec(
            name="view", path="view", skip=False, type=vim.view.ContainerView
        )
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
            propSet=[_PC.PropertySpec(type=obj_type, pathSet=list(paths), all=False)],
        )
        return _retrieve_all(session, spec)
    finally:
        view.DestroyView()


def _retrieve_all(session: VSphereSession, spec: Any) -> dict[str, dict[str, Any]]:
    contents = _retrieve_contents(session, spec)
    if _not_authenticated(contents):
        # A session terminated under us can come back per property (missingSet) instead of
        # as a fault of the call: log in again and read once more, rather than take the
        # properties for unset ("vm-42 is not inside a datacenter").
        session.ensure_logged_in()
        contents = _retrieve_contents(session, spec)
        if _not_authenticated(contents):
            raise VSphereError("reading properties failed: the vCenter session is not "
                               "authenticated even after logging in again")
    return _contents_to_dict(contents)


def _not_authenticated(contents: list[Any]) -> bool:
    return any(isinstance(m.fault, vim.fault.NotAuthenticated)
               for oc in contents for m in (oc.missingSet or []))


def _retrieve_contents(session: VSphereSession, spec: Any) -> list[Any]:
    pc = session.content.propertyCollector
    try:
        result = pc.RetrievePropertiesEx([spec], _PC.RetrieveOptions())
        contents = list(result.objects) if result else []
        while result is not None and result.token:
            result = pc.ContinueRetrievePropertiesEx(result.token)
            contents.extend(result.objects)
    except vmodl.fault.ManagedObjectNotFound as err:
        raise NotFound(f"{err.obj} not found") from err
    except vmodl.MethodFault as err:
        raise VSphereError(f"reading properties failed: {getattr(err, 'msg', err)}") from err
    return contents
