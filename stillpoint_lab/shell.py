"""Host commands for the lab: one place that turns a failed command into a LabError."""

from __future__ import annotations

import subprocess

from appliance.errors import LabError


def sh(argv: list[str], *, check: bool = True, input: str | None = None,
       timeout: float = 60, env: dict[str, str] | None = None,
       ) -> subprocess.CompletedProcess[str]:
    """Run a host command; failures become LabError with the command's stderr."""
    try:
        proc = subprocess.run(argv, check=False, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LabError(f"{argv[0]} failed: {err}") from err
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc
