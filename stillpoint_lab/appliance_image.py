"""The Stillpoint appliance as a lab disk: a real `packer build` of packer/stillpoint.pkr.hcl.

    ensure_appliance_image() -> ApplianceImage(path, repository_path, digest, ...)

The template's `qemu.lab` source boots a copy of the lab's Debian 12 guest disk
(`stillpoint_lab.image`) under QEMU on this machine and runs the provisioners the vSphere
build runs (the source tree uploaded, `packer/scripts/provision.sh`), between two lab-only
steps (`lab-prepare.sh`, `lab-seal.sh`). packer reaches the VM by SSH as the image's `splab`
user with a throwaway key that it hands over the way the lab hands every VM its key: the
fw_cfg file `opt/stillpoint/lab-identity` (`{"ip_cidr", "gateway", "authorized_keys"}`);
packer's user-mode network forwards SSH on 127.0.0.1, and the guest reaches Debian's mirror
and PyPI through slirp's NAT. The result is two flat raw disks, as the lab's datastore
wants them: the system disk and the repository disk (ext4, `LABEL=stillpoint-repo`).

Cache: `/var/cache/stillpoint-lab/appliance-image/<digest>/{system.raw, repository.raw,
image.json, build.log, serial.log}`. The digest covers packer/, appliance/, agent_payload/,
pyproject.toml (path, mode, bytes), this module and the guest image's recipe hash; not the
mirror's or PyPI's package versions. A build runs under a flock on `appliance-image/.lock`
in `.build-<digest>-<pid>/`, renamed only when complete. Never boot the cached disks
themselves: boot sparse copies (`cp --sparse=always`).

`python -m stillpoint_lab.appliance_image [--rebuild] [--print-digest]` builds (or finds) it
and prints the system disk's path. docs/appliance-image.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import LabError

REPO = Path(__file__).resolve().parents[1]
PACKER_DIR = REPO / "packer"
CACHE_ROOT = Path("/var/cache/stillpoint-lab")
IMAGE_CACHE = CACHE_ROOT / "appliance-image"
SYSTEM_NAME = "system.raw"
REPOSITORY_NAME = "repository.raw"
META_NAME = "image.json"
LOG_NAME = "build.log"
SERIAL_NAME = "serial.log"
KEEP_IMAGES = 2                      # this digest's image and the one before it
LOCK_WAIT_S = 90 * 60
BUILD_TIMEOUT_S = 90 * 60            # TCG: a cold build takes tens of minutes
SYSTEM_DISK_MIB = 4096               # the lab image's size: the appliance fits (≈2 GiB free)
REPOSITORY_DISK_MIB = 8192           # sparse; the lab may grow it
# What the appliance is made of (the digest); the source archive ships these and no more.
SOURCE_ITEMS = ("pyproject.toml", "appliance", "agent_payload")
HASHED_ITEMS = ("packer", *SOURCE_ITEMS)
_SKIP_PARTS = {"__pycache__", "packer_cache", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# packer's QEMU user network (slirp): the guest's address, gateway and DNS.
SLIRP_IP_CIDR = "10.0.2.15/24"
SLIRP_GATEWAY = "10.0.2.2"
# The vSphere source's variables have no defaults: packer wants them set for any build.
_PLACEHOLDER = "not-used-by-the-lab-build"   # distinctive: packer masks sensitive values in logs
_VSPHERE_PLACEHOLDERS = {name: _PLACEHOLDER for name in (
    "vcenter_server", "vcenter_username", "vcenter_password", "datacenter", "cluster",
    "datastore", "network", "iso_path", "build_password")}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ApplianceImage:
    """A built appliance image: never write to its files (boot sparse copies)."""

    path: Path              # the system disk: flat raw, boots with GRUB (BIOS), virtio disk
    repository_path: Path   # the repository disk (second virtio disk: /dev/vdb)
    digest: str             # 16 hex digits: the cache entry's name
    meta: dict[str, Any]    # image.json: times, sizes, packer and guest image versions


def _stderr_progress(line: str) -> None:
    print(f"appliance image: {line}", file=sys.stderr, flush=True)


# --- the digest ---------------------------------------------------------------------------

def _tree_files(root: Path, item: str) -> list[Path]:
    top = root / item
    if top.is_file():
        return [top]
    return sorted(p for p in top.rglob("*")
                  if p.is_file() and not _SKIP_PARTS.intersection(p.relative_to(root).parts)
                  and not p.name.endswith((".pyc", ".pyo"))
                  and not any(part.endswith(".egg-info") for part in p.parts)
                  and not (item == "packer" and p.relative_to(top).parts[0].startswith("output")))


def appliance_digest(root: Path = REPO, guest_recipe: str | None = None) -> str:
    """16 hex digits of a sha256 over the appliance's inputs (see the module docstring);
    `guest_recipe`: the guest image's recipe hash (default: the current recipe's)."""
    from stillpoint_lab.image import recipe

    h = hashlib.sha256()
    for item in HASHED_ITEMS:
        for path in _tree_files(root, item):
            rel = path.relative_to(root).as_posix()
            x = "x" if path.stat().st_mode & 0o111 else "-"
            h.update(f"\0file {rel} {x}\0".encode())
            h.update(path.read_bytes())
    h.update(b"\0module\0" + Path(__file__).read_bytes())
    h.update(b"\0guest-image " + (guest_recipe or recipe.recipe_hash()).encode())
    return h.hexdigest()[:16]


def cached_appliance_image(digest: str | None = None) -> ApplianceImage | None:
    """The cached image of these inputs (the current ones by default), if it is built."""
    d = digest or appliance_digest()
    entry = IMAGE_CACHE / d
    try:
        meta = json.loads((entry / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    system, repo = entry / SYSTEM_NAME, entry / REPOSITORY_NAME
    if not (system.is_file() and repo.is_file()):
        return None
    return ApplianceImage(path=system, repository_path=repo, digest=d, meta=meta)


def ensure_appliance_image(*, progress: Progress | None = None,
                           rebuild: bool = False) -> ApplianceImage:
    """The appliance image of the current tree: from the cache, or built now (TCG: tens of
    minutes; the guest image first if that is not cached either)."""
    say = progress or _stderr_progress
    if not rebuild and (hit := cached_appliance_image()):
        return hit
    if os.geteuid() != 0:
        raise LabError("building the appliance image needs root (packer, QEMU, the guest "
                       "image's loop devices)")
    _ensure_tools(say)
    from stillpoint_lab.image import ensure_guest_image

    base = ensure_guest_image(progress=lambda m: say(f"guest image: {m}"))
    # Named by the base actually used (its recipe may have changed since the lookup above).
    d = appliance_digest(guest_recipe=base.recipe_hash)
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with _build_lock(say):
        if rebuild:
            shutil.rmtree(IMAGE_CACHE / d, ignore_errors=True)
        elif hit := cached_appliance_image(d):   # built by another process while we waited
            return hit
        _remove_stale_builds(say)
        image = _build(d, base.path, base.recipe_hash, say)
        _prune_old_images(keep=d)
        return image


# --- tools --------------------------------------------------------------------------------

def _ensure_tools(say: Progress) -> None:
    """Debian's packer (1.6.6, with its QEMU builder) is installed if missing; QEMU must be
    there (scripts/install-deps.sh)."""
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "ssh-keygen")
               if shutil.which(t) is None]
    if missing:
        raise LabError(f"{', '.join(missing)} not installed: run scripts/install-deps.sh")
    if shutil.which("packer") is not None:
        return
    say("installing Debian's packer")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "packer"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        # A machine whose package lists were never fetched.
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode or shutil.which("packer") is None:
        raise LabError(f"could not install packer: {(done.stdout + done.stderr)[-2000:]}")


def _packer_version() -> str:
    out = subprocess.run(["packer", "version"], capture_output=True, text=True, check=False)
    return out.stdout.split("\n", 1)[0].strip()


# --- lock, stale builds, pruning (as stillpoint_lab.image.build does) ---------------------

@contextlib.contextmanager
def _build_lock(say: Progress) -> Iterator[None]:
    fd = os.open(IMAGE_CACHE / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another process is building the appliance image: waiting for it")
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LabError(f"waited {LOCK_WAIT_S} s for another build of the "
                                       f"appliance image ({IMAGE_CACHE}/.lock)") from None
                    time.sleep(2)
        yield
    finally:
        os.close(fd)


def _remove_stale_builds(say: Progress) -> None:
    for stale in IMAGE_CACHE.glob(".build-*"):
        say(f"removing an unfinished build: {stale.name}")
        shutil.rmtree(stale, ignore_errors=True)


def _prune_old_images(keep: str) -> None:
    entries = [p for p in IMAGE_CACHE.iterdir()
               if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name) and p.name != keep]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_IMAGES - 1:]:
        shutil.rmtree(old, ignore_errors=True)


# --- the build ----------------------------------------------------------------------------

def source_archive(dest: Path, root: Path = REPO) -> Path:
    """The source tree provision.sh installs: exactly the digest's SOURCE_ITEMS, as they are
    on disk (uncommitted changes included), owned by root, reproducible."""
    archive = dest / "stillpoint-source.tar.gz"

    def add(tar: tarfile.TarFile, path: Path) -> None:
        info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
        with open(path, "rb") as f:
            tar.addfile(info, f)

    with open(archive, "wb") as raw:
        import gzip

        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for item in SOURCE_ITEMS:
                for path in _tree_files(root, item):
                    add(tar, path)
    return archive


def write_identity(path: Path, public_key: str, *, ip_cidr: str = SLIRP_IP_CIDR,
                   gateway: str = SLIRP_GATEWAY, hostname: str | None = None) -> Path:
    """The fw_cfg file opt/stillpoint/lab-identity (0600: it is not secret, but QEMU's argv
    names only the file). Without a host name the VM keeps its own (/etc/hostname)."""
    doc = {"ip_cidr": ip_cidr, "gateway": gateway, "authorized_keys": public_key.strip()}
    if hostname:
        doc["hostname"] = hostname
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return path


def new_ssh_key(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair at path (private, 0600) and path.pub; returns the public key."""
    path.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def build_wheelhouse(dest: Path, root: Path = REPO) -> Path:
    """Wheels of Stillpoint's dependencies (and its build backend) fetched by this machine's
    pip (its trust store and proxies reach PyPI; the VM's do not): provision.sh installs
    offline from them (PIP_ARGS, the documented offline build). Binary wheels only, for this
    Python, which is the guest's (Debian 12: 3.11)."""
    import tomllib

    if sys.version_info[:2] != (3, 11):
        raise LabError(f"the wheelhouse is fetched for this Python ({sys.version.split()[0]}),"
                       " which must be the guest's (Debian 12: 3.11)")
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    house = dest / "wheelhouse"
    house.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                           "--disable-pip-version-check", "--only-binary=:all:", "-d",
                           str(house), "setuptools>=64", "wheel", *deps],
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode:
        raise LabError(f"pip download of the appliance's dependencies failed:\n"
                       f"{(done.stdout + done.stderr)[-3000:]}")
    return house


def _hcl_string(value: str) -> str:
    text = json.dumps(value)          # HCL strings take JSON's escapes; ${ and %{ are not
    return text.replace("${", "$${").replace("%{", "%%{")


def _write_var_file(path: Path, values: dict[str, str | int]) -> None:
    lines = ["# Written by stillpoint_lab/appliance_image.py for `packer build -only=qemu.lab`;",
             "# the vCenter variables are placeholders (packer wants every variable set)."]
    for key, value in values.items():
        lines.append(f"{key} = {value if isinstance(value, int) else _hcl_string(value)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def _accel() -> tuple[str, str]:
    """(-accel value, -cpu value) for this machine: stillpoint_lab/qemu/accel.py decides."""
    from stillpoint_lab.qemu.accel import accel_argv

    argv = accel_argv()
    return argv[argv.index("-accel") + 1], argv[argv.index("-cpu") + 1]


def _die_with_parent() -> None:
    os.setsid()    # its own process group: packer and its QEMU are stopped together
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG: packer cleans up (stops QEMU) on TERM


# packer's UI lines worth a progress line: its steps, and the scripts' own log lines.
_STEP_RE = re.compile(r"==> qemu\.lab: (.*)")
_SCRIPT_RE = re.compile(r"qemu\.lab: ((?:provision|lab-prepare|lab-seal): .*)")
_QUIET_STEPS = ("Provisioning with shell script", "Uploading ", "Connected to SSH",
                "Waiting for SSH", "Starting VM", "Copying hard drive", "Resizing hard drive",
                "Gracefully halting", "Creating required virtual machine disks")


def _progress_line(line: str) -> str | None:
    line = re.sub(r"^\d{4}-\d\d-\d\dT[\d:]+Z: ", "", line)
    if m := _SCRIPT_RE.search(line):
        return m.group(1)
    if m := _STEP_RE.search(line):
        text = m.group(1)
        if text.startswith(_QUIET_STEPS):
            return text.split(": ")[0].split(" => ")[0]
    return None


def _build(digest: str, base_image: Path, base_hash: str, say: Progress) -> ApplianceImage:
    work = IMAGE_CACHE / f".build-{digest}-{os.getpid()}"
    work.mkdir()
    (work / "tmp").mkdir()
    log_path = work / LOG_NAME
    started = time.monotonic()
    try:
        key = work / "build-key"
        public = new_ssh_key(key, f"stillpoint-appliance-build-{digest}")
        identity = write_identity(work / "lab-identity.json", public)
        # A name without ".raw": packer then copies with `qemu-img convert` (sparse), not
        # byte by byte (it copies in full when the extension matches `format`).
        base_link = work / "lab-base.img"
        base_link.symlink_to(base_image)
        source = source_archive(work)
        say("fetching the wheels of Stillpoint's dependencies")
        wheelhouse = build_wheelhouse(work)
        accel, cpu = _accel()
        out_dir = work / "output"
        values: dict[str, str | int] = {
            **_VSPHERE_PLACEHOLDERS,
            "stillpoint_source": str(source),
            "lab_base_image": str(base_link),
            "lab_identity_file": str(identity),
            "lab_ssh_private_key_file": str(key),
            "lab_accel": accel,
            "lab_cpu": cpu,
            "lab_output_directory": str(out_dir),
            "lab_serial_log": str(work / SERIAL_NAME),
            "lab_wheelhouse": str(wheelhouse),
            "lab_system_disk_mib": SYSTEM_DISK_MIB,
            "lab_repository_disk_mib": REPOSITORY_DISK_MIB,
        }
        var_file = work / "lab.pkrvars.hcl"
        _write_var_file(var_file, values)
        say(f"packer build -only=qemu.lab ({accel}, {SYSTEM_DISK_MIB} MiB system disk; "
            f"log: {log_path})")
        timings = _run_packer(["packer", "build", "-only=qemu.lab", "-color=false",
                               "-timestamp-ui", f"-var-file={var_file}", str(PACKER_DIR)],
                              work, log_path, say)
        system, repo = out_dir / "stillpoint-appliance", out_dir / "stillpoint-appliance-1"
        for disk in (system, repo):
            if not disk.is_file():
                raise LabError(f"packer succeeded but left no {disk}; log: {log_path}\n"
                               f"{_tail(log_path)}")
        os.rename(system, work / SYSTEM_NAME)
        os.rename(repo, work / REPOSITORY_NAME)
        out_dir.rmdir()
        for leftover in (key, key.with_suffix(".pub"), base_link, source):
            leftover.unlink(missing_ok=True)   # the key opened nothing that outlives the build
        shutil.rmtree(wheelhouse, ignore_errors=True)
        shutil.rmtree(work / "tmp", ignore_errors=True)
        shutil.rmtree(work / "packer_cache", ignore_errors=True)
        seconds = time.monotonic() - started
        meta = _meta(work, digest, base_image, base_hash, accel, seconds, timings)
        (work / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        os.sync()
        os.rename(work, IMAGE_CACHE / digest)
        for stale in ("last-failed-build.log", "last-failed-serial.log"):
            (IMAGE_CACHE / stale).unlink(missing_ok=True)
    except BaseException:
        failed_log = IMAGE_CACHE / "last-failed-build.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(log_path, failed_log)
        with contextlib.suppress(OSError):
            shutil.copyfile(work / SERIAL_NAME, IMAGE_CACHE / "last-failed-serial.log")
        shutil.rmtree(work, ignore_errors=True)
        raise
    image = cached_appliance_image(digest)
    if image is None:
        raise LabError(f"the appliance image built in {IMAGE_CACHE / digest} is not readable")
    say(f"built in {seconds:.0f} s: {image.path} ({meta['system_allocated_bytes'] >> 20} MiB "
        f"allocated; provisioning {timings.get('provision_s', 0):.0f} s)")
    return image


def _run_packer(argv: list[str], work: Path, log_path: Path, say: Progress) -> dict[str, float]:
    """Runs packer, its output into the log, progress lines to `say`; phase times (s)."""
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CACHE_DIR": str(work / "packer_cache"),
           "TMPDIR": str(work / "tmp"), "PACKER_NO_COLOR": "1"}
    env.pop("PACKER_LOG", None)
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    with open(log_path, "w", buffering=1) as log:
        log.write("$ " + " ".join(argv) + "\n")
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                errors="replace", preexec_fn=_die_with_parent)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                now = time.monotonic() - t0
                if "Connected to SSH" in line:
                    marks.setdefault("ssh_s", now)
                elif "lab-prepare: done" in line:
                    marks.setdefault("prepare_done_s", now)
                elif "provision: done" in line:
                    marks.setdefault("provision_done_s", now)
                elif "Gracefully halting" in line:
                    marks.setdefault("halt_s", now)
                if (text := _progress_line(line.rstrip())) is not None:
                    say(text)
                if now > BUILD_TIMEOUT_S:
                    log.write(f"\n!!! timed out after {BUILD_TIMEOUT_S} s\n")
                    _stop(proc)
                    break
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                _stop(proc)
    marks["total_s"] = time.monotonic() - t0
    if rc != 0:
        raise LabError(f"packer build of the appliance image failed (exit {rc}); "
                       f"last lines of {log_path} (kept as {IMAGE_CACHE}/last-failed-build.log;"
                       f" the VM's console: last-failed-serial.log):\n{_tail(log_path)}")
    timings = {k: round(v, 1) for k, v in marks.items()}
    if "prepare_done_s" in marks and "provision_done_s" in marks:
        timings["provision_s"] = round(marks["provision_done_s"] - marks["prepare_done_s"], 1)
    return timings


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGINT (packer stops QEMU and removes its output), then the whole group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _meta(work: Path, digest: str, base_image: Path, base_hash: str, accel: str,
          seconds: float, timings: dict[str, float]) -> dict[str, Any]:
    system, repo = work / SYSTEM_NAME, work / REPOSITORY_NAME
    return {
        "digest": digest, "guest_image": str(base_image), "guest_image_recipe": base_hash,
        "packer": _packer_version(), "accel": accel,
        "system_size_bytes": system.stat().st_size,
        "system_allocated_bytes": system.stat().st_blocks * 512,
        "repository_size_bytes": repo.stat().st_size,
        "repository_allocated_bytes": repo.stat().st_blocks * 512,
        "build_seconds": round(seconds, 1), "phase_seconds": timings,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": list(HASHED_ITEMS),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stillpoint_lab.appliance_image",
                                     description="Build (or find) the appliance's lab disk "
                                                 "image and print its system disk's path.")
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--print-digest", action="store_true", help="print the inputs' digest")
    args = parser.parse_args(argv)
    if args.print_digest:
        print(appliance_digest())
        return 0
    try:
        image = ensure_appliance_image(rebuild=args.rebuild)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(image.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
