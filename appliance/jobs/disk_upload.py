"""How a restored VM is made and its disks written, by the kind of datastore it goes to.

    method = choose(session, placement, requested)      # "auto" | "datastore-http" | "nfc"
    vm = method.create_and_fill(session, spec, placement, disks, images, progress, result)

    datastore-http  CreateVM_Task, then each disk's flat file PUT over /folder/ and read back
                    (SHA-256 of what was sent = what the datastore holds). The fast path; needs
                    a datastore of files (VMFS, NFS, ...).
    nfc             ResourcePool.ImportVApp and its HttpNfcLease: each disk streamed as a
                    streamOptimized VMDK. Works on every datastore type; the one way onto vSAN
                    and vVols, which have no flat files. Not read back: such a datastore has no
                    file to read, and the lease's stream is checked by ESXi as it lands.

`auto` takes nfc on vSAN, vVols and PMEM (inventory.OBJECT_DATASTORE_TYPES) and datastore-http
on every other type. Either way a failure
leaves no VM behind (the caller destroys what it got; an aborted lease is removed by vCenter
and, if it is still there, by us).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyVmomi import vim

from appliance.errors import StillpointError, UsageError
from appliance.progress import Progress
from appliance.transport.stream_optimized import write_stream_optimized
from appliance.vsphere import restore_vm as rv
from appliance.vsphere.nfc_import import ImportLease
from appliance.vsphere.inventory import OBJECT_DATASTORE_TYPES, datastore_types
from appliance.vsphere.session import VSphereSession

METHODS = ("auto", "datastore-http", "nfc")


class UploadMethod(Protocol):
    name: str

    def create_and_fill(self, session: VSphereSession, spec: vim.vm.ConfigSpec,
                        where: rv.Placement, disks: list[rv.RestoredDisk],
                        images: dict[int, Path], progress: Progress,
                        record: Callable[[dict[str, Any]], None]) -> Any: ...


def choose(session: VSphereSession, where: rv.Placement, requested: str,
           say: Callable[[str], None]) -> UploadMethod:
    if requested not in METHODS:
        raise UsageError(f"unknown upload method {requested!r}: use one of {', '.join(METHODS)}")
    kinds = datastore_types(session)
    if where.datastore not in kinds:
        raise UsageError(f"no datastore named {where.datastore}")
    kind = kinds[where.datastore]
    if requested == "datastore-http" and kind in OBJECT_DATASTORE_TYPES:
        raise UsageError(f"datastore {where.datastore} is {kind}: it has no flat files a "
                         "datastore PUT can write; restore with --upload nfc (or auto)")
    if requested == "nfc" or (requested == "auto" and kind in OBJECT_DATASTORE_TYPES):
        say(f"{where.datastore} is {kind}: the disks go through an OVF import lease (NFC) as "
            "streamOptimized VMDKs")
        return NfcImport()
    return DatastorePut()


@dataclass
class DatastorePut:
    name: str = "datastore-http"

    def create_and_fill(self, session: VSphereSession, spec: vim.vm.ConfigSpec,
                        where: rv.Placement, disks: list[rv.RestoredDisk],
                        images: dict[int, Path], progress: Progress,
                        record: Callable[[dict[str, Any]], None]) -> Any:
        vm = rv.create_vm(session, spec, where)
        try:
            for d, file_name, capacity in _pair(session, vm, disks):
                flat = rv.flat_of(file_name, where.datacenter_name)
                with _step(progress, f"{d.label} upload", capacity) as advance:
                    sent = rv.upload_disk(session, flat, images[d.key], capacity, advance)
                with _step(progress, f"{d.label} read-back", capacity) as advance:
                    back = rv.hash_datastore_file(session, flat, capacity, advance)
                if back != sent:
                    raise StillpointError(f"{d.label}: what the datastore holds differs from "
                                          f"what was sent (sha256 {back[:16]} != {sent[:16]})")
                record({"label": d.label, "file": file_name, "capacity": capacity,
                        "sha256": sent, "verified": True, "upload": self.name})
        except BaseException:
            _remove(session, vm, str(spec.name), progress)
            raise
        return vm


@dataclass
class NfcImport:
    name: str = "nfc"

    def create_and_fill(self, session: VSphereSession, spec: vim.vm.ConfigSpec,
                        where: rv.Placement, disks: list[rv.RestoredDisk],
                        images: dict[int, Path], progress: Progress,
                        record: Callable[[dict[str, Any]], None]) -> Any:
        streams: dict[int, Path] = {}
        for d in disks:   # before the lease: it would expire while we compress
            streams[d.key] = images[d.key].with_suffix(".stream.vmdk")
            with _step(progress, f"{d.label} streamOptimized", d.capacity) as advance:
                write_stream_optimized(images[d.key], d.capacity, streams[d.key], advance)
        lease = ImportLease.open(session, spec, where)
        try:
            urls = lease.disk_urls()
            pairs = _pair(session, lease.vm, disks)
            if len(urls) != len(pairs):
                raise StillpointError(f"the import lease offers {len(urls)} disk URLs for "
                                      f"{len(pairs)} disks")
            total = sum(streams[d.key].stat().st_size for d in disks)
            done = 0
            for (d, file_name, capacity), url in zip(pairs, urls, strict=True):
                size = streams[d.key].stat().st_size
                with _step(progress, f"{d.label} upload", size) as advance:
                    lease.upload(url, streams[d.key], total, done, advance)
                done += size
                record({"label": d.label, "file": file_name, "capacity": capacity,
                        "sha256": rv.sha256_file(images[d.key]), "stream_bytes": size,
                        "verified": False, "upload": self.name})
            lease.progress(total, total, force=True)
            lease.complete()
        except BaseException:
            lease.abort()
            _remove(session, lease.vm, str(spec.name), progress)
            raise
        return lease.vm


def _pair(session: VSphereSession, vm: Any,
          disks: list[rv.RestoredDisk]) -> list[tuple[rv.RestoredDisk, str, int]]:
    made = rv.vm_disks(session, vm)
    if len(made) != len(disks):
        raise StillpointError(f"the new VM has {len(made)} disks, expected {len(disks)}")
    return [(d, file_name, capacity)
            for d, (_key, file_name, capacity) in zip(disks, made, strict=True)]


def _remove(session: VSphereSession, vm: Any, name: str, progress: Progress) -> None:
    progress.event(f"restore failed: removing the new VM {name}")
    if not rv.vm_exists(session, vm):
        return
    try:
        rv.destroy_vm(session, vm)
    except StillpointError as err:
        progress.event(f"could not remove {name} ({vm._moId}): {err}")


@contextmanager
def _step(progress: Progress, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar for one piece of work; yields what advances it."""
    progress.start(label, label, total)
    yield lambda n: progress.advance(label, n)
    progress.finish(label)
