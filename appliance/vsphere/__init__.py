"""The vSphere layer: everything Stillpoint asks of vCenter, through pyVmomi.

Abstractions (one small module each):
    tls          -- TLS trust: CA-verified contexts, or a context pinned to a SHA-256 thumbprint
    credentials  -- user/password from a 0600 profile, the environment or a prompt
    session      -- VCenterEndpoint, connect() -> VSphereSession (keepalive, re-login, cookie)
    props        -- PropertyCollector reads of named properties only (pathSet)
    tasks        -- wait_for_task(): WaitForUpdatesEx; TaskFailed(.fault_name), TaskTimeout
    inventory    -- find VMs (name, inventory path, moref, folder) and read VMInfo
    tags         -- find VMs by tag through the Automation REST API (TagsUnavailable if absent)
    vmconfig     -- the JSON-able VM configuration kept for a full-VM restore
    snapshots    -- create/remove/find/abandon/consolidate; snapshot_disks() -> SnapshotDisk
    cbt          -- enable CBT, changed_areas() with invariant checks, changeId parsing
    events       -- post the backup outcome as an event on the VM; read recent events

Nothing here imports click or jobs; pyVmomi faults are translated into appliance.errors
at this boundary (vim.fault.* never reaches jobs/). Every function takes the
VSphereSession first; VMs are pyVmomi vim.VirtualMachine references as find_vm() returns
them (opaque to callers: pass them back in, read facts through vm_info()).
"""
