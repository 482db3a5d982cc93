"""The Stillpoint backup repository: restore points of VM disks, stored deduplicated,
compressed and encrypted on a `Backend` (format: docs/format.md, constants: format.py).

Abstractions:
    Backend            storage seam (local directory, memory; retry and fault-injecting wrappers)
    Repository         init/open, writer(), list/get/read/restore, check, forget, prune
    RestorePointWriter one restore point being written (holds the lock); DiskWriter per disk
    RestorePoint       what was committed: VM, time, consistency, metadata, disks' block maps
"""

from appliance.repository.backend import (
    Backend,
    BackendPermanent,
    BackendTransient,
    ObjectInfo,
    ObjectNotFound,
)
from appliance.repository.check import CheckReport, Problem
from appliance.repository.faulty import FaultyBackend, SimulatedCrash
from appliance.repository.local import LocalBackend
from appliance.repository.memory import MemoryBackend
from appliance.repository.prune import PruneReport
from appliance.repository.repository import Repository
from appliance.repository.restorepoint import DiskRecord, RestorePoint, VmRef, WriteStats
from appliance.repository.retry import RetryBackend
from appliance.repository.writer import DiskWriter, RestorePointWriter

__all__ = [
    "Backend", "BackendPermanent", "BackendTransient", "CheckReport", "DiskRecord",
    "DiskWriter", "FaultyBackend", "LocalBackend", "MemoryBackend", "ObjectInfo",
    "ObjectNotFound", "Problem", "PruneReport", "Repository", "RestorePoint",
    "RestorePointWriter", "RetryBackend", "SimulatedCrash", "VmRef", "WriteStats",
]
