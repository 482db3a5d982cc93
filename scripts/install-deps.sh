#!/usr/bin/env bash
# Installs what Stillpoint, its lab and its tests need: Debian packages and a venv.
# Idempotent and quiet; safe to run on every `make test` / `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  golang-go golang-github-vmware-govmomi-dev   # the vCenter simulator of the lab
  postgresql-15 mariadb-server                  # the guests' applications
  openssh-server sudo iproute2 util-linux e2fsprogs xfsprogs   # the guests themselves
  qemu-system-x86 qemu-utils                    # the lab's hypervisor (docs/lab-hypervisor.md)
  debootstrap grub-pc-bin fdisk                 # the guest image, built from Debian's packages
  packer                                        # the appliance image (make appliance-test)
  nbdkit libnbd-bin python3-libnbd              # the nbd transport
  python3-venv python3-pip curl restic borgbackup   # curl, restic, borg: bench/
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the servers it installs; the lab runs its own instances inside guests.
for svc in postgresql mariadb ssh; do
  (command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null && systemctl stop "$svc") || true
done

# Debian's python3 with its site packages, for python3-libnbd (libnbd's binding is not on PyPI).
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.stillpoint-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench,lint]' >.venv/pip.log 2>&1 \
    || { cat .venv/pip.log; exit 1; }
  touch "$stamp"
fi
