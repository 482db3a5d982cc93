"""The Linux agent end to end on this machine, over real SSH, against real databases.

Throwaway parts, all removed afterwards: an sshd on 127.0.0.1:<free port> with its own host
key and a temporary authorized key for root; a 256 MiB ext4 file loop-mounted in /tmp as the
only file system the agent may freeze (never /: it would hang this machine); a PostgreSQL 15
cluster (WAL archiving on) and a MariaDB server (binary log on) whose data live on that file
system and whose sockets live beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import AuthenticationFailed, TrustError
from appliance.guest.client import AgentFailed
from appliance.guest.deploy import AgentSession, deploy_agent
from appliance.guest.ssh import SSHChannel

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# Small: the default redo log alone is 96 MiB.
MARIADB_SMALL = ("--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mount, fsfreeze, sshd)"),
    pytest.mark.timeout(300),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv: str, check: bool = True, cwd: str | None = None, timeout: float = 120,
         input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run in its own process group, so a timeout kills helpers it spawned too."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if input_text is None else subprocess.PIPE,
                            text=True, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Lab:
    """Paths of the throwaway guest: everything lives under one temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "disk"          # the loop-mounted ext4: the "VM disk"
        self.run = root / "run"           # sockets, off the frozen file system
        self.etc = self.mnt / "etc"       # hook dirs live on the VM disk, as in the lab
        self.pg_data = self.mnt / "pg"
        self.pg_archive = self.mnt / "pg_archive"
        self.my_data = self.mnt / "mysql"
        self.my_socket = self.run / "mysqld.sock"
        self.pg_port = _free_port()
        self.install_dir = str(self.mnt / "opt" / "stillpoint" / "agent")

    @property
    def hooks_dir(self) -> Path:
        return self.etc / "stillpoint" / "hooks.d"

    @property
    def boot_dir(self) -> Path:
        return self.etc / "stillpoint" / "boot.d"

    def config(self, **over: object) -> dict:
        cfg: dict = {
            "freeze_timeout_s": 20,
            "filesystems": {"include": [str(self.mnt)]},
            "postgresql": {"discover": False, "clusters": [
                {"data_dir": str(self.pg_data), "socket_dir": str(self.run),
                 "port": self.pg_port, "os_user": "postgres"}]},
            "mariadb": {"discover": False, "instances": [{"socket": str(self.my_socket)}]},
            "hooks": {"dirs": [str(self.hooks_dir)], "pre_freeze_script": None,
                      "post_thaw_script": None, "timeout_s": 10},
            "boot": {"hook_dirs": [str(self.boot_dir)],
                     "log_path": str(self.root / "restore.log"),
                     "result_path": str(self.root / "restore.json")},
        }
        cfg.update(over)
        return cfg

    def psql(self, sql: str) -> str:
        return _run("runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-X", "-A", "-t",
                    "-h", str(self.run), "-p", str(self.pg_port), "-d", "postgres",
                    "-c", sql).stdout.strip()

    def mysql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("mariadb", "--no-defaults", "-N", "-B", f"--socket={self.my_socket}",
                    "-uroot", "-e", sql, check=check)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="stillpoint-agentlab-"))
    root.chmod(0o755)
    lab = Lab(root)
    procs: list[subprocess.Popen] = []
    mounted = False
    try:
        image = root / "disk.img"
        with open(image, "wb") as fh:
            fh.truncate(256 << 20)   # sparse; PG + MariaDB + archive fit
        _run("mkfs.ext4", "-q", "-F", str(image))
        lab.mnt.mkdir()
        _run("mount", "-o", "loop", str(image), str(lab.mnt))
        mounted = True
        lab.mnt.chmod(0o755)
        lab.run.mkdir(mode=0o777)
        lab.run.chmod(0o1777)
        for d in (lab.hooks_dir, lab.boot_dir):
            d.mkdir(parents=True)
        _start_postgres(lab)
        procs.append(_start_mariadb(lab))
        yield lab
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if mounted:
            _run("fsfreeze", "-u", str(lab.mnt), check=False)
            _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                 str(lab.pg_data), "-m", "immediate", "stop", check=False)
            for _ in range(50):
                if _run("umount", str(lab.mnt), check=False).returncode == 0:
                    break
                time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


def _start_postgres(lab: Lab) -> None:
    lab.pg_data.mkdir()
    lab.pg_archive.mkdir()
    shutil.chown(lab.pg_data, "postgres", "postgres")
    shutil.chown(lab.pg_archive, "postgres", "postgres")
    _run("runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(lab.pg_data),
         "--auth-local=peer", "--auth-host=reject", "-U", "postgres", "--wal-segsize=1",
         cwd="/")
    with open(lab.pg_data / "postgresql.conf", "a") as fh:
        fh.write(f"port = {lab.pg_port}\nlisten_addresses = ''\n"
                 f"unix_socket_directories = '{lab.run}'\n"
                 "cluster_name = 'stillpoint-agentlab'\nwal_level = replica\n"
                 "min_wal_size = 4MB\nmax_wal_size = 16MB\nshared_buffers = 16MB\n"
                 f"archive_mode = on\narchive_command = 'cp %p {lab.pg_archive}/%f'\n")
    _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(lab.pg_data),
         "-l", str(lab.run / "pg.log"), "-w", "start", cwd="/")
    lab.psql("CREATE TABLE t (id serial primary key, v text)")


def _start_mariadb(lab: Lab) -> subprocess.Popen:
    lab.my_data.mkdir()
    shutil.chown(lab.my_data, "mysql", "mysql")
    _run("mariadb-install-db", "--no-defaults", f"--datadir={lab.my_data}", "--user=mysql",
         "--auth-root-authentication-method=socket", "--skip-test-db", *MARIADB_SMALL)
    proc = subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={lab.my_data}", f"--socket={lab.my_socket}",
         f"--pid-file={lab.run}/mysqld.pid", "--skip-networking", "--user=mysql",
         f"--log-bin={lab.my_data}/binlog", "--server-id=1",
         f"--log-error={lab.root}/mariadb.err", *MARIADB_SMALL],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: lab.mysql("SELECT 1", check=False).returncode == 0, 60, "MariaDB")
    lab.mysql("CREATE DATABASE d; CREATE TABLE d.t (id int primary key auto_increment, "
              "v text) ENGINE=InnoDB")
    return proc


class Sshd:
    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        self.wrong_key = root / "other_ed25519"
        for key in (self.host_key, self.client_key, self.wrong_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        (root / "authorized_keys").write_text(
            (root / "client_ed25519.pub").read_text())
        (root / "authorized_keys").chmod(0o644)   # sshd reads it as the logging-in user
        root.chmod(0o755)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile {root}/sshd.pid\nSubsystem sftp internal-sftp\n")

    def host_pub(self) -> str:
        return Path(f"{self.host_key}.pub").read_text()

    def channel(self) -> SSHChannel:
        return SSHChannel("127.0.0.1", self.port, "root", key_path=self.client_key,
                          known_host_key=self.host_pub())


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    root = Path(tempfile.mkdtemp(prefix="stillpoint-agentlab-ssh-"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation dir
    server = Sshd(root)
    with open(root / "sshd.log", "wb") as log:
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(server.config)],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", server.port)) == 0
        _wait_for(listening, 20, "sshd")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agent(lab: Lab, sshd: Sshd) -> Iterator[AgentSession]:
    channel = sshd.channel()
    try:
        with deploy_agent(channel, lab.install_dir, lab.config()) as session:
            yield session
        assert not os.path.exists(lab.install_dir), "uninstall left the install dir"
        assert not list(lab.boot_dir.iterdir()), "uninstall left the boot hook"
    finally:
        channel.close()
        _run("fsfreeze", "-u", str(lab.mnt), check=False)   # never leave the disk frozen
        for hook in lab.hooks_dir.iterdir():
            hook.unlink()


def _blocked_write(path: Path) -> threading.Thread:
    def write() -> None:
        with open(path, "w") as fh:
            fh.write("written while frozen?")
            fh.flush()
            os.fsync(fh.fileno())
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


# --- SSH trust --------------------------------------------------------------------------
def test_wrong_host_key_is_rejected(sshd: Sshd) -> None:
    wrong = Path(f"{sshd.wrong_key}.pub").read_text()
    with pytest.raises(TrustError, match="SHA256:"):
        SSHChannel("127.0.0.1", sshd.port, "root", key_path=sshd.client_key,
                   known_host_key=wrong)


def test_wrong_client_key_fails_authentication(sshd: Sshd) -> None:
    with pytest.raises(AuthenticationFailed):
        SSHChannel("127.0.0.1", sshd.port, "root", key_path=sshd.wrong_key,
                   known_host_key=sshd.host_pub())


# --- discovery (in-process: other labs' databases may be running on this machine) ----------
def test_discovery_finds_the_running_databases(lab: Lab) -> None:
    sys.path.insert(0, str(REPO / "agent_payload" / "linux"))
    try:
        from stillpoint_agent.config import effective
        from stillpoint_agent.writers import mariadb, postgresql
    finally:
        sys.path.pop(0)
    cfg = effective({})
    pg = {w.data_dir: w for w in postgresql.discover(cfg, [])}
    assert str(lab.pg_data) in pg
    assert pg[str(lab.pg_data)].port == lab.pg_port
    assert pg[str(lab.pg_data)].socket_dir == str(lab.run)
    assert str(lab.my_socket) in {w.socket for w in mariadb.discover(cfg, [])}


# --- a whole backup attempt --------------------------------------------------------------
def test_backup_attempt_end_to_end(lab: Lab, agent: AgentSession) -> None:
    client = agent.client
    assert agent.hello["protocol_version"] == 1
    assert Path(lab.boot_dir, "stillpoint-restore").exists()   # inside the snapshot
    meta = client.gather_metadata()
    kinds = {w["kind"]: w for w in meta["writers"]}
    assert set(kinds) == {"filesystem", "postgresql", "mariadb"}
    assert kinds["filesystem"]["files"] == [str(lab.mnt)]
    assert kinds["postgresql"]["components"][0]["archive_dir"] == str(lab.pg_archive)
    assert kinds["mariadb"]["components"][0]["log_bin"] is True

    lab.psql("INSERT INTO t (v) SELECT 'x' FROM generate_series(1, 1000)")
    lab.mysql("INSERT INTO d.t (v) VALUES ('before')")
    for _ in range(3):   # archived WAL older than the backup, for the truncation check
        lab.psql("SELECT pg_switch_wal()")
        lab.psql("INSERT INTO t (v) VALUES ('y')")
    lab.mysql("FLUSH BINARY LOGS")
    lab.mysql("FLUSH BINARY LOGS")
    _wait_for(lambda: len(list(lab.pg_archive.iterdir())) >= 3, 30, "WAL archiving")

    client.prepare()
    assert lab.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                    "'%pg_backup_start%' AND pid <> pg_backend_pid()") == "1"
    frozen = client.freeze()
    assert frozen["state"] == "frozen"
    writer = _blocked_write(lab.mnt / "probe")
    writer.join(1.5)
    assert writer.is_alive(), "a write to the frozen file system went through"
    start = time.monotonic()
    thawed = client.thaw()
    assert time.monotonic() - start < 10
    writer.join(10)
    assert not writer.is_alive()
    assert thawed["state"] == "thawed"
    assert set(thawed["durations"]) >= {"prepare_ms", "freeze_ms", "thaw_ms", "post_ms"}
    pg = thawed["results"][f"postgresql:{lab.pg_data}"]
    assert "START WAL LOCATION" in pg["backup_label"] and "LABEL: stillpoint" in pg["backup_label"]
    my = thawed["results"][f"mariadb:{lab.my_socket}"]
    assert my["binlog_file"].startswith("binlog.") and my["binlog_pos"] > 0
    assert my["gtid"]
    assert client.status()["results"] == thawed["results"]

    archived_before = sorted(p.name for p in lab.pg_archive.iterdir())
    old_wal = [n for n in archived_before if n < pg["start_wal_file"] and len(n) == 24]
    assert old_wal
    logs = lab.mysql("SHOW BINARY LOGS").stdout.split()
    assert any(n < my["binlog_file"] for n in logs if n.startswith("binlog."))

    # A failed backup truncates nothing.
    client.backup_complete(success=False, restore_point="rp-1", truncate=True)
    assert sorted(p.name for p in lab.pg_archive.iterdir()) == archived_before
    assert lab.mysql("SHOW BINARY LOGS").stdout.split() == logs

    done = client.backup_complete(success=True, restore_point="rp-1", truncate=True)
    assert done["completed"]["writers"][f"postgresql:{lab.pg_data}"]["pruned"] is True
    left = sorted(p.name for p in lab.pg_archive.iterdir())
    assert not [n for n in left if n < pg["start_wal_file"] and len(n) == 24]
    assert pg["start_wal_file"] in left or any(n > pg["start_wal_file"] for n in left)
    first_log = lab.mysql("SHOW BINARY LOGS").stdout.split()[0]
    assert first_log == my["binlog_file"]


def test_mariadb_commits_block_while_frozen(lab: Lab, agent: AgentSession) -> None:
    # Without the file-system writer, so that only the backup lock can hold the commit
    # (on a frozen disk the commit would wait for the disk instead, which proves nothing).
    client = agent.client
    client.prepare(lab.config(writers={"exclude": ["filesystem"]}))
    client.freeze()
    blocked = lab.mysql("SET SESSION lock_wait_timeout = 2; "
                        "INSERT INTO d.t (v) VALUES ('during')", check=False)
    thawed = client.thaw()
    assert blocked.returncode != 0 and "Lock wait timeout" in blocked.stderr, blocked.stderr
    assert thawed["state"] == "thawed"
    lab.mysql("SET SESSION lock_wait_timeout = 5; INSERT INTO d.t (v) VALUES ('after')")


def test_watchdog_thaws_at_the_deadline(lab: Lab, agent: AgentSession) -> None:
    client = agent.client
    client.prepare(lab.config(freeze_timeout_s=4))   # generous: CI machines are loaded
    client.freeze()
    writer = _blocked_write(lab.mnt / "probe2")
    writer.join(0.5)
    assert writer.is_alive()
    writer.join(15)          # the watchdog thaws after 4 s without any request from us
    assert not writer.is_alive()
    status = client.status()
    assert status["state"] == "expired"
    assert status["failure"]["code"] == "freeze-expired"
    with pytest.raises(AgentFailed) as err:
        client.thaw()
    assert err.value.code == "freeze-expired"
    # backup mode was ended by the watchdog: no session holds pg_backup_start any more
    assert lab.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                    "'%pg_backup_start%' AND pid <> pg_backend_pid()") == "0"
    lab.mysql("SET SESSION lock_wait_timeout = 5; INSERT INTO d.t (v) VALUES ('after')")


def test_disconnect_thaws_at_once(lab: Lab, agent: AgentSession, sshd: Sshd) -> None:
    # A second agent process in the same install dir, on its own SSH connection, that we
    # then drop without a word: stdin EOF must thaw everything immediately.
    channel = sshd.channel()
    try:
        stream = channel.open_process([f"{lab.install_dir}/stillpoint-agent", "serve"])
        from appliance.guest.client import AgentClient
        other = AgentClient(stream)
        other.hello()
        other.prepare(lab.config(freeze_timeout_s=30))
        other.freeze()
        writer = _blocked_write(lab.mnt / "probe3")
        writer.join(0.5)
        assert writer.is_alive()
    finally:
        channel.close()       # connection gone: sshd closes the agent's stdin
    writer.join(10)
    assert not writer.is_alive(), "the agent did not thaw when its client vanished"


def test_failing_hook_fails_the_writer(lab: Lab, agent: AgentSession) -> None:
    log = lab.root / "hook.log"
    good = lab.hooks_dir / "10-good"
    good.write_text(f"#!/bin/sh\necho \"good $1\" >> {log}\n")
    bad = lab.hooks_dir / "20-bad"
    bad.write_text("#!/bin/sh\n[ \"$1\" = freeze ] && { echo 'cannot quiesce app' >&2; exit 3; }\n"
                   "exit 0\n")
    good.chmod(0o755)
    bad.chmod(0o755)
    client = agent.client
    client.prepare(lab.config())     # re-discovers writers: the hooks now exist
    with pytest.raises(AgentFailed) as err:
        client.freeze()
    assert err.value.writer == "hooks"
    assert "cannot quiesce app" in str(err.value) and "20-bad" in str(err.value)
    assert log.read_text().split("\n")[:2] == ["good freeze", "good freezeFail"]
    status = client.status()
    assert status["state"] == "failed"
    assert status["writers"]["hooks"]["state"] == "failed"
    # nothing stays frozen after the failed freeze
    writer = _blocked_write(lab.mnt / "probe4")
    writer.join(5)
    assert not writer.is_alive()


def test_boot_hook_without_marker_removes_itself(lab: Lab, sshd: Sshd) -> None:
    channel = sshd.channel()
    try:
        session = deploy_agent(channel, lab.install_dir, lab.config())
        session.client.close()
        hook = lab.boot_dir / "stillpoint-restore"
        assert hook.exists()
        # No vmware-rpctool here: the marker command fails, i.e. "unset".
        res = channel.run([str(hook)])
        assert res.ok, res.text()
        assert not os.path.exists(lab.install_dir) and not hook.exists()
        session.remove()
    finally:
        channel.close()
    assert not (lab.root / "restore.json").exists()


def test_status_reports_config_errors(lab: Lab, agent: AgentSession) -> None:
    with pytest.raises(AgentFailed) as err:
        agent.client.prepare({"filesystems": {"include": ["/no/such/mount"]}})
    assert err.value.code == "writer-failed" and "not a mount point" in str(err.value)
    with pytest.raises(AgentFailed) as err:
        agent.client.prepare({"no_such_setting": 1})
    assert err.value.code == "config-invalid"
    assert json.loads(json.dumps(agent.client.status()))["state"] in ("idle", "failed", "completed")


def test_postgresql_restores_from_the_snapshot_with_its_backup_label(
        lab: Lab, agent: AgentSession) -> None:
    """Copy the data directory while frozen (our "snapshot"), run the agent's boot-time
    restore on the copy with the stored backup_label, and start PostgreSQL on it."""
    client = agent.client
    lab.psql("INSERT INTO t (v) SELECT 'snap' FROM generate_series(1, 500)")
    expected = lab.psql("SELECT count(*) FROM t")
    copy = lab.root / "restored-pg"
    client.prepare(lab.config(writers={"exclude": ["mariadb"]}))
    client.freeze()
    try:
        _run("cp", "-a", str(lab.pg_data), str(copy))
    finally:
        thawed = client.thaw()
    lab.psql("INSERT INTO t (v) SELECT 'after' FROM generate_series(1, 100)")
    result = dict(thawed["results"][f"postgresql:{lab.pg_data}"], data_dir=str(copy))
    assert (lab.pg_archive / result["stop_wal_file"]).exists()

    # The agent as it sits in the restored image: its own copy, the marker via `cat`.
    image_agent = lab.root / "image-agent"
    shutil.copytree(REPO / "agent_payload" / "linux", image_agent)
    marker = lab.root / "marker.json"
    marker.write_text(json.dumps({"restore_point": "rp-pg", "writers": {"pg": result}}))
    (image_agent / "config.json").write_text(json.dumps({"boot": {
        "hook_dirs": [], "marker_command": ["cat", str(marker)],
        "log_path": str(lab.root / "restore.log"),
        "result_path": str(lab.root / "restore.json")}}))
    boot = _run(str(image_agent / "stillpoint-agent"), "boot", check=False)
    assert boot.returncode == 0, boot.stdout + boot.stderr
    outcome = json.loads((lab.root / "restore.json").read_text())
    assert outcome["writers"]["pg"]["backup_label_placed"] is True, outcome
    assert (copy / "backup_label").read_text() == result["backup_label"]
    assert not image_agent.exists()

    port = _free_port()
    with open(copy / "postgresql.conf", "a") as fh:
        fh.write(f"port = {port}\narchive_mode = off\ncluster_name = 'stillpoint-agentlab-r'\n")
    started = _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(copy),
                   "-l", str(lab.run / "restored.log"), "-w", "-t", "60", "start", check=False,
                   cwd="/")
    try:
        assert started.returncode == 0, (lab.run / "restored.log").read_text()[-3000:]
        count = _run("runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-X", "-A", "-t",
                     "-h", str(lab.run), "-p", str(port), "-d", "postgres", "-c",
                     "SELECT count(*) FROM t", cwd="/").stdout.strip()
        assert count == expected
        log = (lab.run / "restored.log").read_text()
        assert "starting backup recovery" in log or "starting archive recovery" in log, log
    finally:
        _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(copy),
             "-m", "immediate", "stop", check=False, cwd="/")
        shutil.rmtree(copy, ignore_errors=True)


def test_deadman_thaws_when_the_agent_is_killed(lab: Lab, agent: AgentSession, sshd: Sshd) -> None:
    """SIGKILL leaves no watchdog thread: the deadman process must thaw by itself."""
    channel = sshd.channel()
    try:
        from appliance.guest.client import AgentClient
        other = AgentClient(channel.open_process([f"{lab.install_dir}/stillpoint-agent",
                                                  "serve"]))
        pid = other.hello()["host"]["pid"]
        other.prepare(lab.config(writers={"include": ["filesystem"]}))
        other.freeze(timeout_s=20)
        writer = _blocked_write(lab.mnt / "probe5")
        writer.join(0.5)
        assert writer.is_alive()
        os.kill(pid, signal.SIGKILL)
        writer.join(5)        # the deadman sees its pipe close at once, well before 20 s
        assert not writer.is_alive(), "nothing thawed after the agent was killed"
    finally:
        channel.close()


def test_deadman_thaws_at_its_deadline_when_the_agent_hangs(
        lab: Lab, agent: AgentSession, sshd: Sshd) -> None:
    """A stopped agent (its watchdog cannot run, its pipe stays open): deadline + grace."""
    channel = sshd.channel()
    pid = None
    try:
        from appliance.guest.client import AgentClient
        other = AgentClient(channel.open_process([f"{lab.install_dir}/stillpoint-agent",
                                                  "serve"]))
        pid = other.hello()["host"]["pid"]
        other.prepare(lab.config(writers={"include": ["filesystem"]}))
        other.freeze(timeout_s=2)
        os.kill(pid, signal.SIGSTOP)
        writer = _blocked_write(lab.mnt / "probe6")
        writer.join(2.5)      # past the agent's own deadline: its watchdog cannot run
        assert writer.is_alive()
        writer.join(15)       # 2 s deadline + 3 s grace
        assert not writer.is_alive(), "the deadman did not thaw at its deadline"
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        channel.close()


@pytest.fixture
def sudo_user(sshd: Sshd) -> Iterator[tuple[str, str]]:
    """A throwaway login user whose sudo asks for its password (sent via `sudo -S`)."""
    name = f"spagent{os.getpid() % 100000}"
    password = "Sudo-pass " + os.urandom(6).hex()
    sudoers = Path(f"/etc/sudoers.d/{name}")
    _run("useradd", "--no-create-home", "--shell", "/bin/sh", name)
    try:
        _run("chpasswd", input_text=f"{name}:{password}\n")
        sudoers.write_text(f"{name} ALL=(root) ALL\n")
        sudoers.chmod(0o440)
        yield name, password
    finally:
        sudoers.unlink(missing_ok=True)
        # userdel refuses while the user's last sshd session is still closing.
        for _ in range(50):
            if _run("userdel", name, check=False).returncode in (0, 6):   # 6: no such user
                break
            time.sleep(0.2)
        else:
            _run("userdel", "--force", name, check=False)


def test_deploy_as_a_sudo_user(lab: Lab, sshd: Sshd, sudo_user: tuple[str, str]) -> None:
    name, password = sudo_user
    # /tmp is shared with the lab's guests (and other tests): look only at what this test adds.
    temp_before = set(Path("/tmp").glob(".stillpoint-*"))
    channel = SSHChannel("127.0.0.1", sshd.port, name, key_path=sshd.client_key,
                         password=password, known_host_key=sshd.host_pub(), sudo=True)
    try:
        assert channel.run(["id", "-un"], sudo=False).stdout.strip() == name.encode()
        with deploy_agent(channel, lab.install_dir, lab.config()) as session:
            assert session.hello["host"]["euid"] == 0
            assert os.stat(lab.install_dir).st_uid == 0
            session.client.prepare(lab.config(writers={"include": ["filesystem"]}))
            session.client.freeze()
            assert session.client.thaw()["state"] == "thawed"
        assert not os.path.exists(lab.install_dir)
        left = set(Path("/tmp").glob(".stillpoint-*")) - temp_before
        assert not left, f"upload temp files left behind: {left}"
    finally:
        channel.close()
        _run("fsfreeze", "-u", str(lab.mnt), check=False)
    log = (lab.root.parent / "sshd.log")
    assert not log.exists() or password not in log.read_text()
