"""The vSphere layer: everything Stillpoint asks of vCenter, through pyVmomi.

Abstractions (one small module each):
    tls        -- TLS trust: CA-verified contexts, or a context pinned to a SHA-256 thumbprint
    session    -- VCenterEndpoint, connect() -> VSphereSession (keepalive, re-login), credentials
    tasks      -- wait_for_task(): PropertyCollector WaitForUpdatesEx, faults -> TaskFailed
    inventory  -- find VMs (name, inventory path, moref, folder, tag) and read VMInfo
    snapshots  -- create/remove/find/consolidate snapshots; snapshot_disks() -> SnapshotDisk
    cbt        -- enable CBT, changed_areas() with invariant checks, change id parsing
    events     -- post the backup outcome as an event on the VM; read recent events

Nothing here imports click or jobs; pyVmomi faults are translated into appliance.errors
at this boundary (vim.fault.* never reaches jobs/).
"""
