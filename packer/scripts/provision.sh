#!/usr/bin/env bash
# Provision a Debian 12 system as the Stillpoint appliance.
#
# packer runs this in the VM it builds; CI runs the very same file in a fresh Debian 12
# root (tests/lab/test_packer.py). It must work in both: nothing here assumes a running
# systemd (units are enabled by symlink when systemctl cannot talk to it).
#
# Environment:
#   STILLPOINT_SRC    the Stillpoint source: a directory or a `git archive` .tar.gz (required).
#                     It is kept in /opt/stillpoint/src and installed from there, because the
#                     guest agent (agent_payload/) is found beside the `appliance` package.
#   STILLPOINT_FILES  directory with the unit files and stillpoint-setup (default: ../files
#                     next to this script)
#   REPO_DISK         block device for the repository (e.g. /dev/sdb); empty: none, the
#                     repository lives on the system disk
#   BUILD_USER        the installer's build user: its password is locked at the end
#   PIP_ARGS          extra pip arguments (e.g. "--no-index --find-links /wheelhouse" offline)
set -euo pipefail

log() { echo "provision: $*"; }

: "${STILLPOINT_SRC:?set STILLPOINT_SRC to the Stillpoint source (directory or .tar.gz)}"
here="$(cd "$(dirname "$0")" && pwd)"
files="${STILLPOINT_FILES:-$here/../files}"
REPO_DISK="${REPO_DISK:-}"
BUILD_USER="${BUILD_USER:-}"
PREFIX=/opt/stillpoint

export DEBIAN_FRONTEND=noninteractive

# --- system packages -----------------------------------------------------------------
log "installing system packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  python3 python3-venv ca-certificates openssh-server sudo netbase \
  nftables unattended-upgrades apt-listchanges \
  e2fsprogs util-linux open-vm-tools \
  python3-libnbd libnbd-bin nbdkit >/dev/null

# --- the service account and directories ---------------------------------------------
if ! getent passwd stillpoint >/dev/null; then
  useradd --system --home-dir /var/lib/stillpoint --shell /usr/sbin/nologin stillpoint
fi
install -d -m 0750 -o stillpoint -g stillpoint /var/lib/stillpoint /var/log/stillpoint
install -d -m 0750 -o root -g stillpoint /etc/stillpoint

# --- Stillpoint itself ---------------------------------------------------------------
log "installing Stillpoint into $PREFIX/venv"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  # Debian's site packages for python3-libnbd (libnbd's binding is not on PyPI).
  python3 -m venv --system-site-packages "$PREFIX/venv"
fi
rm -rf "$PREFIX/src.new"
mkdir -p "$PREFIX/src.new"
if [ -d "$STILLPOINT_SRC" ]; then
  cp -a "$STILLPOINT_SRC/." "$PREFIX/src.new/"
else
  tar -xzf "$STILLPOINT_SRC" -C "$PREFIX/src.new"
fi
for needed in pyproject.toml appliance agent_payload; do
  if [ ! -e "$PREFIX/src.new/$needed" ]; then
    echo "provision: $STILLPOINT_SRC has no $needed: not a Stillpoint source tree" >&2
    exit 1
  fi
done
rm -rf "$PREFIX/src.new/.venv" "$PREFIX/src.new/.git"
# The lab, its simulator, the tests and the benchmarks are test machinery: not shipped.
rm -rf "$PREFIX/src.new/stillpoint_lab" "$PREFIX/src.new/tests" "$PREFIX/src.new/bench"
sed -i '/^stillpoint-lab = /d' "$PREFIX/src.new/pyproject.toml"
rm -rf "$PREFIX/src" && mv "$PREFIX/src.new" "$PREFIX/src"
chown -R root:root "$PREFIX/src"
chmod -R go-w "$PREFIX/src"
# Editable: the code runs from $PREFIX/src, where agent_payload/ sits beside appliance/.
# shellcheck disable=SC2086 # PIP_ARGS is a list of words on purpose
"$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check ${PIP_ARGS:-} \
  -e "$PREFIX/src"
install -m 0755 "$files/stillpoint-wrapper" /usr/local/bin/stillpoint
install -D -m 0644 "$files/stillpoint.tmpfiles" /etc/tmpfiles.d/stillpoint.conf
install -m 0755 "$files/stillpoint-setup" /usr/local/sbin/stillpoint-setup
install -D -m 0644 "$files/stillpoint-serve.service" /etc/systemd/system/stillpoint-serve.service
install -m 0644 "$files/stillpoint-firstboot.service" \
  /etc/systemd/system/stillpoint-firstboot.service
if [ ! -f /etc/default/stillpoint ]; then
  install -m 0644 "$files/stillpoint.default" /etc/default/stillpoint
fi

enable_unit() {
  # systemctl enable works offline in a chroot on Debian 12; fall back to the symlink.
  if ! systemctl enable "$1" >/dev/null 2>&1; then
    ln -sf "/etc/systemd/system/$1" "/etc/systemd/system/multi-user.target.wants/$1"
  fi
}
mkdir -p /etc/systemd/system/multi-user.target.wants
enable_unit stillpoint-firstboot.service
enable_unit stillpoint-serve.service

# --- the repository disk -------------------------------------------------------------
install -d -m 0750 -o stillpoint -g stillpoint /var/lib/stillpoint/repository
if [ -n "$REPO_DISK" ]; then
  if [ ! -b "$REPO_DISK" ]; then
    echo "provision: REPO_DISK=$REPO_DISK is not a block device" >&2
    exit 1
  fi
  if ! blkid -o value -s TYPE "$REPO_DISK" >/dev/null 2>&1; then
    log "formatting $REPO_DISK as the repository disk"
    mkfs.ext4 -q -L stillpoint-repo -m 0 "$REPO_DISK"
  fi
  if ! grep -q 'LABEL=stillpoint-repo' /etc/fstab; then
    echo 'LABEL=stillpoint-repo /var/lib/stillpoint/repository ext4 defaults,nofail,noatime 0 2' \
      >>/etc/fstab
  fi
fi

# --- hardening -----------------------------------------------------------------------
log "hardening: SSH keys only, firewall, unattended security updates"
mkdir -p /etc/ssh/sshd_config.d
cat >/etc/ssh/sshd_config.d/50-stillpoint.conf <<'SSHD'
# Stillpoint appliance: keys only, no root login.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
X11Forwarding no
SSHD

cat >/etc/nftables.conf <<'NFT'
#!/usr/sbin/nft -f
# Stillpoint appliance: nothing listens but SSH. Outbound: vCenter/ESXi (443, 902), guests
# (22 SSH, 5986 WinRM over HTTPS), DNS, NTP, Debian updates.
flush ruleset
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    ct state invalid drop
    meta l4proto { icmp, ipv6-icmp } accept
    tcp dport 22 ct state new limit rate 10/minute accept
  }
  chain forward {
    type filter hook forward priority 0; policy drop;
  }
  chain output {
    type filter hook output priority 0; policy accept;
  }
}
NFT
chmod 0755 /etc/nftables.conf
enable_unit nftables.service

cat >/etc/apt/apt.conf.d/20auto-upgrades <<'APT'
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
APT::Periodic::AutocleanInterval "7";
APT
cat >/etc/apt/apt.conf.d/51stillpoint-unattended <<'APT'
// Security updates only; reboot (at 03:30, outside the usual backup window is the
// administrator's choice: change it here) when a kernel or libc update needs one.
Unattended-Upgrade::Origins-Pattern {
        "origin=Debian,codename=${distro_codename},label=Debian-Security";
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";
};
Unattended-Upgrade::Automatic-Reboot "true";
Unattended-Upgrade::Automatic-Reboot-Time "03:30";
APT

# The administrators' login: SSH key only (stillpoint-setup installs the key), sudo.
if ! getent passwd stillpoint-admin >/dev/null; then
  useradd --create-home --shell /bin/bash --groups sudo stillpoint-admin
fi
passwd -l stillpoint-admin >/dev/null
echo 'stillpoint-admin ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/50-stillpoint-admin
chmod 0440 /etc/sudoers.d/50-stillpoint-admin

if [ -n "$BUILD_USER" ] && getent passwd "$BUILD_USER" >/dev/null; then
  # Its sudo rule goes with packer's shutdown_command (this session still needs it).
  log "locking the build user's password"
  passwd -l "$BUILD_USER" >/dev/null
fi

log "done: $("$PREFIX/venv/bin/stillpoint" --version)"
