"""Builds the lab's guest disk image from Debian's packages, once per recipe hash.

    ensure_guest_image() -> GuestImage(path, kernel_release, recipe_hash)

Cache: `/var/cache/stillpoint-lab/guest-image/<recipe-hash>/{disk.raw,image.json,build.log}`
(`.deb` files under `/var/cache/stillpoint-lab/debs/`). A build runs under a flock on
`guest-image/.lock` (one build at a time on the machine) in `guest-image/.build-<hash>-<pid>/`,
renamed to `<hash>/` only when complete: a killed build leaves no half image, and the next
build removes what it left (and detaches its loop device).

The build itself runs in a child process inside `unshare --mount --propagation private --pid
--fork --kill-child`: its mounts are invisible to the host and to other labs, and when it
dies, for whatever reason, every process it started dies with it and its mounts go away.
Steps (LAB-QEMU.md §1): sparse raw disk, DOS label (sfdisk), losetup + partx, mkfs.ext4,
debootstrap minbase, the databases via apt in the chroot, the image's files (`files/`),
MariaDB's lab account, clean-up (no SSH host keys, empty machine-id), GRUB (grub-mkimage +
boot.img/core.img written after the MBR), fsck.

`python -m stillpoint_lab.image.build [--rebuild]` builds (or finds) it and prints its path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stillpoint_lab.image import layout, recipe

# $STILLPOINT_LAB_CACHE moves the whole cache (a cold build without the .deb cache, say)
CACHE_ROOT = Path(os.environ.get("STILLPOINT_LAB_CACHE", "/var/cache/stillpoint-lab"))
IMAGE_CACHE = CACHE_ROOT / "guest-image"
DEB_CACHE = CACHE_ROOT / "debs"
DISK_NAME = "disk.raw"
META_NAME = "image.json"
LOG_NAME = "build.log"
FAILURE_NAME = "failure.json"
KEEP_IMAGES = 2                  # this recipe's image and the one before it
LOCK_WAIT_S = 45 * 60
BUILD_TIMEOUT_S = 40 * 60
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_D = Path("/etc/apt/sources.list.d")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: never write to `path` (copy it: `cp --sparse=always`)."""

    path: Path             # 4 GiB sparse raw disk (DOS label, one ext4 partition, GRUB)
    kernel_release: str    # uname -r of the guest, e.g. 6.1.0-37-cloud-amd64
    recipe_hash: str


def _stderr_progress(line: str) -> None:
    print(f"guest image: {line}", file=sys.stderr, flush=True)


def cached_guest_image(recipe_hash: str | None = None) -> GuestImage | None:
    """The cached image of this recipe (the current one by default), if it is built."""
    h = recipe_hash or recipe.recipe_hash()
    entry = IMAGE_CACHE / h
    try:
        meta = json.loads((entry / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    disk = entry / DISK_NAME
    if not disk.is_file() or disk.stat().st_size != layout.IMAGE_SIZE_BYTES:
        return None
    return GuestImage(path=disk, kernel_release=str(meta["kernel_release"]), recipe_hash=h)


def ensure_guest_image(*, progress: Progress | None = None,
                       rebuild: bool = False) -> GuestImage:
    """The guest image of the current recipe: from the cache, or built now (2–4 min)."""
    from appliance.errors import LabError

    say = progress or _stderr_progress
    h = recipe.recipe_hash()
    if not rebuild and (hit := cached_guest_image(h)):
        return hit
    if os.geteuid() != 0:
        raise LabError("building the guest image needs root (loop devices, mounts, chroot)")
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with _build_lock(say):
        if rebuild:
            shutil.rmtree(IMAGE_CACHE / h, ignore_errors=True)
        elif hit := cached_guest_image(h):   # built by another process while we waited
            return hit
        _remove_stale_builds(say)
        image = _build(h, say)
        _prune_old_images(keep=h)
        return image


# --- the outer side: lock, temp dir, the namespaced child, rename ---

@contextlib.contextmanager
def _build_lock(say: Progress) -> Iterator[None]:
    from appliance.errors import LabError

    fd = os.open(IMAGE_CACHE / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another process is building the guest image: waiting for it")
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LabError(f"waited {LOCK_WAIT_S} s for another build of the "
                                       f"guest image ({IMAGE_CACHE}/.lock)") from None
                    time.sleep(1)
        yield
    finally:
        os.close(fd)   # releases the lock


def _loops_backed_by(directory: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False).stdout
    try:
        devices = json.loads(out or "{}").get("loopdevices", [])
    except ValueError:
        return []
    prefix = str(directory).rstrip("/") + "/"
    return [d["name"] for d in devices
            if str(d.get("back-file") or "").removesuffix(" (deleted)").startswith(prefix)]


def _detach_loops(directory: Path) -> None:
    for dev in _loops_backed_by(directory):
        subprocess.run(["partx", "-d", dev], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _remove_stale_builds(say: Progress) -> None:
    """What a killed build left (we hold the lock: nobody else is building)."""
    for stale in IMAGE_CACHE.glob(".build-*"):
        say(f"removing an unfinished build: {stale.name}")
        _detach_loops(stale)
        shutil.rmtree(stale, ignore_errors=True)


def _prune_old_images(keep: str) -> None:
    entries = [p for p in IMAGE_CACHE.iterdir()
               if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name) and p.name != keep]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_IMAGES - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: our death ends the whole build


def _build(h: str, say: Progress) -> GuestImage:
    from appliance.errors import LabError

    mirror = debian_mirror()
    work = IMAGE_CACHE / f".build-{h}-{os.getpid()}"
    work.mkdir()
    started = time.monotonic()
    say(f"building {h} from {mirror} (log: {work / LOG_NAME})")
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
            "--kill-child", "--mount-proc",
            sys.executable, "-m", "stillpoint_lab.image.build", "--inner", str(work),
            "--mirror", mirror, "--recipe-hash", h]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               PYTHONUNBUFFERED="1")
    last_step = "start"
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, preexec_fn=_die_with_parent)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if m := re.match(r"\[\d+/\d+\] (\S+)", line):
                    last_step = m.group(1)
                say(line)
                if time.monotonic() - started > BUILD_TIMEOUT_S:
                    proc.kill()
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            raise _failure(work, last_step, rc)
        meta = json.loads((work / META_NAME).read_text())
        os.sync()
        os.rename(work, IMAGE_CACHE / h)
    except BaseException:
        _detach_loops(work)
        failed_log = IMAGE_CACHE / "last-failed-build.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(work / LOG_NAME, failed_log)
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"built in {time.monotonic() - started:.0f} s: {IMAGE_CACHE / h / DISK_NAME} "
        f"(kernel {meta['kernel_release']}, "
        f"{meta['allocated_bytes'] / 2**20:.0f} MiB allocated)")
    image = cached_guest_image(h)
    if image is None:
        raise LabError(f"the guest image built in {IMAGE_CACHE / h} is not readable")
    return image


def _failure(work: Path, last_step: str, rc: int) -> Exception:
    from appliance.errors import LabError

    log = IMAGE_CACHE / "last-failed-build.log"
    try:
        info = json.loads((work / FAILURE_NAME).read_text())
    except (OSError, ValueError):
        info = {"step": last_step, "message": f"the build process exited with {rc}",
                "log_tail": _tail(work / LOG_NAME)}
    return LabError(f"guest image build failed at step '{info['step']}': {info['message']}\n"
                    f"--- last lines of its log (all of it: {log}) ---\n{info['log_tail']}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def debian_mirror() -> str:
    """The Debian mirror apt uses for the recipe's suite (sources.list or deb822 .sources)."""
    from appliance.errors import LabError

    entries: list[tuple[list[str], list[str], list[str], list[str]]] = []  # types uris suites comps
    files = [APT_SOURCES] if APT_SOURCES.is_file() else []
    if APT_SOURCES_D.is_dir():
        files += sorted(p for p in APT_SOURCES_D.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for para in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in para.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                entries.append((fields.get("types", "").split(), fields.get("uris", "").split(),
                                fields.get("suites", "").split(),
                                fields.get("components", "").split()))
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 3:
                    entries.append(([line[0]], [line[1]], [line[2]], line[3:]))
    for types, uris, suites, comps in entries:
        if "deb" in types and recipe.SUITE in suites and "main" in comps:
            for uri in uris:
                if re.match(r"(https?|file)://", uri):
                    return uri.rstrip("/")
    raise LabError(f"no Debian mirror for {recipe.SUITE} main in {APT_SOURCES} or "
                   f"{APT_SOURCES_D}/*.list|*.sources (the guest image is built from it)")


# --- the inner side: runs as PID 1 of its own PID and mount namespaces ---

_UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/stillpoint-lab-build-unsafe-io"


class _StepFailed(Exception):
    pass


class _Builder:
    """The build steps; every command's output goes to build.log."""

    STEPS = ("disk", "loop", "mkfs", "mount", "debootstrap", "chroot", "packages",
             "configure", "mariadb", "clean", "kernel", "unmount", "bootloader")

    def __init__(self, work: Path, mirror: str, recipe_hash: str) -> None:
        self.work = work
        self.mirror = mirror
        self.recipe_hash = recipe_hash
        self.disk = work / DISK_NAME
        self.root = work / "root"
        self.log_path = work / LOG_NAME
        self.log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in main)
        self.loop: str | None = None
        self.part: str | None = None
        self.root_uuid = str(uuid.uuid4())
        self.kernel_release = ""
        self.step_no = 0
        self.timings: dict[str, float] = {}
        self.mounted_root = False

    # -- plumbing --
    @contextlib.contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.step_no += 1
        print(f"[{self.step_no}/{len(self.STEPS)}] {name}: {what}", flush=True)
        self.log.write(f"\n===== step {name}: {what}\n")
        t0 = time.monotonic()
        try:
            yield
        except Exception as err:
            msg = str(err) if isinstance(err, _StepFailed) else f"{type(err).__name__}: {err}"
            (self.work / FAILURE_NAME).write_text(json.dumps({
                "step": name, "message": msg, "log_tail": _tail(self.log_path)}))
            self.log.write(f"!!!!! step {name} failed: {msg}\n")
            raise
        self.timings[name] = round(time.monotonic() - t0, 1)
        self.log.write(f"----- step {name} done in {self.timings[name]} s\n")

    def run(self, argv: list[str], *, chroot: bool = False, timeout: float = 300,
            input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        if chroot:
            argv = ["chroot", str(self.root), *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}
        self.log.write(f"$ {' '.join(argv)}\n")
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, input=input, timeout=timeout, env=env,
                                  errors="replace", check=False)
        except subprocess.TimeoutExpired as err:
            self.log.write(str(err.output or ""))
            raise _StepFailed(f"{argv[0] if not chroot else argv[2]} timed out after "
                              f"{timeout:.0f} s") from None
        self.log.write(proc.stdout)
        if check and proc.returncode != 0:
            cmd = argv[2] if chroot else argv[0]
            raise _StepFailed(f"`{' '.join(argv[:8])}` exited with {proc.returncode} ({cmd})")
        return proc

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    # -- the steps --
    def make_disk(self) -> None:
        with open(self.disk, "wb") as f:
            f.truncate(layout.IMAGE_SIZE_BYTES)
        self.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(self.disk)],
                 input=f"label: dos\nstart={recipe.PARTITION_START_SECTOR}, type=83, "
                       "bootable\n")

    def attach(self) -> None:
        self.loop = self.run(["losetup", "--find", "--show", str(self.disk)]).stdout.strip()
        self.run(["partx", "-a", self.loop], check=False)   # "already exists" is fine
        part = f"{self.loop}p1"
        name = Path(part).name
        sysfs = Path("/sys/block") / Path(self.loop).name / name / "dev"
        for _ in range(50):
            if Path(part).exists() or sysfs.exists():
                break
            time.sleep(0.1)
        if not Path(part).exists():
            if not sysfs.exists():
                raise _StepFailed(f"no partition device for {self.loop} after partx -a")
            major, minor = (int(x) for x in sysfs.read_text().split(":"))
            os.mknod(part, 0o600 | 0o060000, os.makedev(major, minor))
        self.part = part

    def mkfs(self) -> None:
        assert self.part
        self.run(["mkfs.ext4", "-q", "-F", "-U", self.root_uuid, "-L", layout.ROOT_LABEL,
                  "-O", recipe.MKFS_FEATURES, "-E", "lazy_itable_init=0,lazy_journal_init=0",
                  self.part])

    def mount(self) -> None:
        assert self.part
        self.root.mkdir()
        self.run(["mount", self.part, str(self.root)])
        self.mounted_root = True

    def debootstrap(self) -> None:
        cache = DEB_CACHE / "debootstrap"
        cache.mkdir(parents=True, exist_ok=True)
        # two stages, so that dpkg runs without an fsync per file (--force-unsafe-io: a
        # build that fails is thrown away anyway); the config goes again in `clean`
        self.run(["debootstrap", "--foreign", f"--variant={recipe.VARIANT}",
                  f"--arch={recipe.ARCH}", "--components=main", f"--cache-dir={cache}",
                  f"--include={','.join(recipe.BASE_PACKAGES)}",
                  recipe.SUITE, str(self.root), self.mirror], timeout=1800)
        unsafe = self.path(_UNSAFE_IO)
        unsafe.parent.mkdir(parents=True, exist_ok=True)
        unsafe.write_text("force-unsafe-io\n")
        self.run(["/debootstrap/debootstrap", "--second-stage"], chroot=True, timeout=1800)

    def chroot_setup(self) -> None:
        for fs, target in (("proc", "proc"), ("sysfs", "sys"), ("tmpfs", "run"),
                           ("tmpfs", "tmp")):
            self.run(["mount", "-t", fs, fs, str(self.path(target))])
        self.run(["mount", "--rbind", "/dev", str(self.path("dev"))])
        self.run(["mount", "--make-rslave", str(self.path("dev"))])
        archives = DEB_CACHE / "apt"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        self.run(["mount", "--bind", str(archives), str(self.path("var/cache/apt/archives"))])
        policy = self.path("usr/sbin/policy-rc.d")
        policy.write_text("#!/bin/sh\n# image build: no service starts\nexit 101\n")
        policy.chmod(0o755)
        self.path("etc/apt/sources.list").write_text(
            f"deb {self.mirror} {recipe.SUITE} main\n")
        self.path("etc/dpkg/dpkg.cfg.d/stillpoint-lab-nodoc").write_text(recipe.DPKG_EXCLUDES)
        self.path("etc/apt/apt.conf.d/90stillpoint-lab").write_text(recipe.APT_CONF)

    def packages(self) -> None:
        self.run(["apt-get", "-q", "update"], chroot=True, timeout=900)
        self.run(["apt-get", "-q", "-y", "--no-install-recommends", "install",
                  *recipe.CHROOT_PACKAGES], chroot=True, timeout=1800)

    def configure(self) -> None:
        self._install_files()
        user = layout.SSH_USER
        self.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", user],
                 chroot=True)
        self.run(["usermod", "--password", "*", user], chroot=True)   # no password, not locked
        self.run(["visudo", "-c", "-q", "-f", "/etc/sudoers.d/stillpoint-lab"], chroot=True)
        self.path("etc/hostname").write_text(layout.GUEST_HOSTNAME + "\n")
        self.path("etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{layout.GUEST_HOSTNAME}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n")
        self.path("etc/fstab").write_text(
            f"UUID={self.root_uuid} / ext4 errors=remount-ro 0 1\n"
            f"LABEL={layout.DATA_LABEL} {layout.DATA_MOUNT} ext4 "
            "defaults,nofail,x-systemd.device-timeout=5s 0 2\n")
        self.path(layout.DATA_MOUNT).mkdir(exist_ok=True)
        pg = f"{layout.PG_CONF_DIR}"
        self.run(["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700",
                  layout.PG_WAL_ARCHIVE], chroot=True)
        self.run(["chown", "-R", "postgres:postgres", pg], chroot=True)
        self.run(["chmod", "0640", f"{pg}/pg_hba.conf", f"{pg}/pg_ident.conf"], chroot=True)
        self.run(["install", "-d", "-o", "mysql", "-g", "mysql", "-m", "0750",
                  layout.MY_BINLOG_DIR], chroot=True)
        self.run(["install", "-d", "-m", "0755", layout.FSFREEZE_HOOK_DIR], chroot=True)
        for rel in (layout.FSFREEZE_HOOK, "lib/udev/rules.d/60-qemu-guest-agent.rules",
                    "usr/lib/postgresql/15/bin/postgres", "usr/sbin/mariadbd"):
            if not self.path(rel).exists():
                raise _StepFailed(f"{rel} is missing in the image (a package changed?)")
        self.run(["systemctl", "enable", *recipe.ENABLE_UNITS], chroot=True)
        self.run(["systemctl", "mask", *recipe.MASK_UNITS], chroot=True)
        self.run(["systemctl", "set-default", "multi-user.target"], chroot=True)
        self.run(["install", "-d", "-m", "0755", "/run/sshd"], chroot=True)
        self.run(["sshd", "-t"], chroot=True)    # the config parses (host keys still here)

    def _install_files(self) -> None:
        values = {k: str(v) for k, v in vars(layout).items()
                  if k.isupper() and isinstance(v, (str, int))}
        for src in recipe.guest_files():
            rel = src.relative_to(recipe.FILES_DIR).as_posix()
            text = src.read_text()
            text = re.sub(r"@([A-Z][A-Z0-9_]*)@",
                          lambda m: values.get(m.group(1), m.group(0)), text)
            if left := re.findall(r"@[A-Z][A-Z0-9_]*@", text):
                raise _StepFailed(f"files/{rel}: unknown placeholders {sorted(set(left))}")
            dst = self.path(rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
            if rel.startswith("etc/sudoers.d/"):
                mode = 0o440
            elif os.access(src, os.X_OK):
                mode = 0o755
            else:
                mode = 0o644
            os.chown(dst, 0, 0)
            dst.chmod(mode)
            self.log.write(f"installed /{rel} ({mode:o})\n")

    def mariadb_accounts(self) -> None:
        sock = "/run/mysqld/build.sock"
        self.run(["install", "-d", "-o", "mysql", "-g", "mysql", "/run/mysqld"], chroot=True)
        argv = ["chroot", str(self.root), "/usr/sbin/mariadbd", "--user=mysql",
                "--skip-networking", "--skip-log-bin", f"--socket={sock}",
                "--pid-file=/run/mysqld/build.pid"]
        self.log.write(f"$ {' '.join(argv)} &\n")
        server = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                       "LANG": "C.UTF-8"})
        try:
            deadline = time.monotonic() + 120
            while self.run(["mariadb-admin", f"--socket={sock}", "--connect-timeout=2",
                            "ping"], chroot=True, check=False).returncode != 0:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise _StepFailed("mariadbd (started in the chroot) did not come up")
                time.sleep(0.5)
            self.run(["mariadb", f"--socket={sock}", "--batch"], chroot=True,
                     input=recipe.MARIADB_SQL)
            users = self.run(["mariadb", f"--socket={sock}", "--batch", "--skip-column-names",
                              "-e", "SELECT CONCAT(user, '@', host) FROM mysql.user"],
                             chroot=True).stdout.split()
            if f"{layout.MY_LAB_USER}@{layout.MY_LAB_HOST}" not in users:
                raise _StepFailed(f"the {layout.MY_LAB_USER} account is missing: {users}")
            self.run(["mariadb-admin", f"--socket={sock}", "shutdown"], chroot=True)
            server.wait(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    def clean(self) -> None:
        self.run(["umount", str(self.path("var/cache/apt/archives"))])
        for rel in ("usr/sbin/policy-rc.d", "etc/apt/apt.conf.d/90stillpoint-lab", _UNSAFE_IO):
            self.path(rel).unlink(missing_ok=True)
        for key in self.path("etc/ssh").glob("ssh_host_*"):
            key.unlink()                      # each VM makes its own at its first boot
        self.path("etc/machine-id").write_text("")   # empty: systemd makes one at first boot
        dbus_id = self.path("var/lib/dbus/machine-id")
        dbus_id.unlink(missing_ok=True)
        dbus_id.parent.mkdir(parents=True, exist_ok=True)
        dbus_id.symlink_to("/etc/machine-id")
        resolv = self.path("etc/resolv.conf")
        resolv.unlink(missing_ok=True)
        resolv.write_text("")
        self.run(["find", str(self.path("var/lib/apt/lists")), "-type", "f", "-delete"])
        self.run(["find", str(self.path("var/cache/apt")), "-name", "*.bin", "-delete"])
        self.run(["find", str(self.path("var/cache/apt/archives")), "-name", "*.deb",
                  "-delete"])
        self.run(["find", str(self.path("var/log")), "-type", "f", "-delete"])
        self.run(["find", str(self.path("var/cache/debconf")), "-name", "*-old", "-delete"])
        for rel in ("usr/share/doc", "usr/share/man", "usr/share/info"):
            # what debootstrap installed before dpkg's path-exclude (copyrights stay)
            self.run(["find", str(self.path(rel)), "-mindepth", "1", "!", "-name",
                      "copyright", "!", "-type", "d", "-delete"], check=False)
        for rel in ("var/tmp", "root"):
            for p in self.path(rel).iterdir():
                if p.name in (".bashrc", ".profile"):
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def kernel(self) -> None:
        kernels = sorted(self.path("boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise _StepFailed(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
        self.kernel_release = kernels[0].name.removeprefix("vmlinuz-")
        # again, with files/' initramfs-tools config (MODULES=list: a small initramfs)
        self.run(["update-initramfs", "-u", "-k", self.kernel_release], chroot=True,
                 timeout=600)
        if not self.path(f"boot/initrd.img-{self.kernel_release}").is_file():
            raise _StepFailed(f"no initrd for {self.kernel_release} in /boot")
        grub = self.path("boot/grub")
        (grub / "i386-pc").mkdir(parents=True, exist_ok=True)
        for mod in GRUB_DIR.iterdir():
            if mod.suffix in (".mod", ".lst"):
                shutil.copy2(mod, grub / "i386-pc" / mod.name)
        (grub / "grub.cfg").write_text(
            "# Stillpoint lab guest (written by stillpoint_lab.image.build)\n"
            "serial --unit=0 --speed=115200\n"
            "terminal_input serial console\n"
            "terminal_output serial console\n"
            "set timeout=0\n"
            "set default=0\n"
            f"search --no-floppy --fs-uuid --set=root {self.root_uuid}\n"
            "menuentry 'Debian GNU/Linux (Stillpoint lab guest)' {\n"
            f"    linux /boot/vmlinuz-{self.kernel_release} root=UUID={self.root_uuid} "
            f"{recipe.KERNEL_CMDLINE}\n"
            f"    initrd /boot/initrd.img-{self.kernel_release}\n"
            "}\n")
        core = self.work / "core.img"
        self.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p", recipe.GRUB_PREFIX,
                  *recipe.GRUB_MODULES])
        room = (recipe.PARTITION_START_SECTOR - 1) * 512
        if core.stat().st_size > room:
            raise _StepFailed(f"GRUB core.img is {core.stat().st_size} bytes, room for {room}")

    def unmount(self) -> None:
        for sub in ("dev", "proc", "sys", "run", "tmp"):
            self.run(["umount", "--recursive", str(self.path(sub))])
        self.run(["fstrim", str(self.root)])    # deleted files' blocks: holes in disk.raw
        self.run(["sync"])
        self.run(["umount", "--recursive", str(self.root)])
        self.mounted_root = False
        assert self.part and self.loop
        self.run(["e2fsck", "-f", "-n", self.part])
        self.detach()

    def detach(self) -> None:
        if self.mounted_root:
            if self.run(["umount", "--recursive", str(self.root)], check=False).returncode:
                self.run(["umount", "--recursive", "--lazy", str(self.root)], check=False)
            self.mounted_root = False
        if self.loop:
            self.run(["partx", "-d", self.loop], check=False)
            self.run(["losetup", "-d", self.loop], check=False)
            self.loop = None

    def bootloader(self) -> None:
        boot = (GRUB_DIR / "boot.img").read_bytes()
        core = (self.work / "core.img").read_bytes()
        with open(self.disk, "r+b") as f:
            f.seek(0)
            f.write(boot[:440])     # the MBR's code; its partition table stays
            f.seek(512)
            f.write(core)           # sector 1 on: where boot.img looks for it
            f.flush()
            os.fsync(f.fileno())
        (self.work / "core.img").unlink()

    def write_meta(self, seconds: float) -> None:
        st = self.disk.stat()
        meta = {"recipe_hash": self.recipe_hash, "kernel_release": self.kernel_release,
                "root_uuid": self.root_uuid, "size_bytes": st.st_size,
                "allocated_bytes": st.st_blocks * 512, "build_seconds": round(seconds, 1),
                "step_seconds": self.timings, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime()),
                "mirror": self.mirror, "recipe": recipe.recipe()}
        tmp = self.work / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.work / META_NAME)


def _inner_main(work: Path, mirror: str, recipe_hash: str) -> int:
    b = _Builder(work, mirror, recipe_hash)
    t0 = time.monotonic()
    try:
        with b.step("disk", f"sparse {layout.IMAGE_SIZE_BYTES >> 30} GiB raw, DOS label"):
            b.make_disk()
        with b.step("loop", "losetup + partx -a"):
            b.attach()
        with b.step("mkfs", "ext4"):
            b.mkfs()
        with b.step("mount", "the root file system"):
            b.mount()
        with b.step("debootstrap", f"{recipe.SUITE} {recipe.VARIANT} + the base packages"):
            b.debootstrap()
        with b.step("chroot", "proc, sys, dev, policy-rc.d (no service starts)"):
            b.chroot_setup()
        with b.step("packages", " ".join(recipe.CHROOT_PACKAGES)):
            b.packages()
        with b.step("configure", "files/, user, fstab, units"):
            b.configure()
        with b.step("mariadb", f"the {layout.MY_LAB_USER}@{layout.MY_LAB_HOST} account"):
            b.mariadb_accounts()
        with b.step("clean", "no host keys, empty machine-id, no caches"):
            b.clean()
        with b.step("kernel", "grub.cfg, GRUB core image"):
            b.kernel()
        with b.step("unmount", "fstrim, umount, fsck, detach"):
            b.unmount()
        with b.step("bootloader", "boot.img + core.img after the MBR"):
            b.bootloader()
        b.write_meta(time.monotonic() - t0)
        return 0
    except Exception:
        return 2
    finally:
        b.detach()
        b.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stillpoint_lab.image.build",
                                     description="Build (or find) the lab's guest image "
                                                 "and print its path.")
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--print-hash", action="store_true", help="print the recipe hash")
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mirror", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-hash", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return _inner_main(args.inner, args.mirror, args.recipe_hash)
    if args.print_hash:
        print(recipe.recipe_hash())
        return 0
    from appliance.errors import StillpointError

    try:
        image = ensure_guest_image(rebuild=args.rebuild)
    except StillpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    print(image.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
