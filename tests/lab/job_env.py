"""The environment for `stillpoint job` / `serve` processes in lab tests: the lab's profile
copied with a fresh repository, job history and log directory per test."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from appliance.profile import write_private


def job_env(lab: Any, tmp_path: Path) -> dict[str, str]:
    doc = json.loads(Path(lab.profile_path).read_text())
    doc["repository"]["path"] = str(tmp_path / "repository")
    profile = tmp_path / "profile.json"
    write_private(profile, json.dumps(doc))
    return {**os.environ, "STILLPOINT_PROFILE": str(profile),
            "STILLPOINT_HISTORY": str(tmp_path / "history.sqlite"),
            "STILLPOINT_LOG_DIR": str(tmp_path / "log")}
