"""Benchmarks: Stillpoint against the raw transport and against restic and borg.

`python -m bench.run` (or `make bench`) brings up a lab (id 3) with VMs that have no guest,
fills their disks with realistic content (an ext4 file system holding an OS-like tree,
PostgreSQL data files, text, random data and free space), and measures, in one run and on
the same bytes: full and incremental backups, restores, repository sizes, peak memory, CPU
and `check --read-data`. It prints a table and writes bench/RESULTS.md.

Modules: `measure` (run a command, read its wall time, CPU and peak RSS), `storage` (a
reflink-capable XFS scratch area), `content` (the disk images and the changes between
backups), `tools` (the exact commands of Stillpoint, curl, restic and borg), `scenario`
(what is run in which order), `report` (the table and RESULTS.md), `run` (the entry point).
"""
