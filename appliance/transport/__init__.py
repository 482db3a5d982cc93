"""Disk-read transports: how the bytes of a snapshot's disks reach the appliance.

Abstractions:
    DiskReader (base.py)  -- open(disk: SnapshotDisk) -> DiskStream
    DiskStream (base.py)  -- read(offset, length), read_into(offset, memoryview),
                             read_extents(extents) -> (offset, bytes) in offset order, read in
                             parallel with bounded memory; close(); size; bytes_read
Implementations:
    DatastoreHTTPReader (datastore_http.py) -- Range GETs of the snapshot's flat file under
        vCenter's /folder/ URL with the session cookie; pure Python, the default
    NBDReader (nbd.py) -- libnbd against a given NBD server URI, multi-conn aware
    NbdkitReader (nbdkit.py) -- starts one nbdkit per disk (VDDK plugin in production,
        file plugin on a local datastore directory in the lab) and reads it over NBD
Helpers: vmdk.py (descriptor -> flat extent). All are held to one contract
(tests/unit/test_transport_contract.py). Errors leave this package as
appliance.errors.TransportError (TrustError for TLS trust, UsageError for bad extents).
"""

from appliance.transport.base import DiskReader, DiskStream, Extent
from appliance.transport.datastore_http import DatastoreAccess, DatastoreHTTPReader
from appliance.transport.nbd import NBDReader
from appliance.transport.nbdkit import NbdkitConfig, NbdkitReader, nbd_reader_from_profile

__all__ = [
    "DatastoreAccess",
    "DatastoreHTTPReader",
    "DiskReader",
    "DiskStream",
    "Extent",
    "NBDReader",
    "NbdkitConfig",
    "NbdkitReader",
    "nbd_reader_from_profile",
]
