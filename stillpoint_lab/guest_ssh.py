"""SSH access to lab guests: the `splab` user, its sudo rule, keys, and each guest's sshd.

Per lab: a client key pair (the appliance's key) and an authorized_keys file in
`<state_dir>/ssh/`, and a sudoers rule `/etc/sudoers.d/stillpoint-lab<id>`.
Per guest: an ed25519 host key and an sshd config in the guest's state dir; sshd listens on
the guest's address only and accepts keys only. Clients get the host key line and its
SHA256 fingerprint to verify against.

The user is shared by all labs on the host; we mark it as ours in its GECOS field and
remove it when the last lab goes down.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import LabError
from stillpoint_lab.config import LabConfig
from stillpoint_lab.guest_ns import sh

SSH_USER = "splab"
_OUR_GECOS = "Stillpoint lab user (created by stillpoint)"
SUDOERS_DIR = Path("/etc/sudoers.d")


def sudoers_file(cfg: LabConfig) -> Path:
    return SUDOERS_DIR / f"stillpoint-lab{cfg.lab_id}"


def ssh_dir(cfg: LabConfig) -> Path:
    return cfg.state_dir / "ssh"


def client_key_path(cfg: LabConfig) -> Path:
    return ssh_dir(cfg) / "client_ed25519"


@dataclass(frozen=True)
class HostKey:
    public: str          # "ssh-ed25519 AAAA..."
    sha256: str          # "SHA256:..."


def ensure_user_and_keys(cfg: LabConfig) -> None:
    """The lab user, its passwordless sudo rule and the lab's client key (idempotent)."""
    if not _user_exists():
        made = sh(["useradd", "--create-home", "--shell", "/bin/bash", "--comment",
                   _OUR_GECOS, SSH_USER], check=False)
        if made.returncode != 0 and not _user_exists():   # not another lab's doing
            raise LabError(f"useradd {SSH_USER} failed: {made.stderr.strip()}")
    # '*' rather than useradd's '!': no password can match, yet sshd does not treat the
    # account as locked for key logins.
    sh(["usermod", "--password", "*", SSH_USER])
    rule = sudoers_file(cfg)
    if not rule.exists():
        tmp = rule.with_name(f".{rule.name}.tmp")
        tmp.write_text(f"# Stillpoint lab {cfg.lab_id}\n{SSH_USER} ALL=(ALL) NOPASSWD: ALL\n")
        tmp.chmod(0o440)
        sh(["visudo", "-c", "-q", "-f", str(tmp)])
        tmp.rename(rule)
    # sshd reads authorized_keys as the user: the dir and that file must be readable by it
    # (the private key itself is 0600).
    ssh_dir(cfg).mkdir(parents=True, exist_ok=True)
    ssh_dir(cfg).chmod(0o755)
    key = client_key_path(cfg)
    if not key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
            f"stillpoint-lab{cfg.lab_id}-client", "-f", str(key)])
    authorized = ssh_dir(cfg) / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    authorized.chmod(0o644)


def _user_exists() -> bool:
    try:
        pwd.getpwnam(SSH_USER)
    except KeyError:
        return False
    return True


def remove_user_and_rule(cfg: LabConfig) -> None:
    sudoers_file(cfg).unlink(missing_ok=True)
    if other_labs_active(cfg):
        return
    try:
        entry = pwd.getpwnam(SSH_USER)
    except KeyError:
        return
    if entry.pw_gecos == _OUR_GECOS:
        sh(["userdel", "--remove", SSH_USER], check=False)


def other_labs_active(cfg: LabConfig) -> bool:
    return any(p.name != sudoers_file(cfg).name
               for p in SUDOERS_DIR.glob("stillpoint-lab[0-9]"))


def write_sshd_config(cfg: LabConfig, guest_dir: Path, ip: str) -> HostKey:
    host_key = guest_dir / "ssh_host_ed25519_key"
    if not host_key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{ip}", "-f", str(host_key)])
    (guest_dir / "sshd_config").write_text(
        f"""# sshd of a Stillpoint lab guest (lab {cfg.lab_id})
ListenAddress {ip}:22
HostKey {host_key}
PidFile {guest_dir / "sshd.pid"}
AuthorizedKeysFile {ssh_dir(cfg) / "authorized_keys"}
AllowUsers {SSH_USER}
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The key files are root-owned (host key 0600) in root-owned dirs, but the state dir may sit under a
# world-writable /tmp in tests, which StrictModes rejects.
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
"""
    )
    public = host_key.with_suffix(".pub").read_text().split()
    fingerprint = sh(["ssh-keygen", "-l", "-E", "sha256", "-f",
                      str(host_key.with_suffix(".pub"))]).stdout.split()[1]
    return HostKey(public=f"{public[0]} {public[1]}", sha256=fingerprint)
