"""What a job works with, made from the profile: vCenter, the repository, guest channels.

Secrets are read here (profile file, environment) and handed to the layers that need them;
they never appear in argv, logs or exceptions.
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import NotFound, UsageError
from appliance.guest.channel import GuestChannel
from appliance.guest.ssh import SSHChannel
from appliance.profile import GuestAccess, Profile
from appliance.repository import LocalBackend, Repository
from appliance.vsphere.session import VCenterEndpoint, VSphereSession, connect


def vcenter_endpoint(profile: Profile, thumbprint: str | None = None) -> VCenterEndpoint:
    vc = profile.vcenter
    host = vc.get("host")
    if not host:
        raise UsageError(f"profile {profile.path}: vcenter.host is missing")
    user = vc.get("user")
    password = profile.vcenter_password()
    if not user or password is None:
        raise UsageError("vCenter credentials missing: set vcenter.user and password_file in "
                         "the profile, or STILLPOINT_VC_PASSWORD")
    return VCenterEndpoint(
        host=str(host), port=int(vc.get("port", 443)), user=str(user), password=password,
        thumbprint_sha256=thumbprint or vc.get("thumbprint_sha256"), ca_file=vc.get("ca_file"),
    )


def open_vcenter(profile: Profile, thumbprint: str | None = None) -> VSphereSession:
    return connect(vcenter_endpoint(profile, thumbprint))


def open_repository(profile: Profile, *, create: bool = False) -> Repository:
    """Open the profile's repository; with create=True make it first if it does not exist."""
    path = profile.repository_path()
    passphrase = profile.repository_passphrase()
    encrypted = profile.repository.get("encryption", True) is not False
    if encrypted and passphrase is None:
        raise UsageError("the repository passphrase is missing: set repository.passphrase_file "
                         "in the profile or STILLPOINT_PASSPHRASE")
    backend = LocalBackend(path)
    if not (path / "config").exists():
        if not create:
            raise NotFound(f"no repository at {path}: run 'stillpoint init' first")
        # The retention lock is fixed at creation (the key wrap authenticates it).
        Repository.init(backend, passphrase, encryption=encrypted,
                        retention_lock_days=_lock_days(profile))
    return Repository.open(backend, passphrase)


def _lock_days(profile: Profile) -> int:
    raw = profile.repository.get("retention_lock_days", 0)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise UsageError(f"profile {profile.path}: repository.retention_lock_days must be a "
                         f"whole number of days (0 = no lock), not {raw!r}")
    return raw


def repository_exists(profile: Profile) -> bool:
    return (profile.repository_path() / "config").exists()


def guest_access(profile: Profile, vm_name: str) -> GuestAccess | None:
    return profile.guests.get(vm_name)


def open_guest_channel(access: GuestAccess) -> GuestChannel:
    if access.transport == "winrm":
        return _open_winrm(access)
    if access.transport != "ssh":
        raise UsageError(f"guest transport {access.transport!r}: use ssh or winrm")
    if not access.host_key:
        raise UsageError(f"guest {access.host}: no host_key in the profile; SSH host keys are "
                         "always verified (ssh-keyscan it and check the fingerprint)")
    key = Path(access.key_file).expanduser() if access.key_file else None
    return SSHChannel(access.host, access.port or 22, access.user, known_host_key=access.host_key,
                      key_path=key, password=access.password, sudo=access.sudo)


def _open_winrm(access: GuestAccess) -> GuestChannel:
    from appliance.guest.winrm_channel import WinRMChannel, WinRMOptions

    if access.password is None:
        raise UsageError(f"guest {access.host}: WinRM needs a password in the profile")
    options = WinRMOptions(host=access.host, username=access.user, password=access.password,
                           auth=access.auth,  # type: ignore[arg-type]
                           port=access.port,
                           ca_bundle=access.ca_file, thumbprint_sha256=access.thumbprint_sha256)
    return WinRMChannel(options)
