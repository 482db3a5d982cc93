"""Write (or check) linux/MANIFEST.sha256: one `sha256  relative/path` line per payload file.

The format is what `sha256sum --check` reads, so the guest bootstrap verifies it with
coreutils before running any Python. Usage:
    python3 agent_payload/build_manifest.py          # rewrite the manifest
    python3 agent_payload/build_manifest.py --check  # exit 1 if it is stale
"""

import hashlib
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linux")
MANIFEST = "MANIFEST.sha256"


# What a payload is made of: the bootstrap and the agent's Python sources, nothing else (a
# file a test run left behind must never reach every guest).
BOOTSTRAP = "stillpoint-agent"
SOURCE_DIR = "stillpoint_agent"


class NotSource(Exception):
    pass


def payload_files(root=ROOT):
    """Relative paths of the payload, sorted; caches and the manifest itself excluded.
    Raises NotSource for any other file."""
    out, strays = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in filenames:
            if name == MANIFEST or name.endswith((".pyc", ".pyo")):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            is_source = rel == BOOTSTRAP or (rel.startswith(SOURCE_DIR + os.sep)
                                             and rel.endswith(".py"))
            (out if is_source else strays).append(rel)
    if strays:
        raise NotSource("not agent source, remove before building the manifest: "
                        + ", ".join(sorted(strays)))
    return sorted(out)


def render(root=ROOT):
    lines = []
    for rel in payload_files(root):
        with open(os.path.join(root, rel), "rb") as fh:
            lines.append("%s  %s\n" % (hashlib.sha256(fh.read()).hexdigest(), rel))
    return "".join(lines)


def main(argv):
    try:
        text = render()
    except NotSource as err:
        print("%s: %s" % (os.path.basename(__file__), err), file=sys.stderr)
        return 1
    path = os.path.join(ROOT, MANIFEST)
    if "--check" in argv:
        with open(path) as fh:
            if fh.read() != text:
                print("%s is stale: run %s" % (path, __file__), file=sys.stderr)
                return 1
        return 0
    with open(path, "w") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
