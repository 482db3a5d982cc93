#!/usr/bin/env bash
# The lab build (source qemu.lab) only, after provision.sh: leave the disk as the lab's
# image is left, so that every VM made from it is its own machine at its first boot.
#
# - no SSH host keys (the image's stillpoint-lab-ssh-keygen.service makes them at the next
#   boot; the lab reads the public key through qemu-guest-agent, never from the network);
# - an empty machine-id (systemd makes one at the next boot);
# - an empty resolv.conf again (lab-prepare.sh set it for the build);
# - no package lists, caches, uploads or logs of the build;
# - the freed blocks trimmed: the raw disk file stays sparse (packer's disk_discard=unmap).
set -euo pipefail

log() { echo "lab-seal: $*"; }

rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /etc/resolv.conf
: >/etc/resolv.conf
apt-get clean
find /var/lib/apt/lists -type f -delete
rm -rf /tmp/stillpoint-source.tar.gz /tmp/stillpoint-files /tmp/stillpoint-wheelhouse \
  /root/.cache /var/tmp/*
find /var/log -type f -delete
sync
log "trimming: $(fstrim -v / 2>&1 || true)"
log "done: $(df -h --output=used,avail / | tail -1 | awk '{print $1 " used, " $2 " free"}') on /"
