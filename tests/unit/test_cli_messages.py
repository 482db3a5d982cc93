"""What a new user saw: usage mistakes are usage errors (exit 2), not internal errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lab_id", ["12", "x", "-1"])
def test_a_lab_id_out_of_range_is_a_usage_error(lab_id: str) -> None:
    result = subprocess.run([sys.executable, "-m", "stillpoint_lab.cli", "status"], cwd=ROOT,
                            capture_output=True, text=True,
                            env={**os.environ, "STILLPOINT_LAB_ID": lab_id})
    assert result.returncode == 2, result.stderr
    assert f"STILLPOINT_LAB_ID must be a digit 0-9, not '{lab_id}'" in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
