#!/usr/bin/env python3
"""Write MANIFEST.sha256 for the Windows agent payload (`<sha256>  <relative/path>` lines).

Run after changing any file under agent_payload/windows/; the appliance refuses to push a
payload whose manifest is stale, and the agent refuses to load a file it does not list.
`--check` exits 1 when the manifest is out of date (used by the tests).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MANIFEST = "MANIFEST.sha256"
# What is pushed into the guest: the entry script and its modules, nothing else.
PATTERNS = ("stillpoint-agent.ps1", "lib/*.ps1")


def payload_files(root: Path = ROOT) -> list[str]:
    found = {p.relative_to(root).as_posix() for pat in PATTERNS for p in root.glob(pat)}
    return sorted(found)


def render(root: Path = ROOT) -> str:
    lines = [f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}"
             for rel in payload_files(root)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    path = ROOT / MANIFEST
    if "--check" in argv:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
