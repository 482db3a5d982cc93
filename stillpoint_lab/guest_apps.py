"""The applications of a lab guest: PostgreSQL 15 and MariaDB with their data on /data.

Both are initialised on first boot only (an empty data dir); a disk that came from a
restore already holds its data and is only recovered by the servers themselves.
Paths are the guest's view (inside its mount namespace); `run` executes there.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from appliance.errors import LabError
from stillpoint_lab.guest_ns import alive

Run = Callable[..., "subprocess.CompletedProcess[str]"]

PG_BIN = "/usr/lib/postgresql/15/bin"
PGDATA = "/data/pgsql/15/main"
PG_WAL_ARCHIVE = "/data/pgsql/wal-archive"
PG_SOCKET_DIR = "/run/postgresql"
MY_DATADIR = "/data/mysql"
MY_BINLOG_DIR = "/data/mysql-binlog"
MY_SOCKET = "/run/mysqld/mysqld.sock"
LOG_DIR = "/data/var/log"

_PG_CONF = f"""
# --- Stillpoint lab guest ---
# archive: copy then rename, so a copy cut short (disk full) never blocks later archiving
unix_socket_directories = '{PG_SOCKET_DIR}'
wal_level = replica
archive_mode = on
archive_command = 'test ! -f {PG_WAL_ARCHIVE}/%f && cp %p {PG_WAL_ARCHIVE}/%f.part && mv {PG_WAL_ARCHIVE}/%f.part {PG_WAL_ARCHIVE}/%f'
max_wal_size = 96MB
min_wal_size = 32MB
shared_buffers = 32MB
"""

# Local peer auth; OS users root and splab (the agent, via sudo or not) may act as postgres.
_PG_HBA = "local all all peer map=lab\n"
_PG_IDENT = "lab postgres postgres\nlab root postgres\nlab splab postgres\n"


def mariadb_config(ip: str, server_id: int) -> str:
    """/etc/mysql/my.cnf of a guest (bind-mounted over the host's in the guest's view)."""
    return f"""# MariaDB of a Stillpoint lab guest
[client-server]
socket = {MY_SOCKET}

[mysqld]
user = mysql
datadir = {MY_DATADIR}
bind-address = {ip}
port = 3306
pid-file = /run/mysqld/mysqld.pid
log_bin = {MY_BINLOG_DIR}/mysql-bin
binlog_format = ROW
sync_binlog = 1
server_id = {server_id}
log_error = {LOG_DIR}/mariadb.err
innodb_buffer_pool_size = 64M
innodb_log_file_size = 32M
"""


def _must(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise LabError(f"{what} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def start_postgresql(run: Run, ip: str, *, after_boot: bool) -> None:
    exists = run(["test", "-f", f"{PGDATA}/PG_VERSION"]).returncode == 0
    if not exists:
        _must(run(["sh", "-c", (f"mkdir -p {PGDATA} {PG_WAL_ARCHIVE} {LOG_DIR} && "
                   f"chown -R postgres:postgres /data/pgsql && chmod 700 {PGDATA}")]),
              "preparing PGDATA")
        _must(run(["runuser", "-u", "postgres", "--", f"{PG_BIN}/initdb", "-D", PGDATA,
                   "-U", "postgres", "--auth-local=peer", "--auth-host=reject",
                   "--encoding=UTF8", "--locale=C"], timeout=120), "initdb")
        conf = f"{PGDATA}/postgresql.conf"
        _must(run(["sh", "-c", f"cat >> {conf}"], input=_PG_CONF), "postgresql.conf")
        _must(run(["sh", "-c", f"cat > {PGDATA}/pg_hba.conf"], input=_PG_HBA), "pg_hba")
        _must(run(["sh", "-c", f"cat > {PGDATA}/pg_ident.conf"], input=_PG_IDENT), "ident")
    elif after_boot:
        # PIDs are shared with the host, so a pid file left on a restored (or crashed)
        # disk may name a live process of another guest; at boot nothing of ours runs.
        run(["rm", "-f", f"{PGDATA}/postmaster.pid"])
    _must(run(["sh", "-c", (f"mkdir -p {LOG_DIR} && touch {LOG_DIR}/postgresql.log && "
               f"chown postgres:postgres {LOG_DIR}/postgresql.log")]), "pg log")
    started = run(["runuser", "-u", "postgres", "--", f"{PG_BIN}/pg_ctl", "-D", PGDATA,
                   "-l", f"{LOG_DIR}/postgresql.log", "-w", "-t", "120",
                   "-o", f"-c listen_addresses={ip}", "start"], timeout=150)
    if started.returncode != 0:
        tail = run(["tail", "-n", "30", f"{LOG_DIR}/postgresql.log"]).stdout
        raise LabError(f"PostgreSQL did not start: {started.stderr.strip()}\n{tail}")


def stop_postgresql(run: Run) -> None:
    if run(["test", "-f", f"{PGDATA}/postmaster.pid"]).returncode != 0:
        return
    _must(run(["runuser", "-u", "postgres", "--", f"{PG_BIN}/pg_ctl", "-D", PGDATA,
               "-m", "fast", "-w", "-t", "60", "stop"], timeout=90), "stopping PostgreSQL")


def start_mariadb(run: Run, spawn: Callable[[list[str]], None]) -> None:
    exists = run(["test", "-d", f"{MY_DATADIR}/mysql"]).returncode == 0
    _must(run(["sh", "-c", (f"mkdir -p {MY_DATADIR} {MY_BINLOG_DIR} {LOG_DIR} && "
               f"chown mysql:mysql {MY_DATADIR} {MY_BINLOG_DIR}")]), "preparing datadir")
    if not exists:
        _must(run(["mariadb-install-db", "--user=mysql", f"--datadir={MY_DATADIR}",
                   "--auth-root-authentication-method=socket", "--skip-test-db"],
                  timeout=180), "mariadb-install-db")
    spawn(["mariadbd", "--user=mysql"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if run(["mariadb-admin", "--connect-timeout=2", "ping"], timeout=10).returncode == 0:
            return
        time.sleep(0.3)
    tail = run(["tail", "-n", "30", f"{LOG_DIR}/mariadb.err"]).stdout
    raise LabError(f"MariaDB did not come up:\n{tail}")


def stop_mariadb(run: Run) -> None:
    pid = run(["cat", "/run/mysqld/mysqld.pid"]).stdout.strip()
    if not pid.isdigit():
        return
    run(["mariadb-admin", "shutdown"], timeout=90)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not alive(int(pid)):     # the guest shares the host's PID namespace
            return
        time.sleep(0.2)
    raise LabError(f"MariaDB (pid {pid}) did not stop")
