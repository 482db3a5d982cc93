"""The appliance image: the packer template validates, and the provisioning script that
packer runs turns a fresh Debian 12 root into a working appliance.

The fresh root is made by debootstrap (Debian's mirror, like the host's apt). The script
runs in it through chroot inside a private mount namespace (`unshare --mount`: /proc, /dev
and /sys are mounted for it and vanish with the namespace), with a loop device as the
repository disk. Then stillpoint-setup configures it against the lab's vCenter (lab 4),
`stillpoint serve` is started exactly as the systemd unit starts it (user, environment,
ExecStart), and a job fired in vCenter is backed up by that serve.

Debian's `packer` (1.6.6), `debootstrap` and `shellcheck` are installed by this module if
missing (the test runs as root, like CI).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.jobs.history import History
from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec
from appliance.profile import write_private

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
PACKER_DIR = REPO / "packer"
LAB_ID = 4
VM = "appliance-vm"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_CACHE = Path("/var/cache/stillpoint-test/debootstrap")
VALIDATE_VARS = {
    "vcenter_server": "vcenter.example.com", "vcenter_username": "builder@vsphere.local",
    "vcenter_password": "validate-only-password", "datacenter": "DC0",
    "cluster": "Cluster0", "datastore": "datastore1", "network": "VM Network",
    "iso_path": "[iso] debian-12.11.0-amd64-netinst.iso",
    "build_password": "validate-only-build-password",
}


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (apt, debootstrap, chroot, mount namespaces, loop devices)")


def _ensure(*packages: str) -> None:
    missing = [p for p in packages if shutil.which(p) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
            # A machine whose package lists were never fetched.
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True,
                           capture_output=True)
            subprocess.run(install, env=env, check=True, capture_output=True)


def test_packer_template_validates_and_is_formatted(tmp_path: Path) -> None:
    _need_root()
    _ensure("packer")
    source = tmp_path / "stillpoint.tar.gz"
    source.write_bytes(b"")  # validate checks that the file exists
    args = [f"-var={k}={v}" for k, v in VALIDATE_VARS.items()]
    args.append(f"-var=stillpoint_source={source}")
    done = subprocess.run(["packer", "validate", *args, "."], cwd=PACKER_DIR,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # A missing required variable is refused (validate really reads the template).
    done = subprocess.run(["packer", "validate", *args[1:], "."], cwd=PACKER_DIR,
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "vcenter_server" in done.stdout + done.stderr
    fmt = subprocess.run(["packer", "fmt", "-check", "."], cwd=PACKER_DIR,
                         capture_output=True, text=True, check=False)
    assert fmt.returncode == 0, f"run 'packer fmt packer/': {fmt.stdout}"


def test_shell_scripts_pass_shellcheck() -> None:
    _need_root()
    _ensure("shellcheck")
    scripts = [PACKER_DIR / "scripts/provision.sh", PACKER_DIR / "files/stillpoint-wrapper"]
    done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout


# ---- the provisioning script in a fresh Debian root ------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    _need_root()
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, vms=(VMSpec(VM, has_guest=False, apps=(),
                                               disks=(DiskSpec.mib(32),)),))
    lab_down(cfg)
    handle = lab_up(cfg)
    try:
        yield handle
    finally:
        lab_down(cfg)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "repository-disk.img"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    _need_root()
    _ensure("debootstrap")
    root = Path("/var/tmp") / f"stillpoint-test-root-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--cache-dir={DEBOOTSTRAP_CACHE}",
             "bookworm", str(root), MIRROR],
            capture_output=True, text=True, check=False, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        # Harness, not provisioning: no daemon may start inside the chroot.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        yield root
    finally:
        _no_mounts_below(root)
        shutil.rmtree(root, ignore_errors=True)


def _no_mounts_below(root: Path) -> None:
    # The namespaces are private, so nothing should be mounted here; never rm -rf a mount.
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    assert not [m for m in mounts if f" {root}/" in m or f" {root} " in m], mounts


def in_root(root: Path, script: str, *, env: dict[str, str] | None = None,
            stdin: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a shell script in the Debian root: private mount namespace, /proc /dev /sys."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    setup = (f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
             f"mount -t sysfs sys {root}/sys && exec chroot {root} /usr/bin/env -i "
             f"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "
             f"{exports} /bin/bash -c {shlex.quote(script)}")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup],
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _source_archive(dest: Path) -> Path:
    archive = dest / "stillpoint-source.tar.gz"
    if (REPO / ".git").exists():
        stash = subprocess.run(["git", "stash", "create"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        subprocess.run(["git", "archive", "--format=tar.gz", "-o", str(archive),
                        stash or "HEAD"], cwd=REPO, check=True)
    else:
        subprocess.run(["tar", "-czf", str(archive), "--exclude=.venv", "-C", str(REPO), "."],
                       check=True)
    return archive


def _wheelhouse(dest: Path) -> Path:
    """Wheels of Stillpoint's dependencies (and its build backend), fetched by the host's
    pip: provision.sh then installs offline (PIP_ARGS), as documented for offline builds."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    house = dest / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "-d", str(house), "setuptools>=64", "wheel", *deps], check=True,
                   capture_output=True, timeout=600)
    return house


def _tmpfiles(root: Path) -> str:
    """Shell commands doing what systemd-tmpfiles does at boot for our 'd' lines."""
    out = ""
    for line in (root / "etc/tmpfiles.d/stillpoint.conf").read_text().splitlines():
        if line.startswith("d "):
            _d, path, mode, user, group = line.split()[:5]
            out += f"install -d -m {mode} -o {user} -g {group} {path} && "
    return out


def _unit(root: Path) -> tuple[dict[str, str], list[str], str]:
    """Environment, ExecStart argv and User of the stillpoint-serve unit."""
    env: dict[str, str] = {}
    argv: list[str] = []
    user = ""
    defaults: dict[str, str] = {}
    for line in (root / "etc/default/stillpoint").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            defaults[k] = shlex.split(v)[0] if v.strip() else ""
    for line in (root / "etc/systemd/system/stillpoint-serve.service").read_text().splitlines():
        if line.startswith("Environment="):
            k, _, v = line[len("Environment="):].partition("=")
            env[k] = v
        elif line.startswith("ExecStart="):
            for word in shlex.split(line[len("ExecStart="):]):
                argv.extend(shlex.split(defaults[word[1:]]) if word.startswith("$") else [word])
        elif line.startswith("User="):
            user = line[len("User="):]
    return env, argv, user


def test_provisioning_script_yields_a_working_serve_in_a_fresh_debian_root(
        lab: Any, debian_root: Path, loop_disk: str, tmp_path: Path) -> None:
    root = debian_root
    shutil.copytree(PACKER_DIR, root / "tmp/packer")
    shutil.copyfile(_source_archive(tmp_path), root / "tmp/stillpoint-source.tar.gz")
    shutil.copytree(_wheelhouse(tmp_path), root / "tmp/wheelhouse")
    done = in_root(root, "bash /tmp/packer/scripts/provision.sh",
                   env={"STILLPOINT_SRC": "/tmp/stillpoint-source.tar.gz",
                        "REPO_DISK": loop_disk,
                        "PIP_ARGS": "--no-index --find-links /tmp/wheelhouse"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "provision: done: stillpoint, version" in done.stdout

    # What the script promised: hardening, units, the repository disk.
    sshd = (root / "etc/ssh/sshd_config.d/50-stillpoint.conf").read_text()
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    for unit in ("stillpoint-serve", "stillpoint-firstboot", "nftables"):
        link = root / f"etc/systemd/system/multi-user.target.wants/{unit}.service"
        # An absolute link into the root (it would dangle if resolved from the host).
        assert link.is_symlink() and os.readlink(link).endswith(f"/{unit}.service")
    assert 'Unattended-Upgrade "1"' in (root / "etc/apt/apt.conf.d/20auto-upgrades").read_text()
    assert "LABEL=stillpoint-repo" in (root / "etc/fstab").read_text()
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", loop_disk],
                           capture_output=True, text=True, check=False).stdout.strip()
    assert label == "stillpoint-repo"
    checks = in_root(root, "mkdir -p /run/sshd && nft -c -f /etc/nftables.conf && sshd -t && "
                           "passwd -S stillpoint-admin && "
                           "test -d /opt/stillpoint/src/agent_payload/linux")
    assert checks.returncode == 0, checks.stdout + checks.stderr
    assert " L " in checks.stdout  # the admin account has no usable password

    # First-boot configuration against the lab's vCenter (password on stdin).
    vc = lab.vcsim
    # The repository disk as fstab would mount it (by device here: the host has no udev
    # and other labs' loop devices come and go while this runs).
    mount_repo = f"mount -t ext4 {loop_disk} /var/lib/stillpoint/repository && "
    done = in_root(root, mount_repo + "stillpoint-setup "
                   f"--vcenter 127.0.0.1:{vc.port} --user {shlex.quote(vc.user)} "
                   f"--thumbprint {vc.thumbprint_sha256} --password-file - --no-start",
                   stdin=vc.password + "\n")
    assert done.returncode == 0, done.stdout + done.stderr
    profile = root / "etc/stillpoint/profile.json"
    assert oct(profile.stat().st_mode & 0o777) == "0o600"
    assert vc.password not in profile.read_text()

    # A job in vCenter, made from the host (any admin workstation), fired there.
    host_env = _host_env(lab, tmp_path)
    subprocess.run([sys.executable, "-m", "appliance.cli", "job", "create", "appliance",
                    "--vm", VM, "--daily", "01:00", "--app-aware", "off"], env=host_env,
                   check=True, capture_output=True)

    env, argv, user = _unit(root)
    assert user == "stillpoint" and argv[:2] == ["/opt/stillpoint/venv/bin/stillpoint", "serve"]
    # A boot's /run (a tmpfs) with what tmpfiles.d makes in it.
    serve_cmd = ("mount -t tmpfs tmpfs /run && " + _tmpfiles(root) + mount_repo
                 + "exec setpriv --reuid=stillpoint "
                 "--regid=stillpoint --init-groups env "
                 + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
                 + " ".join(shlex.quote(a) for a in argv) + " --poll 1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             (f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
              f"exec chroot {root} /bin/bash -c {shlex.quote(serve_cmd)}")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda: "watching vCenter" in log.read_text(), 60, log)
            subprocess.run([sys.executable, "-m", "appliance.cli", "job", "run", "appliance"],
                           env=host_env, check=True, capture_output=True)
            history = root / "var/lib/stillpoint/history.sqlite"
            run = _wait(lambda: _finished(history, "appliance"), 90, log)
            assert run.status == "ok", log.read_text()
            assert [v.vm for v in run.vms] == [VM]
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(10)
    assert serve.returncode == 0, log.read_text()
    # The restore point is in the appliance's repository, on the repository disk.
    # Through the appliance's wrapper, as an administrator would (root drops to the service
    # user and gets the service's profile and history).
    listed = in_root(root, mount_repo + "stillpoint list --json && stillpoint job show "
                     "appliance --json")
    assert listed.returncode == 0, listed.stderr
    points_doc, _, job_doc = listed.stdout.partition("\n]\n")
    assert [p["vm"] for p in json.loads(points_doc + "]")] == [VM]
    assert json.loads(job_doc)["runs"][0]["status"] == "ok"


def _host_env(lab: Any, tmp_path: Path) -> dict[str, str]:
    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(tmp_path / "host-repository")
    profile = tmp_path / "host-profile.json"
    write_private(profile, json.dumps(doc))
    return {**os.environ, "STILLPOINT_PROFILE": str(profile),
            "STILLPOINT_HISTORY": str(tmp_path / "host-history.sqlite")}


def _finished(path: Path, job: str) -> Any:
    if not path.exists():
        return None
    h = History(path)
    try:
        done = [r for r in h.runs(job) if r.status != "running"]
    finally:
        h.close()
    return done[0] if done else None


def _wait(cond: Any, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out; serve log:\n{log.read_text()}")
