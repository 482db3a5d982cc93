"""The agent's boot hook on a systemd guest: the unit, and the database units ordered after it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent_payload" / "linux"))

from stillpoint_agent import config, lifecycle  # noqa: E402


def _cfg(sd: Path) -> dict:
    return config.effective({"boot": {"hook_dirs": [], "systemd_dir": str(sd)}})


def test_database_units_start_after_the_post_restore_unit(tmp_path: Path) -> None:
    """Debian's PostgreSQL is a template instance (postgresql@15-main): `Before=` in our
    unit does not order it, a drop-in on the template does (found on the QEMU lab)."""
    lifecycle.install_boot_hooks(_cfg(tmp_path), "/opt/stillpoint/agent")
    unit = (tmp_path / lifecycle.UNIT_NAME).read_text()
    assert "ExecStart=/opt/stillpoint/agent/stillpoint-agent boot" in unit
    for name in ("postgresql@.service", "mariadb.service", "mysql.service"):
        dropin = tmp_path / f"{name}.d" / lifecycle.DROPIN_NAME
        assert f"After={lifecycle.UNIT_NAME}" in dropin.read_text()
    assert (tmp_path / "multi-user.target.wants" / lifecycle.UNIT_NAME).is_symlink()


def test_removal_takes_the_dropins_and_leaves_other_configuration(tmp_path: Path) -> None:
    own = tmp_path / "mariadb.service.d" / "10-admin.conf"
    own.parent.mkdir()
    own.write_text("[Service]\nLimitNOFILE=65535\n")
    lifecycle.install_boot_hooks(_cfg(tmp_path), "/opt/stillpoint/agent")
    removed = lifecycle.remove_boot_hooks(_cfg(tmp_path))["removed"]
    assert str(tmp_path / "postgresql@.service.d" / lifecycle.DROPIN_NAME) in removed
    assert not (tmp_path / "postgresql@.service.d").exists()
    assert own.read_text().startswith("[Service]")              # the admin's drop-in stays
    assert not (tmp_path / lifecycle.UNIT_NAME).exists()
