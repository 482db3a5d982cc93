#!/usr/bin/env bash
# The lab build (source qemu.lab) only, before provision.sh: the lab's Debian 12 guest disk
# (stillpoint_lab.image) becomes the base of the appliance. The vSphere build starts from
# the netinst installer instead and needs none of this.
#
# - DNS for the build: slirp's resolver (the lab image has an empty resolv.conf, and
#   lab-seal.sh empties it again: in the lab, addresses are IPs);
# - the root file system fills the system disk (packer's disk_size may exceed the image);
# - the second disk is the appliance's repository disk (provision.sh formats it as
#   LABEL=stillpoint-repo), not a lab guest's /data disk: the image's data-disk unit goes;
# - the lab guest's databases (PostgreSQL, MariaDB and its passwordless lab account) go;
# - the image's vmware-rpctool (guestinfo.* from QEMU fw_cfg: how the lab's hypervisor hands
#   a VM its guestinfo) stays: open-vm-tools' binary, which provision.sh installs, is
#   diverted beside it, so stillpoint-setup --from-guestinfo reads the lab's values;
# - stillpoint-firstboot's After=network-online.target means something again;
# - the host name is the appliance's.
#
# Environment: LAB_DNS (default 10.0.2.3, QEMU user networking's DNS).
set -euo pipefail

log() { echo "lab-prepare: $*"; }
export DEBIAN_FRONTEND=noninteractive
LAB_DNS="${LAB_DNS:-10.0.2.3}"

log "DNS for the build: $LAB_DNS"
rm -f /etc/resolv.conf
echo "nameserver $LAB_DNS" >/etc/resolv.conf

# --- the root file system fills the disk ------------------------------------------------
root_dev="$(findmnt -n -o SOURCE /)"
root_name="$(basename "$root_dev")"
disk_name="$(lsblk -n -d -o PKNAME "$root_dev")"
part_no="$(cat "/sys/class/block/$root_name/partition")"
part_end=$(($(cat "/sys/class/block/$root_name/start") + $(cat "/sys/class/block/$root_name/size")))
disk_sectors="$(cat "/sys/class/block/$disk_name/size")"
if [ $((disk_sectors - part_end)) -gt 2048 ]; then
  log "growing $root_dev to the end of /dev/$disk_name ($((disk_sectors / 2048)) MiB)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends cloud-guest-utils >/dev/null
  growpart "/dev/$disk_name" "$part_no"
  resize2fs "$root_dev"
fi

# --- the second disk is the repository disk ---------------------------------------------
# The image's data-disk unit formats an empty second disk at boot (off the boot path: it
# may still run now) and starts its mount. Let it finish, stop the mount, remove both.
unit=stillpoint-lab-data-disk.service
data_line='^LABEL=spdata[[:space:]]'
if [ -e "/etc/systemd/system/$unit" ]; then
  log "the second disk is the repository disk: removing the lab guest's $unit"
  systemctl start "$unit" >/dev/null 2>&1 || true # waits for a run in progress
  systemctl disable "$unit" >/dev/null 2>&1 || true
  rm -f "/etc/systemd/system/$unit" /usr/lib/stillpoint-lab/data-disk
fi
if grep -q "$data_line" /etc/fstab; then
  mount_point="$(grep "$data_line" /etc/fstab | awk '{print $2}')"
  systemctl stop "$(systemd-escape -p --suffix=mount "$mount_point")" 2>/dev/null || true
  if mountpoint -q "$mount_point"; then
    umount "$mount_point"
  fi
  sed -i "\\|$data_line|d" /etc/fstab
  rmdir "$mount_point" 2>/dev/null || true
fi
systemctl daemon-reload
if [ -b /dev/vdb ]; then
  # Formatted by the data-disk unit at this boot: provision.sh formats only an empty disk.
  wipefs -a -q /dev/vdb
fi

# --- no guest databases -----------------------------------------------------------------
installed=()
for pkg in postgresql-15 mariadb-server; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    installed+=("$pkg")
  fi
done
if [ ${#installed[@]} -gt 0 ]; then
  log "removing the lab guest's databases: ${installed[*]}"
  systemctl stop postgresql.service mariadb.service 2>/dev/null || true
  apt-get purge -y -qq --auto-remove "${installed[@]}" >/dev/null
fi
rm -rf /etc/postgresql /var/lib/postgresql /var/log/postgresql \
  /etc/mysql /var/lib/mysql /var/lib/mysql-binlog /var/log/mysql

# --- guestinfo through the lab's vmware-rpctool -----------------------------------------
rpctool=/usr/bin/vmware-rpctool
if [ -e "$rpctool" ] && ! dpkg -S "$rpctool" >/dev/null 2>&1 \
  && ! dpkg-divert --list "$rpctool" | grep -q .; then
  log "keeping the lab's $rpctool (open-vm-tools' goes to $rpctool.open-vm-tools)"
  dpkg-divert --local --no-rename --divert "$rpctool.open-vm-tools" --add "$rpctool" >/dev/null
fi

# --- first boot waits for the network --------------------------------------------------
# stillpoint-firstboot.service logs in to vCenter After=network-online.target; the lab
# image masks systemd-networkd-wait-online (boot time), which leaves that target empty. The
# appliance waits for its link, at most 30 s (a disk booted without the lab's identity
# has no configured link).
wait_online=systemd-networkd-wait-online.service
if [ "$(systemctl is-enabled "$wait_online" 2>/dev/null || true)" = masked ]; then
  log "first boot waits for the network: unmasking $wait_online"
  systemctl unmask "$wait_online" >/dev/null
  mkdir -p "/etc/systemd/system/$wait_online.d"
  cat >"/etc/systemd/system/$wait_online.d/stillpoint.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
UNIT
  systemctl enable "$wait_online" >/dev/null 2>&1
fi

# --- the appliance's host name ----------------------------------------------------------
sed -i 's/^127\.0\.1\.1[[:space:]].*/127.0.1.1\tstillpoint/' /etc/hosts
echo stillpoint >/etc/hostname
hostname stillpoint

log "done"
