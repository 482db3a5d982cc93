"""Where things are inside the lab's guest image: the contract between the image and the lab.

The lab (hostd, the tests, the appliance's lab profile) addresses a guest by these names;
the image's own files (`files/`) use them too: the builder replaces `@NAME@` in every text
file it installs by the value of NAME here, so there is one place to change a path.

    fw_cfg (QEMU: -fw_cfg name=NAME,file=...; guest: /sys/firmware/qemu_fw_cfg/by_name/NAME/raw)
      FW_CFG_IDENTITY   {"ip_cidr": "10.77.1.10/24", "gateway": "10.77.1.1",
                         "authorized_keys": "ssh-ed25519 ...", "hostname": "optional"}
      FW_CFG_GUESTINFO  {"guestinfo.x": "value", ...}   (vmware-rpctool "info-get guestinfo.x")
    serial (ttyS0), once per boot, after multi-user.target:
      BOOT_BANNER kernel=<uname -r> machine-id=<32 hex>
"""

from __future__ import annotations

# --- the hypervisor's channels into the guest ---
FW_CFG_IDENTITY = "opt/stillpoint/lab-identity"
FW_CFG_GUESTINFO = "opt/stillpoint/guestinfo"
FW_CFG_SYSFS = "/sys/firmware/qemu_fw_cfg/by_name"
QGA_PORT_NAME = "org.qemu.guest_agent.0"      # virtserialport name= of qemu-guest-agent
BOOT_BANNER = "STILLPOINT-LAB-BOOTED"
SERIAL_TTY = "/dev/ttyS0"

# --- identity: what the early unit makes from FW_CFG_IDENTITY (all under /run) ---
RUN_DIR = "/run/stillpoint-lab"
AUTHORIZED_KEYS_DIR = f"{RUN_DIR}/authorized_keys"   # <dir>/<user>, 0644 root
NETWORK_FILE = "/run/systemd/network/10-lab.network"
LAB_NETWORK = "10.77.0.0/16"    # trusted by PostgreSQL, MariaDB's lab@10.77.% account

# --- users ---
SSH_USER = "splab"               # the lab's SSH user; passwordless sudo
GUEST_HOSTNAME = "splab-guest"   # until the identity names another
SSH_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"   # the only one; made at a VM's first boot
SSH_HOST_KEY_PUB = f"{SSH_HOST_KEY}.pub"          # the lab reads it via qga

# --- quiescing (VMware Tools' pre-freeze / post-thaw scripts) ---
FSFREEZE_HOOK = "/etc/qemu/fsfreeze-hook"
FSFREEZE_HOOK_DIR = "/etc/qemu/fsfreeze-hook.d"
FSFREEZE_HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
# MariaDB's hook (files/etc/qemu/fsfreeze-hook.d/40-mariadb-flush) holds its lock session here
MY_FLUSH_HOOK_STATE = "/run/stillpoint-lab-mariadb-flush"

# --- PostgreSQL 15 (Debian's cluster 15/main) ---
PG_VERSION = "15"
PG_CLUSTER = "main"
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_CONF_DIR = "/etc/postgresql/15/main"
PGDATA = "/var/lib/postgresql/15/main"
PG_WAL_ARCHIVE = "/var/lib/postgresql/wal-archive"
PG_SOCKET_DIR = "/run/postgresql"
PG_PORT = 5432
PG_UNIT = "postgresql@15-main.service"

# --- MariaDB ---
MY_DATADIR = "/var/lib/mysql"
MY_BINLOG_DIR = "/var/lib/mysql-binlog"
MY_BINLOG_BASENAME = f"{MY_BINLOG_DIR}/mysql-bin"
MY_SOCKET = "/run/mysqld/mysqld.sock"
MY_PORT = 3306
MY_LAB_USER = "lab"              # 'lab'@'10.77.%', ALL PRIVILEGES, no password
MY_LAB_HOST = "10.77.%"
MY_UNIT = "mariadb.service"

# --- the optional second disk ---
DATA_DEVICE = "/dev/vdb"
DATA_LABEL = "spdata"
DATA_MOUNT = "/data"

# --- the image itself ---
IMAGE_SIZE_BYTES = 4 * 1024**3
ROOT_LABEL = "splab-root"
