"""Secrets and trust over a whole lab backup and restore: the vCenter password, the
repository passphrase and the guest SSH key never appear in any process's command line
(/proc/*/cmdline sampled all along), in the repository, in logs or CLI output, in the job
history, in the guest, or in the cassettes; guest data is not in the repository in plain
text; secrets files are 0600 and looser ones are refused; TLS and SSH identities are always
checked (the refusals themselves are in test_bad_input.py)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import STILLPOINT, cli
from pyVmomi import vim

from appliance.jobs import environment
from appliance.profile import load_profile
from appliance.vsphere.tasks import wait_for_task

pytestmark = pytest.mark.timeout(2400)   # a TCG guest: backups, a restore of 4 GiB

VM = "lab-vm1"
CASSETTES = Path(__file__).resolve().parents[1] / "cassettes"


class CmdlineSampler(threading.Thread):
    """Reads every process's argv every 20 ms and keeps those that contain a secret."""

    def __init__(self, needles: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.needles, self.hits, self.samples = needles, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in Path("/proc").iterdir():
                if not p.name.isdigit():
                    continue
                try:
                    argv = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(n in argv for n in self.needles):
                    self.hits.append(argv.replace(b"\0", b" ").decode(errors="replace"))
            self.samples += 1
            time.sleep(0.02)


def _lab_secrets(lab: Any) -> dict[str, bytes]:
    doc = json.loads(Path(lab.profile_path).read_text())
    key_lines = Path(doc["guests"][VM]["key_file"]).read_text().splitlines()
    return {
        "vcenter password": Path(doc["vcenter"]["password_file"]).read_text().strip().encode(),
        "repository passphrase":
            Path(doc["repository"]["passphrase_file"]).read_text().strip().encode(),
        "ssh private key": max(key_lines[1:-1], key=len).encode(),
        "lab token": lab.vcsim.lab_token.encode(),
    }


def _files_containing(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for p in [root] if root.is_file() else root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [f"{name} in {p}" for name, n in needles.items() if n in data]
    return found


def test_no_secret_anywhere_through_backup_schedule_and_restore(
        lab: Any, profile_path: Path, tmp_path: Path) -> None:
    found = _lab_secrets(lab)
    marker = b"STILLPOINT-PLAINTEXT-MARKER-" + secrets.token_hex(8).encode()
    g = lab.guests[VM]
    wrote = g.run(["sh", "-c", (f"yes {marker.decode()} | head -c 1048576 "
                                 "> /data/marker.txt && sync")])
    assert wrote.returncode == 0, wrote.stderr
    sampler = CmdlineSampler(list(found.values()))
    sampler.start()
    outputs: list[str] = []
    history = tmp_path / "history.sqlite"
    restored_vm = "sp-secrets-restore"
    try:
        for args in (["backup", VM], ["backup", VM, "--full"], ["list"], ["check", "--read-data"]):
            r = cli(*args)
            outputs.append(r.stdout + r.stderr)
            assert r.returncode == 0, r.stderr
        rp = json.loads(cli("list", "--json").stdout)[-1]["id"]
        # A scheduled run: the job history is written by `serve`.
        serve = subprocess.Popen([*STILLPOINT, "serve", "--history", str(history), "--poll", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            made = cli("job", "create", "sp-secrets", "--vm", VM, "--once", "+3")
            outputs.append(made.stdout + made.stderr)
            assert made.returncode == 0, made.stderr
            deadline = time.monotonic() + 150
            runs: list[Any] = []
            while time.monotonic() < deadline and not runs:
                time.sleep(2)
                shown = cli("job", "show", "sp-secrets", "--history", str(history), "--json")
                runs = json.loads(shown.stdout).get("runs") if shown.returncode == 0 else []
                runs = [r for r in runs or [] if r.get("finished")]
            assert runs, "the scheduled run did not finish"
        finally:
            serve.send_signal(signal.SIGTERM)
            out, _ = serve.communicate(timeout=120)
            outputs.append(out)
            cli("job", "delete", "sp-secrets")
        disk = tmp_path / "disk.raw"
        r = cli("restore", "disk", rp, "--disk", "1", "--to", str(disk))   # /data
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        r = cli("files", "get", rp, "/marker.txt", "--disk", "1", "--to",
                str(tmp_path / "files"))
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        r = cli("restore", "vm", rp, "--name", restored_vm)
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
    finally:
        sampler.stop.set()
        sampler.join()
        _destroy_vm(profile_path, restored_vm)
    assert sampler.samples > 100
    assert sampler.hits == [], f"secrets in command lines: {sampler.hits}"
    # The restored data holds the marker (so the greps below can find things)...
    assert marker in (tmp_path / "files" / "marker.txt").read_bytes()
    assert _files_containing(disk, {"marker": marker})
    # ...the repository holds neither secrets nor plain guest data.
    repo = Path(json.loads(profile_path.read_text())["repository"]["path"])
    assert _files_containing(repo, {**found, "guest data": marker}) == []
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in repo.rglob("*")), \
        "repository files readable by others"
    text = "\n".join(outputs).encode()
    assert [n for n, s in found.items() if s in text] == [], "secret in CLI output"
    assert _files_containing(Path(os.environ["STILLPOINT_LOG_DIR"]).parent, found) == []
    assert _files_containing(history, found) == []
    in_guest = g.run(["grep", "-rlF", "-e", found["vcenter password"].decode(), "-e",
                      found["repository passphrase"].decode(), "/data", "/opt", "/etc/stillpoint"])
    assert in_guest.stdout.strip() == "", f"secrets in the guest: {in_guest.stdout}"


def _destroy_vm(profile_path: Path, name: str) -> None:
    session = environment.open_vcenter(load_profile(profile_path))
    try:
        vm = session.content.searchIndex.FindByInventoryPath(f"DC0/vm/{name}")
        if vm is not None:
            if vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn:
                wait_for_task(session, vm.PowerOffVM_Task(), 60)
            wait_for_task(session, vm.Destroy_Task(), 60)
    finally:
        session.close()


def test_cassettes_hold_no_credentials(lab: Any) -> None:
    """Recorded SOAP and WS-Man exchanges: passwords scrubbed, no lab secret, no auth
    header with credentials."""
    found = _lab_secrets(lab)
    files = [p for p in CASSETTES.rglob("*") if p.is_file()]
    assert files
    for p in [f for f in files if f.suffix != ".md"]:
        text = p.read_text(errors="replace")
        assert all(s.decode() not in text for s in found.values()), p
        for value in _between(text, "<password>", "</password>"):
            assert value in ("", "scrubbed", "REDACTED"), f"{p}: password {value[:3]}…"
        for line in text.splitlines():
            low = line.lower()
            assert "authorization: basic" not in low and "authorization: negotiate" not in low, p


def _between(text: str, start: str, end: str) -> list[str]:
    out, i = [], 0
    while (i := text.find(start, i)) >= 0:
        j = text.find(end, i)
        out.append(text[i + len(start):j])
        i = j
    return out


def test_secret_files_are_private(lab: Any) -> None:
    doc = json.loads(Path(lab.profile_path).read_text())
    for path in (Path(lab.profile_path), Path(doc["vcenter"]["password_file"]),
                 Path(doc["repository"]["passphrase_file"]), Path(doc["guests"][VM]["key_file"])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_loose_passphrase_file_is_refused(lab: Any, profile_path: Path, tmp_path: Path) -> None:
    loose = tmp_path / "passphrase"
    loose.write_text("x" * 20)
    os.chmod(loose, 0o640)
    doc = json.loads(profile_path.read_text())
    doc["repository"]["passphrase_file"] = str(loose)
    profile_path.write_text(json.dumps(doc))
    r = cli("init")
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr
    assert not Path(doc["repository"]["path"]).exists()
