"""Realistic disk contents for the benchmark, and the changes made between backups.

A disk is one ext4 file system over the whole disk (`mkfs.ext4 -d`), holding:

    os/      an OS-like tree: a slice of this machine's /usr/lib     ~12 % of the disk
    db/      a PostgreSQL 15 data directory initialised by pgbench   ~ 8 %
    text/    compressible text (log lines with counters and times)   ~ 8 %
    random/  incompressible random data                              ~10 %
    the rest is free space that was never written (unallocated)      ~60 %

Images are built once per size and cached; a run copies the cached image into the VM's
flat file (a reflink on XFS) while the VM is powered off. Changes overwrite whole 64 KiB
blocks (CBT's granularity in the lab) with random bytes, scattered over the disk or
clustered in 16 MiB runs; they are written while the VM runs, through the hypervisor's
block layer (`change_blocks(write, ...)`: the bench passes a writer that goes through the
lab hypervisor's qemu-io), so that the VM's dirty bitmaps (the lab's CBT) see them as they
see a guest's writes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

CONTENT_VERSION = 1          # bump when the recipe changes: the cache key
BLOCK = 64 * 1024            # one changed block
CLUSTER = 256                # blocks per clustered run (16 MiB)
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SCALE_BYTES = 16 << 20    # what one pgbench scale unit takes on disk
PG_BASE_BYTES = 40 << 20     # an empty initdb cluster

SHARES = {"os": 0.12, "db": 0.08, "text": 0.08, "random": 0.10}


def disk_image(size_mib: int, cache_dir: Path, stage_dir: Path) -> Path:
    """The cached content image of a disk of size_mib MiB (built on first use)."""
    image = cache_dir / f"disk-{size_mib}m-v{CONTENT_VERSION}.img"
    if image.exists():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    stage = stage_dir / f"stage-{size_mib}m"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        size = size_mib << 20
        _os_tree(stage / "os", int(size * SHARES["os"]))
        _pg_cluster(stage / "db", int(size * SHARES["db"]))
        _text_files(stage / "text", int(size * SHARES["text"]), seed=size_mib)
        _random_files(stage / "random", int(size * SHARES["random"]))
        partial = image.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", f"{size_mib}M", str(partial)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(stage), str(partial)],
                       check=True)
        partial.rename(image)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return image


def install(image: Path, flat_file: Path) -> None:
    """Make the VM's flat file hold the image (same size; a reflink where possible)."""
    if image.stat().st_size != flat_file.stat().st_size:
        raise ValueError(f"{image} and {flat_file} differ in size")
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image), str(flat_file)],
                   check=True)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --- the parts -------------------------------------------------------------------------

def _os_tree(dst: Path, budget: int) -> None:
    """Whole subtrees of /usr/lib until the budget is used (hard links: no copying)."""
    dst.mkdir(parents=True)
    out = subprocess.run(["du", "-s", "-b", *sorted(str(p) for p in Path("/usr/lib").iterdir())],
                         capture_output=True, text=True, check=False).stdout  # du: some unreadable
    used = 0
    for line in out.splitlines():
        nbytes, path = line.split("\t", 1)
        if used + int(nbytes) > budget or Path(path).is_symlink():
            continue
        link = subprocess.run(["cp", "-a", "-l", path, str(dst)], capture_output=True, check=False)
        if link.returncode != 0:  # another file system: copy
            subprocess.run(["cp", "-a", path, str(dst)], check=True)
        used += int(nbytes)


def _pg_cluster(dst: Path, budget: int) -> None:
    """initdb + pgbench -i at the scale that fills the budget; the server is stopped."""
    scale = max(1, (budget - PG_BASE_BYTES) // PG_SCALE_BYTES)
    dst.mkdir(parents=True)
    shutil.chown(dst, "postgres", "postgres")
    dst.chmod(0o700)
    sock = Path(tempfile.mkdtemp(prefix="sp-bench-pg-"))
    shutil.chown(sock, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(dst), "--auth=trust",
                    "--no-instructions"], check=True, capture_output=True)
    opts = f"-c listen_addresses='' -k {sock} -p 55433"
    try:
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(dst), "-o", opts,
                        "-l", str(sock / "log"), "-w", "start"], check=True, capture_output=True)
        subprocess.run([*as_pg, str(PG_BIN / "pgbench"), "-h", str(sock), "-p", "55433",
                        "-i", "-q", "-s", str(scale), "postgres"], check=True, capture_output=True)
    finally:
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(dst), "-m", "fast", "-w",
                        "stop"], capture_output=True, check=False)  # best effort: cleanup
        shutil.rmtree(sock, ignore_errors=True)


_WORDS = ["GET", "POST", "PUT", "DELETE", "/api/v1/orders", "/api/v1/users", "/static/app.js", "/healthz", "/login", "/logout", "INFO", "WARN", "ERROR", "DEBUG", "worker", "scheduler", "backup", "disk", "snapshot", "committed", "accepted", "timeout", "retry", "upstream", "cache", "hit", "miss"]


def _text_files(dst: Path, budget: int, seed: int) -> None:
    """Log-like lines: compress about 4-6x with zstd, never repeat a whole block."""
    dst.mkdir(parents=True)
    rng = random.Random(seed)
    hosts = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
             for _ in range(500)]
    written, n, t = 0, 0, 1_700_000_000.0
    while written < budget:
        lines = []
        for _ in range(20_000):
            t += rng.random() * 0.05
            n += 1
            lines.append(f"{t:.3f} {rng.choice(hosts)} {rng.choice(_WORDS)} "
                         f"{rng.choice(_WORDS)} id={n} status={rng.choice((200, 200, 201, 404, 500))} "
                         f"bytes={rng.randrange(100000)} ms={rng.random() * 300:.1f}\n")
        chunk = "".join(lines).encode()
        with open(dst / f"app-{written >> 24:05d}.log", "ab") as f:
            f.write(chunk)
        written += len(chunk)


def _random_files(dst: Path, budget: int) -> None:
    dst.mkdir(parents=True)
    written, i = 0, 0
    while written < budget:
        n = min(32 << 20, budget - written)
        (dst / f"blob-{i:04d}.bin").write_bytes(os.urandom(n))
        written, i = written + n, i + 1


# --- changes between backups -------------------------------------------------------------

def pick_blocks(nblocks: int, fraction: float, pattern: str, seed: int) -> list[int]:
    """`fraction` of a disk's `nblocks` 64 KiB blocks, sorted.

    pattern "scattered": blocks picked uniformly; "clustered": runs of 16 MiB."""
    count = max(1, int(nblocks * fraction))
    rng = random.Random(seed)
    if pattern == "scattered":
        return sorted(rng.sample(range(nblocks), count))
    if pattern == "clustered":
        runs = max(1, count // CLUSTER)
        starts = sorted(rng.sample(range(nblocks // CLUSTER), runs))
        return [s * CLUSTER + i for s in starts for i in range(CLUSTER)][:count]
    raise ValueError(f"unknown change pattern {pattern!r}")


def runs_of(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted blocks as (first block, count) runs of adjacent blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


Writer = Callable[[int, bytes], None]


def change_blocks(write: Writer, disk_bytes: int, fraction: float, pattern: str,
                  seed: int) -> tuple[int, list[tuple[int, bytes]]]:
    """Overwrite `fraction` of the disk's 64 KiB blocks with random bytes, one `write(offset,
    data)` per run of adjacent blocks; (bytes changed, [(offset, data)] written)."""
    rng = random.Random(seed)
    blocks = pick_blocks(disk_bytes // BLOCK, fraction, pattern, seed)
    written = []
    for first, count in runs_of(blocks):
        data = rng.randbytes(count * BLOCK)
        write(first * BLOCK, data)
        written.append((first * BLOCK, data))
    return len(blocks) * BLOCK, written


def verify_written(flat_file: Path, written: list[tuple[int, bytes]]) -> None:
    """The VM's flat file holds what `change_blocks` wrote (no snapshot exists, so the
    hypervisor's writes land in it): a write that went astray fails the run here, not as a
    figure."""
    with open(flat_file, "rb") as f:
        for offset, data in written:
            f.seek(offset)
            if f.read(len(data)) != data:
                raise RuntimeError(f"{flat_file}: the change at {offset} (+{len(data)}) "
                                   "is not in the disk")
