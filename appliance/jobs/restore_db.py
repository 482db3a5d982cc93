"""Item-level restore: one PostgreSQL database out of a restore point, as a pg_dump file.

The sandbox is the appliance itself, never the live VM: the disk holding the cluster is
restored to a private raw image (our own copy, so it may be mounted read-write), the
cluster is started from it by the appliance's PostgreSQL binaries of the same major
version, as the data directory's owner (numeric uid), with no TCP listener, a socket in a
private directory and trust authentication on that socket only, archiving off. Its own
crash recovery brings the atomic snapshot to a consistent state (the backup_label is not
placed: the snapshot's pg_wal ends before the backup's end record). Then pg_dump, then a
fast shutdown; image, mounts and loop devices are removed in `finally`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import NotFound, StillpointError, UsageError
from appliance.jobs import files, restore_pitr
from appliance.jobs.point_metadata import PointMetadata
from appliance.repository import Repository, RestorePoint

PG_LIB = Path("/usr/lib/postgresql")


class SandboxError(StillpointError):
    """The database sandbox failed."""


def _pg_writer(rp: RestorePoint) -> tuple[str, dict[str, Any]]:
    for name, res in PointMetadata.of(rp).results().items():
        if res.get("kind") == "postgresql":
            return name, res
    raise NotFound(f"restore point {rp.id[:12]} has no PostgreSQL writer results")


def _bin_dir(version: int) -> Path:
    major = version // 10000 if version >= 100000 else version // 100
    path = PG_LIB / str(major) / "bin"
    if not (path / "postgres").exists():
        raise SandboxError(f"PostgreSQL {major} binaries are not installed on the appliance "
                           f"({path}): needed to start that cluster")
    return path


def _run(argv: list[str], what: str, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SandboxError(f"{what}: {err}") from err
    if proc.returncode != 0:
        raise SandboxError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout


def dump_database(repo: Repository, rp_ref: str, writer_kind: str, database: str,
                  out: Path) -> dict[str, Any]:
    if writer_kind != "postgresql":
        raise UsageError(f"item-level restore supports postgresql, not {writer_kind}")
    rp = repo.get(rp_ref)
    name, res = _pg_writer(rp)
    bin_dir = _bin_dir(int(res.get("version") or 0))
    _mp, rel = restore_pitr.split_guest_path(rp, res["data_dir"])
    for disk in rp.disks:
        with files.disk_image(repo, rp, disk.key) as raw:
            try:
                with files.mounted_filesystems(raw, writable=True) as filesystems:
                    for fs in filesystems:
                        data_dir = files.resolve_inside(fs.root, rel)
                        if (data_dir / "PG_VERSION").is_file():
                            _dump_from(bin_dir, data_dir, database, out,
                                       res.get("os_user") or "postgres")
                            return {"restore_point": rp.id, "writer": name,
                                    "bytes": out.stat().st_size}
            except files.ImageError:
                continue
    raise NotFound(f"{name}: data directory {res['data_dir']} not found in restore point "
                   f"{rp.id[:12]}")


def _dump_from(bin_dir: Path, data_dir: Path, database: str, out: Path, role: str) -> None:
    """`role`: the guest's cluster owner, whose name is the bootstrap superuser's (the
    appliance's own passwd may give that uid another name, or none)."""
    st = data_dir.stat()
    uid, gid = st.st_uid, st.st_gid
    run_dir = Path(tempfile.mkdtemp(prefix="stillpoint-pgsandbox-"))
    os.chown(run_dir, uid, gid)
    os.chmod(run_dir, 0o700)
    # The sandbox's own configuration: Debian keeps a cluster's postgresql.conf in
    # /etc/postgresql/<version>/<cluster>, outside the data directory; and the image's
    # settings (its archive_command, its ports) must not act here anyway.
    conf, hba, ident = (run_dir / n for n in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"))
    conf.write_text("# the stillpoint restore sandbox: settings are on the command line\n")
    hba.write_text("local all all trust\n")
    ident.write_text("")
    for path in (conf, hba, ident):
        os.chown(path, uid, gid)
    (data_dir / "postmaster.pid").unlink(missing_ok=True)   # from the snapshot of a live cluster
    as_owner = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    options = (f"-c listen_addresses='' -c unix_socket_directories='{run_dir}' -c port=5432 "
               f"-c archive_mode=off -c config_file='{conf}' -c hba_file='{hba}' "
               f"-c ident_file='{ident}' -c log_min_messages=warning")
    log = run_dir / "postgres.log"
    started = False
    try:
        _run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-w",
              "-t", "300", "-o", options, "start"], "starting the sandbox cluster", 330)
        started = True
        _run([str(bin_dir / "pg_dump"), "-h", str(run_dir), "-p", "5432", "-U", role,
              "-f", str(out), database], f"pg_dump {database}")
    except SandboxError as err:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise SandboxError(f"{err}\n{tail}".strip()) from err
    finally:
        if started:
            subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m",
                            "fast", "-w", "-t", "120", "stop"], capture_output=True, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
