"""One error hierarchy for Stillpoint; each class carries its exit code.

The CLI prints `str(error)` on one line and exits with `exit_code`. Lower layers translate
third-party exceptions (vim.fault.*, paramiko, winrm, OSError) into these with
`raise X(...) from err`, so nothing above them sees a foreign exception.

Exit codes (documented in `stillpoint --help`):
    0 ok, 1 generic error, 2 usage / bad input, 3 not found, 4 authentication,
    5 trust (TLS certificate, thumbprint, SSH host key), 6 repository (corrupt, locked,
    wrong passphrase), 7 vSphere operation failed, 8 guest / agent failed,
    9 transport (data copy) failed, 10 storage full, 11 lab environment problem,
    12 done with warnings (borg's warning tier: the work is done but degraded, e.g. a
    fallback to crash-consistent, a skipped log truncation, a snapshot left to remove).
"""

from __future__ import annotations

WARNING_EXIT_CODE = 12


class StillpointError(Exception):
    """Something went wrong."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "error").strip())


class UsageError(StillpointError):
    """Bad input."""

    exit_code = 2


class NotFound(StillpointError):
    """Not found."""

    exit_code = 3


class AuthenticationFailed(StillpointError):
    """Authentication failed: check the user name and password."""

    exit_code = 4


class TrustError(StillpointError):
    """The peer's identity could not be verified."""

    exit_code = 5


class RepositoryError(StillpointError):
    """The repository cannot be used."""

    exit_code = 6


class WrongPassphrase(RepositoryError):
    """Wrong repository passphrase."""


class RepositoryLocked(RepositoryError):
    """The repository is locked by another process."""


class IntegrityError(RepositoryError):
    """Repository data failed its integrity check."""


class VSphereError(StillpointError):
    """A vSphere operation failed."""

    exit_code = 7


class GuestError(StillpointError):
    """The guest agent failed."""

    exit_code = 8


class TransportError(StillpointError):
    """Copying disk data failed."""

    exit_code = 9


class StorageFull(StillpointError):
    """No space left on the repository's storage."""

    exit_code = 10


class LabError(StillpointError):
    """The lab environment cannot run here."""

    exit_code = 11
