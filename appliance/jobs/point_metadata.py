"""What a backup records about its restore point, beside the disks (docs/format.md,
"Restore point metadata"): written once by the backup job, read by every restore path.

Version 1. Points written before the version field existed have the same keys; a key this
code does not know is kept (`extra`) and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from appliance.repository import RestorePoint

METADATA_VERSION = 1


@dataclass(frozen=True)
class PointMetadata:
    job_id: str = ""
    vm_config: dict[str, Any] = field(default_factory=dict)   # vmconfig.config_dump
    guest_id: str = ""
    # The agent's gather-metadata answer ({"writers": [...]}, docs/protocol.md); None when
    # no agent was in the guest.
    writer_metadata: dict[str, Any] | None = None
    writer_results: dict[str, Any] = field(default_factory=dict)   # name -> thaw facts
    writer_status: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    disks: list[dict[str, Any]] = field(default_factory=list)       # copy.CopiedDisk
    transport: str = ""
    snapshot_window: dict[str, Any] = field(default_factory=dict)
    cbt_verification: dict[str, Any] = field(default_factory=dict)   # cbt_verify.Checks
    cbt_check: dict[str, int] = field(default_factory=dict)   # {"since": incrementals unchecked}
    version: int = METADATA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # --- reading ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> PointMetadata:
        doc = dict(doc or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: doc.pop(k) for k in known & set(doc)}
        return cls(**{k: v for k, v in values.items() if v is not None}, extra=doc)

    @classmethod
    def of(cls, rp: RestorePoint) -> PointMetadata:
        return cls.from_dict(rp.metadata)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    # --- what the restore paths ask ----------------------------------------------------
    @property
    def agent_in_image(self) -> bool:
        """The agent was in the guest when the snapshot was cut (deployed, and it gathered
        the writers' metadata): only then does the image hold it and its boot hook."""
        return self.writer_metadata is not None

    @property
    def is_windows(self) -> bool:
        return "windows" in self.guest_id.lower()

    def writer_docs(self) -> dict[str, dict[str, Any]]:
        """Each writer's metadata as the agent reported it, by name."""
        writers = (self.writer_metadata or {}).get("writers", [])
        return {str(w["name"]): w for w in writers if isinstance(w, dict) and w.get("name")}

    def results(self) -> dict[str, dict[str, Any]]:
        """Each writer's thaw facts (kind, LSNs, log positions), by name."""
        return {n: r for n, r in sorted(self.writer_results.items()) if isinstance(r, dict)}

    def first_component(self, writer: str) -> dict[str, Any]:
        comps = (self.writer_docs().get(writer) or {}).get("components") or []
        return dict(comps[0]) if comps and isinstance(comps[0], dict) else {}

    def frozen_mount_points(self) -> set[str]:
        """Mount points of the file systems the agent's filesystem writer froze."""
        return {c["mount_point"] for w in self.writer_docs().values()
                if w.get("kind") == "filesystem"
                for c in w.get("components", []) if isinstance(c, dict) and c.get("mount_point")}

    def restorable_writers(self) -> dict[str, dict[str, Any]]:
        """Writer results of the writers whose files are inside the restore point's file
        systems (a writer found in the guest may keep its data elsewhere, e.g. on a disk
        that is not backed up: its post-restore procedure has nothing to work on)."""
        docs = self.writer_docs()
        frozen = self.frozen_mount_points()
        mounts = [m for m in frozen if m != "/"]
        fs_known = any(w.get("kind") == "filesystem" for w in docs.values())
        out = {}
        for name, res in self.results().items():
            if not res.get("kind"):
                continue
            paths = [p for p in (docs.get(name) or {}).get("files", []) if isinstance(p, str)]
            # The root file system backed up: every path is inside the image.
            if fs_known and paths and "/" not in frozen and not all(
                    any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounts)
                    for p in paths):
                continue
            out[name] = res
        return out
