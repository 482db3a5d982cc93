"""Disk-read transports: how the bytes of a snapshot's disks reach the appliance.

Abstractions:
    DiskReader (base.py)  -- open(disk: SnapshotDisk) -> DiskStream
    DiskStream (base.py)  -- read(offset, length), read_extents(extents) -> (offset, bytes)
                             in offset order, read in parallel with bounded memory;
                             close(); bytes_read
Implementations:
    DatastoreHTTPReader (datastore_http.py) -- Range GETs of the snapshot's flat file under
        vCenter's /folder/ URL with the session cookie; pure Python, the default
    NBDReader (nbd.py) -- libnbd against an NBD server (nbdkit's VDDK plugin in
        production, nbdkit's file plugin in tests)
Both are held to one contract (tests/unit/test_transport_contract.py). Errors leave this
package as appliance.errors.TransportError (or TrustError for TLS trust).
"""

from appliance.transport.base import DiskReader, DiskStream, Extent
from appliance.transport.datastore_http import DatastoreAccess, DatastoreHTTPReader
from appliance.transport.nbd import NBDReader

__all__ = [
    "DatastoreAccess",
    "DatastoreHTTPReader",
    "DiskReader",
    "DiskStream",
    "Extent",
    "NBDReader",
]
