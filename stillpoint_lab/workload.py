"""A transactional workload on a lab guest's PostgreSQL and MariaDB, with checkable invariants.

Each iteration commits, on each database, one transaction that
  * moves a random amount between two of ACCOUNTS accounts (the total stays
    ACCOUNTS * INITIAL_BALANCE), and
  * appends the next id to a gap-free sequence table `seq(id, committed_at)`;
on MariaDB (InnoDB) it also appends a row to a MyISAM table `txlog` (not transactional,
but its files must pass CHECK TABLE after a restore).

Every commit is appended to a log on the HOST as a JSON line, flushed per line:
    {"db": "pg"|"my", "id": <seq id>, "sent": <unix time before COMMIT>,
     "committed": <unix time after COMMIT returned>}
so a test can tell which transactions must be in a snapshot cut at time T (committed < T)
and which cannot be (sent > T).

The process runs on the HOST, as a client on the lab network would: PostgreSQL as `postgres`
and MariaDB as `lab` over TCP to the guest's address (the lab image trusts the lab subnet), so
"acknowledged" means what it means to an application: the COMMIT's reply reached the client.
    python -m stillpoint_lab.workload run --host IP --log FILE [--rate N]
    python -m stillpoint_lab.workload check --host IP  (prints an InvariantReport as JSON)
The host side: start_workload / stop_workload / check_invariants / read_log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import LabError
from stillpoint_lab.config import REPO_ROOT

if TYPE_CHECKING:
    from stillpoint_lab.guest_vm import GuestHandle

ACCOUNTS = 20
INITIAL_BALANCE = 1000
EXPECTED_TOTAL = ACCOUNTS * INITIAL_BALANCE
DATABASE = "splab"
MY_USER = "lab"
CONNECT_TIMEOUT_S = 10
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class InvariantReport:
    expected_total: int
    pg_total: int
    pg_accounts: int
    pg_seq_count: int
    pg_seq_max: int
    my_total: int
    my_accounts: int
    my_seq_count: int
    my_seq_max: int
    myisam_check: str        # Msg_text of CHECK TABLE txlog's status row ("OK" when sound)

    @property
    def pg_ok(self) -> bool:
        return (self.pg_total == self.expected_total and self.pg_accounts == ACCOUNTS
                and self.pg_seq_count == self.pg_seq_max)

    @property
    def my_ok(self) -> bool:
        return (self.my_total == self.expected_total and self.my_accounts == ACCOUNTS
                and self.my_seq_count == self.my_seq_max and self.myisam_check == "OK")

    @property
    def ok(self) -> bool:
        return self.pg_ok and self.my_ok


@dataclass(frozen=True)
class Commit:
    db: str
    id: int
    sent: float
    committed: float


@dataclass
class WorkloadHandle:
    guest_name: str
    process: subprocess.Popen[bytes]
    log_path: Path


# --- host side ---------------------------------------------------------------------------

def start_workload(guest: GuestHandle, rate: float = 50.0,
                   log_path: Path | None = None) -> WorkloadHandle:
    """Create the schema if needed, then commit ~`rate` transactions/s on each database."""
    log_path = log_path or guest.state_dir / "workload.log"
    setup = _client(guest, ["setup"], timeout=60)
    if setup.returncode != 0:
        raise LabError(f"workload setup on {guest.name} failed: {setup.stderr.strip()}")
    with open(guest.state_dir / "workload.out", "ab") as out:
        proc = subprocess.Popen(
            [str(PYTHON), "-m", "stillpoint_lab.workload", "run", "--host", guest.ip,
             "--log", str(log_path), "--rate", str(rate)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(REPO_ROOT))
    return WorkloadHandle(guest.name, proc, log_path)


def stop_workload(handle: WorkloadHandle, timeout: float = 15) -> None:
    """SIGTERM: the workload finishes the transaction in flight and exits."""
    if handle.process.poll() is None:
        handle.process.send_signal(signal.SIGTERM)
        try:
            handle.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait()
            raise LabError(f"workload on {handle.guest_name} did not stop; killed") from None


def check_invariants(guest: GuestHandle) -> InvariantReport:
    result = _client(guest, ["check"], timeout=120)
    if result.returncode != 0:
        raise LabError(f"invariant check on {guest.name} failed: {result.stderr.strip()}")
    return InvariantReport(**json.loads(result.stdout))


def read_log(log_path: Path) -> list[Commit]:
    commits = []
    for line in log_path.read_text().splitlines():
        if line.strip():
            commits.append(Commit(**json.loads(line)))
    return commits


def _client(guest: GuestHandle, args: list[str],
            timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([str(PYTHON), "-m", "stillpoint_lab.workload", args[0],
                               "--host", guest.ip, *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as err:
        raise LabError(f"workload {args[0]} on {guest.name} timed out") from err


def _pg(host: str, dbname: str = DATABASE) -> Any:
    import psycopg  # only the client process needs the drivers
    return psycopg.connect(host=host, dbname=dbname, user="postgres",
                           connect_timeout=CONNECT_TIMEOUT_S)


def _my(host: str, database: str | None = DATABASE) -> Any:
    import pymysql
    return pymysql.connect(host=host, user=MY_USER, database=database, autocommit=False,
                           connect_timeout=CONNECT_TIMEOUT_S)


def setup(host: str) -> None:
    with _pg(host, "postgres") as admin:
        admin.autocommit = True
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                             (DATABASE,)).fetchone():
            admin.execute(f"CREATE DATABASE {DATABASE}")
    with _pg(host) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS accounts "
                     "(id int PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS seq "
                     "(id bigint PRIMARY KEY, committed_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g "
                     "ON CONFLICT DO NOTHING", (INITIAL_BALANCE, ACCOUNTS))
    conn = _my(host, None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            cur.execute(f"USE {DATABASE}")
            cur.execute("CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, "
                        "balance bigint NOT NULL) ENGINE=InnoDB")
            cur.execute("CREATE TABLE IF NOT EXISTS seq (id bigint PRIMARY KEY, "
                        "committed_at datetime(6) NOT NULL) ENGINE=InnoDB")
            cur.execute("CREATE TABLE IF NOT EXISTS txlog (id bigint AUTO_INCREMENT "
                        "PRIMARY KEY, seq_id bigint NOT NULL, at datetime(6) NOT NULL, "
                        "note varchar(64) NOT NULL) ENGINE=MyISAM")
            cur.executemany("INSERT IGNORE INTO accounts VALUES (%s, %s)",
                            [(i, INITIAL_BALANCE) for i in range(1, ACCOUNTS + 1)])
        conn.commit()
    finally:
        conn.close()


def run(host: str, log_path: Path, rate: float) -> None:
    stop = False

    def _stop(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    period = 1.0 / rate if rate > 0 else 0.0
    conns: dict[str, Any] = {}
    connect = {"pg": lambda: _pg(host), "my": lambda: _my(host)}
    with open(log_path, "a", encoding="utf-8") as log:
        while not stop:
            started = time.monotonic()
            for db, commit in (("pg", _pg_txn), ("my", _my_txn)):
                try:
                    conn = conns.get(db) or conns.setdefault(db, connect[db]())
                    txid, sent, committed = commit(conn)
                except Exception as err:  # noqa: BLE001 - a server restart must not end us
                    # Outcome unknown: not logged. `seq` stays gap-free either way.
                    print(f"workload: {db}: {err}; reconnecting", file=sys.stderr, flush=True)
                    _close(conns.pop(db, None))
                    time.sleep(0.5)
                    continue
                log.write(json.dumps({"db": db, "id": txid, "sent": sent,
                                      "committed": committed}) + "\n")
                log.flush()
            time.sleep(max(0.0, period - (time.monotonic() - started)))
    for conn in conns.values():
        _close(conn)


def _close(conn: Any) -> None:
    # Closing a broken connection may fail in any way; it is gone either way.
    with contextlib.suppress(Exception):
        if conn is not None:
            conn.close()


def _transfer() -> tuple[int, int, int]:
    a, b = random.sample(range(1, ACCOUNTS + 1), 2)
    return a, b, random.randint(1, 50)


def _pg_txn(conn: Any) -> tuple[int, float, float]:
    a, b, amount = _transfer()
    with conn.transaction():
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
        txid = conn.execute("INSERT INTO seq SELECT coalesce(max(id), 0) + 1, "
                            "clock_timestamp() FROM seq RETURNING id").fetchone()[0]
        sent = time.time()
    return txid, sent, time.time()


def _my_txn(conn: Any) -> tuple[int, float, float]:
    a, b, amount = _transfer()
    with conn.cursor() as cur:
        cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
        cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
        cur.execute("SELECT coalesce(max(id), 0) + 1 FROM seq FOR UPDATE")
        txid = cur.fetchone()[0]
        cur.execute("INSERT INTO seq VALUES (%s, now(6))", (txid,))
        # MyISAM: not part of the transaction, written on every iteration all the same.
        cur.execute("INSERT INTO txlog (seq_id, at, note) VALUES (%s, now(6), %s)",
                    (txid, f"transfer {amount} {a}->{b}"))
        sent = time.time()
        conn.commit()
    return int(txid), sent, time.time()


def check(host: str) -> InvariantReport:
    with _pg(host) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        total, accounts = conn.execute(
            "SELECT coalesce(sum(balance), 0), count(*) FROM accounts").fetchone()
        seq_count, seq_max = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM seq").fetchone()
    conn = _my(host)
    try:
        with conn.cursor() as cur:
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cur.execute("SELECT coalesce(sum(balance), 0), count(*) FROM accounts")
            my_total, my_accounts = cur.fetchone()
            cur.execute("SELECT count(*), coalesce(max(id), 0) FROM seq")
            my_count, my_max = cur.fetchone()
            conn.commit()
            cur.execute("CHECK TABLE txlog")
            rows = cur.fetchall()    # (Table, Op, Msg_type, Msg_text)
    finally:
        conn.close()
    status = [r[3] for r in rows if r[2] == "status"]
    return InvariantReport(
        expected_total=EXPECTED_TOTAL, pg_total=int(total), pg_accounts=int(accounts),
        pg_seq_count=int(seq_count), pg_seq_max=int(seq_max), my_total=int(my_total),
        my_accounts=int(my_accounts), my_seq_count=int(my_count), my_seq_max=int(my_max),
        myisam_check=status[-1] if status else "; ".join(str(r[3]) for r in rows),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stillpoint_lab.workload")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="commit transactions until SIGTERM")
    run_p.add_argument("--log", type=Path, required=True)
    run_p.add_argument("--rate", type=float, default=50.0, help="iterations per second")
    setup_p = sub.add_parser("setup", help="create databases and tables (idempotent)")
    check_p = sub.add_parser("check", help="print the invariant report as JSON")
    for p in (run_p, setup_p, check_p):
        p.add_argument("--host", required=True, help="the guest's address")
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args.host)
    elif args.command == "run":
        run(args.host, args.log, args.rate)
    else:
        print(json.dumps(asdict(check(args.host))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
