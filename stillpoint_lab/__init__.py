"""The lab: a vCenter (govmomi's simulator, extended) and real Linux guests in namespaces.

Modules:
    config   the lab's shape (VMs, disks, addresses) and where its state lives
    vcsim    builds and runs the extended simulator (Go sources in tests/lab/vcsim/)
    guest    one guest: netns + mount ns, sshd, its disk loop-mounted, PostgreSQL, MariaDB
    workload a transactional workload with checkable invariants
    lab      `lab up / status / down`: puts the parts together and writes the lab profile
"""
