"""Pure parts of file restore and verification: the guest's fstab (which disk holds a path)
and mariadb-check's report (which tables are not OK)."""

from __future__ import annotations

from appliance.jobs.guest_tree import _wanted, mounts_on_path, parse_fstab
from appliance.jobs.verify import _table_ok, parse_mariadb_check

FSTAB = """# /etc/fstab: static file system information.
UUID=9d0f4dcb-477d-4dd7-a31b-6879ae3aad61 / ext4 errors=remount-ro 0 1
LABEL=spdata /data ext4 defaults,nofail,x-systemd.device-timeout=5s 0 2
/dev/vdc1 /data/db xfs defaults 0 2
/dev/mapper/vg-var /var ext4 defaults 0 2
tmpfs /tmp tmpfs defaults 0 0
/swapfile none swap sw 0 0
"""


def test_fstab_mounts_on_the_way_to_a_path_outermost_first() -> None:
    entries = parse_fstab(FSTAB)
    assert [e.mount_point for e in mounts_on_path(entries, "/data/db/x")] == ["/data", "/data/db"]
    assert [e.mount_point for e in mounts_on_path(entries, "/data")] == ["/data"]
    assert mounts_on_path(entries, "/database") == []          # a prefix, not a parent
    assert mounts_on_path(entries, "/tmp/x") == []             # tmpfs: not on a disk
    assert mounts_on_path(entries, "/etc/fstab") == []         # the root itself


def test_fstab_sources() -> None:
    assert _wanted("LABEL=spdata") == ("LABEL", "spdata")
    assert _wanted('UUID="ab-cd"') == ("UUID", "ab-cd")
    assert _wanted("/dev/disk/by-uuid/ab-cd") == ("UUID", "ab-cd")
    assert _wanted("/dev/vdb") == (1, 0)
    assert _wanted("/dev/sda2") == (0, 2)
    assert _wanted("/dev/xvdc1") == (2, 1)
    assert _wanted("/dev/nvme0n2p1") == (1, 1)
    assert _wanted("/dev/mapper/vg-var") is None
    assert _wanted("server:/export") is None


CHECK_OUTPUT = """mysql.column_stats                                 OK
mysql.general_log
note     : The storage engine for the table doesn't support check
splab.txlog
warning  : 1 client is using or hasn't closed the table properly
status   : OK
verify_probe.myisam_probe
error    : Record-count is not ok; is      19917   Should be: 20000
warning  : Found         83 deleted blocks       Should be: 0
error    : Corrupt
splab.accounts                                     OK
"""


def test_mariadb_check_report_per_table() -> None:
    tables = parse_mariadb_check(CHECK_OUTPUT)
    assert set(tables) == {"mysql.column_stats", "mysql.general_log", "splab.txlog",
                           "verify_probe.myisam_probe", "splab.accounts"}
    ok = {t for t, m in tables.items() if _table_ok(m)}
    assert ok == {"mysql.column_stats", "mysql.general_log", "splab.txlog", "splab.accounts"}
    assert ("error", "Corrupt") in tables["verify_probe.myisam_probe"]
