"""The guest image's recipe: what goes into it, and the hash that names its cache entry.

The hash covers this recipe, every file under `files/` (path, mode, bytes) and the builder's
source (`build.py`, `layout.py`, this file): change any of them and the next
`ensure_guest_image()` builds a new image beside the old one. It does not cover the
mirror's package versions (a rebuild of the same recipe may get newer packages).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stillpoint_lab.image import layout

SUITE = "bookworm"
ARCH = "amd64"
VARIANT = "minbase"

# debootstrap --include (Depends only: debootstrap never installs Recommends)
BASE_PACKAGES = (
    "linux-image-cloud-amd64", "systemd-sysv", "udev", "dbus", "kmod", "openssh-server",
    "sudo", "qemu-guest-agent", "python3", "iproute2", "procps", "dmidecode", "e2fsprogs",
    "util-linux",
)
# apt-get install --no-install-recommends in the chroot, services kept from starting
# (policy-rc.d exits 101)
CHROOT_PACKAGES = ("postgresql-15", "mariadb-server")

ENABLE_UNITS = (
    "systemd-networkd.service",
    "stillpoint-lab-identity.service",
    "stillpoint-lab-ssh-keygen.service",
    "stillpoint-lab-boot-banner.service",
    "stillpoint-lab-data-disk.service",
    "ssh.service",
    "postgresql.service",
    "mariadb.service",
)
# Small and fast to boot: no timers that wake up to do maintenance, no waiting for a network.
MASK_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service",
    "apt-daily-upgrade.service", "man-db.timer", "man-db.service", "e2scrub_all.timer",
    "e2scrub_all.service", "e2scrub_reap.service", "fstrim.timer", "dpkg-db-backup.timer",
    "systemd-networkd-wait-online.service", "systemd-timesyncd.service",
    "getty@tty1.service",
    # every process costs about a second at boot under TCG: none for what nothing here uses
    "modprobe@drm.service", "modprobe@efi_pstore.service", "modprobe@fuse.service",
    "modprobe@dm_mod.service", "systemd-pstore.service", "sys-fs-fuse-connections.mount",
    "systemd-journal-flush.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-logind.service",   # no libpam-systemd: nothing logs in through it
)

# MariaDB accounts, made at build time (mariadbd started in the chroot, no networking).
# root keeps Debian's unix_socket authentication.
MARIADB_SQL = (
    f"CREATE USER IF NOT EXISTS '{layout.MY_LAB_USER}'@'{layout.MY_LAB_HOST}';\n"
    f"GRANT ALL PRIVILEGES ON *.* TO '{layout.MY_LAB_USER}'@'{layout.MY_LAB_HOST}';\n"
    "FLUSH PRIVILEGES;\n"
)

# dpkg leaves these out of the packages installed in the chroot (debootstrap's are cleaned)
DPKG_EXCLUDES = """\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""
# apt in the chroot during the build only (the host's mirror may serve an archived suite)
APT_CONF = """\
Acquire::Check-Valid-Until "false";
Acquire::Languages "none";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
"""

KERNEL_CMDLINE = "ro console=tty0 console=ttyS0,115200n8 net.ifnames=1 systemd.show_status=auto"
# GRUB core image (i386-pc, embedded after the MBR): what it needs to find and read /boot
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "search", "search_fs_uuid", "normal",
                "linux", "serial", "terminal", "echo", "test", "configfile", "gzio")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"

PARTITION_START_SECTOR = 2048    # 1 MiB: room for GRUB's core.img after the MBR
MKFS_FEATURES = "^orphan_file,^metadata_csum_seed"   # readable by older e2fsprogs too

_PACKAGE_DIR = Path(__file__).resolve().parent
FILES_DIR = _PACKAGE_DIR / "files"
_HASHED_SOURCES = ("recipe.py", "build.py", "layout.py")


def recipe() -> dict[str, object]:
    """The recipe as data (part of the hash, and written beside the image)."""
    return {
        "suite": SUITE, "arch": ARCH, "variant": VARIANT,
        "base_packages": list(BASE_PACKAGES), "chroot_packages": list(CHROOT_PACKAGES),
        "enable_units": list(ENABLE_UNITS), "mask_units": list(MASK_UNITS),
        "mariadb_sql": MARIADB_SQL, "dpkg_excludes": DPKG_EXCLUDES, "apt_conf": APT_CONF, "kernel_cmdline": KERNEL_CMDLINE,
        "grub_modules": list(GRUB_MODULES), "grub_prefix": GRUB_PREFIX,
        "size_bytes": layout.IMAGE_SIZE_BYTES, "partition_start": PARTITION_START_SECTOR,
        "mkfs_features": MKFS_FEATURES,
    }


def guest_files() -> list[Path]:
    """Every file under files/, sorted (what the builder installs into the image)."""
    return sorted(p for p in FILES_DIR.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def recipe_hash() -> str:
    """16 hex digits of a sha256 over the recipe, files/ and the builder's source."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe(), sort_keys=True).encode())
    for path in guest_files():
        rel = path.relative_to(FILES_DIR).as_posix()
        mode = path.stat().st_mode & 0o111
        h.update(f"\0file {rel} {'x' if mode else '-'}\0".encode())
        h.update(path.read_bytes())
    for name in _HASHED_SOURCES:
        h.update(f"\0source {name}\0".encode())
        h.update((_PACKAGE_DIR / name).read_bytes())
    return h.hexdigest()[:16]
