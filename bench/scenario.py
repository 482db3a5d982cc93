"""What the benchmark runs, in which order, on one lab: the figures of bench/RESULTS.md.

Each disk size is one VM of the lab hypervisor (a QEMU VM without an OS: external snapshots,
CBT from dirty bitmaps, docs/lab-hypervisor.md). Its content image is put on its flat file
while it is powered off; it is then powered on through the vSphere API. The changes between
backups are written into the running VM's disk through QEMU's block layer (hostd's lab-only
qemu-io), so CBT sees them as it sees a guest's writes and an incremental costs what the
changes cost, not what the lab's snapshot did.

Per disk size (fresh repositories for every repetition of a full, so that no full
deduplicates against an earlier one):
    raw transport   curl of the VM's flat file from /folder/ (same TLS) to /dev/null
    stillpoint      stillpoint backup VM --full --app-aware off   (a subprocess: RSS, CPU)
    restic          restic backup --stdin        < the same flat file
    borg            borg create ... -            < the same flat file
On the largest size, on the repositories of the last full:
    incrementals    1 % / 10 % of the 64 KiB blocks changed, scattered / clustered: one
                    chain that every tool backs up (the same backups of the same states)
    repository size after the full and those incrementals
    restore         whole disk to a file (timed until fsync'd): cat, stillpoint, restic, borg
                    (reps - 1 repetitions)
    check           stillpoint check --read-data, restic check --read-data, borg check
                    --verify-data (once each)
    more            reps - 1 further Stillpoint incrementals per kind, for medians
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillpoint_lab.config import DiskSpec, LabConfig, VMSpec
from appliance.profile import write_private
from appliance.datastore import folder_url
from bench import content
from bench.measure import Sample, run
from bench.tools import Cmd, Tools, then_sync

Say = Callable[[str], None]
CHANGES = ((0.01, "scattered"), (0.01, "clustered"), (0.10, "scattered"), (0.10, "clustered"))
TOOLS = ("raw", "stillpoint", "restic", "borg")
DISK_KEY = 2000           # the bench VMs' one disk


@dataclass(frozen=True)
class BenchConfig:
    sizes_mib: tuple[int, ...] = (2048, 8192)
    reps: int = 3
    work: Path = Path("/var/tmp/stillpoint-bench")
    lab_id: int = 3
    changes: tuple[tuple[float, str], ...] = CHANGES
    peer_checks: bool = True


@dataclass
class Results:
    """samples[figure] -> values; facts[name] -> one value; commands[label] -> shown form."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def add(self, figure: str, value: float) -> None:
        self.samples.setdefault(figure, []).append(value)

    def record(self, label: str, cmd: Cmd) -> None:
        self.commands.setdefault(label, cmd.shown)


def vm_name(size_mib: int) -> str:
    return f"bench-{size_mib}m"


def lab_config(cfg: BenchConfig) -> LabConfig:
    """One VM per disk size: a QEMU VM without an OS (the lab hypervisor's snapshots, CBT
    from dirty bitmaps, as for the lab's guests), whose one disk holds the content image.
    The lab's state (its datastore: GiBs of disks) lives in the bench's work directory."""
    return LabConfig(lab_id=cfg.lab_id, lab_root=str(cfg.work / "lab"), vms=tuple(
        VMSpec(vm_name(s), has_guest=False, hypervisor="qemu", apps=(), disks=(DiskSpec.mib(s),))
        for s in cfg.sizes_mib))


def run_bench(cfg: BenchConfig, say: Say = print) -> Results:
    from stillpoint_lab.lab import lab_down, lab_up, power_on

    res = Results()
    res.facts["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.monotonic()
    cfg.work.mkdir(parents=True, exist_ok=True)
    images = {}
    for size in cfg.sizes_mib:
        say(f"content: disk image of {size} MiB (cached after the first run)")
        images[size] = content.disk_image(size, cfg.work / "cache", cfg.work)
        res.facts[f"{size}:allocated"] = content.allocated_bytes(images[size])
    lab = lab_config(cfg)
    lab_down(lab)  # a lab left by a killed run
    say(f"lab {cfg.lab_id}: up")
    handle = lab_up(lab)
    try:
        run_ = _Run(cfg, res, handle, Tools(cfg.work / "secrets"), say)
        try:
            for size in cfg.sizes_mib:          # while powered off, as an image is put
                content.install(images[size], run_.flat(size))
            say("powering the bench VMs on through the vSphere API")
            power_on(handle.vcsim, [vm_name(s) for s in cfg.sizes_mib])
            for size in cfg.sizes_mib:
                run_.enable_cbt(size)
            for size in cfg.sizes_mib:
                run_.fulls(size)
            big = max(cfg.sizes_mib)
            run_.incrementals(big)
            run_.restores(big)
            run_.checks(big)
            run_.more_incrementals(big)
        finally:
            run_.close()
    finally:
        say(f"lab {cfg.lab_id}: down")
        lab_down(lab)
    res.facts["duration_s"] = round(time.monotonic() - t0, 1)
    return res


class _Run:
    def __init__(self, cfg: BenchConfig, res: Results, handle: Any, tools: Tools,
                 say: Say) -> None:
        from appliance.jobs import environment
        from appliance.profile import load_profile

        self.cfg, self.res, self.lab, self.tools, self.say = cfg, res, handle, tools, say
        self.work = cfg.work / "run"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.lab_profile = json.loads(Path(handle.profile_path).read_text())
        self.session = environment.open_vcenter(load_profile(handle.profile_path))
        self.curl_conf = tools.curl_config(self.session.cookie)
        self.rp_ids: list[str] = []
        self.seed = 1000

    def close(self) -> None:
        self.session.close()

    def enable_cbt(self, size: int) -> None:
        """CBT on before any timing: turning it on costs a one-off stun snapshot."""
        from appliance.vsphere import cbt, inventory

        cbt.enable_cbt(self.session, inventory.find_vm(self.session, vm_name(size)))

    # --- writing into a running VM's disk ---------------------------------------------
    def change(self, size: int, fraction: float, pattern: str, seed: int) -> int:
        """Change the disk of the running VM through QEMU's block layer (so its dirty
        bitmaps, the lab's CBT, record the writes as they record a guest's): hostd's lab-only
        /debug/qemu-io, one `write -s FILE OFFSET LENGTH` per run of adjacent changed
        blocks. qemu-io's -s takes the bytes from a file; hostd accepts no '/' in a command,
        so the file is named relative to QEMU's working directory, the VM's run directory.
        The bytes are then checked in the flat file. Returns the bytes changed."""
        from stillpoint_lab import hostd

        cfg, vm = self.lab.config, vm_name(size)
        src = hostd.vm_dir(cfg, vm) / "bench-change.bin"
        calls = 0

        def write(offset: int, data: bytes) -> None:
            nonlocal calls
            src.write_bytes(data)
            out = hostd.call(cfg, "/debug/qemu-io", {
                "vm": vm, "key": DISK_KEY,
                "command": f"write -q -s {src.name} {offset} {len(data)}"},
                token=self.lab.vcsim.lab_token, timeout=300)
            calls += 1
            if out.get("output", "").strip():
                raise RuntimeError(f"qemu-io on {vm}: {out['output'].strip()}")

        t0 = time.monotonic()
        try:
            changed, written = content.change_blocks(write, self.flat(size).stat().st_size,
                                                     fraction, pattern, seed)
            hostd.call(cfg, "/debug/qemu-io", {"vm": vm, "key": DISK_KEY, "command": "flush"},
                       token=self.lab.vcsim.lab_token, timeout=300)
        finally:
            src.unlink(missing_ok=True)
        took = time.monotonic() - t0
        content.verify_written(self.flat(size), written)
        kind = _kind(fraction, pattern)
        self.res.add(f"{size}:{kind}:change_calls", calls)
        self.res.add(f"{size}:{kind}:change_s", took)
        return changed

    # --- where things are -------------------------------------------------------------
    def flat(self, size: int) -> Path:
        return Path(self.lab.vcsim.vms[vm_name(size)].disks[0].flat_file)

    def url(self, size: int) -> str:
        rel = self.flat(size).relative_to(self.lab.vcsim.datastore_dir)
        return self.lab.vcsim.base_url() + folder_url(str(rel), "DC0", "LocalDS_0")

    def repo(self, tool: str, size: int) -> Path:
        return self.work / f"{tool}-{size}m"

    def profile(self, size: int) -> Path:
        doc = dict(self.lab_profile)
        doc["repository"] = {**doc["repository"], "path": str(self.repo("stillpoint", size))}
        path = self.work / f"profile-{size}m.json"
        write_private(path, json.dumps(doc))
        return path

    def measure(self, label: str, cmd: Cmd, timestamps: bool = False) -> Sample:
        self.res.record(label, cmd)
        return run(cmd.argv, stdin=cmd.stdin, stdout=cmd.stdout, env=cmd.env, cwd=cmd.cwd,
                   timestamps=timestamps)

    def _fresh(self, size: int) -> None:
        t, sz = self.tools, size
        for tool in ("stillpoint", "restic", "borg"):
            shutil.rmtree(self.repo(tool, sz), ignore_errors=True)
        shutil.rmtree(self.work / "restic-cache", ignore_errors=True)
        shutil.rmtree(self.work / "borg-home", ignore_errors=True)
        self.measure("stillpoint init", t.sp(self.profile(sz), "init"))
        self.measure("restic init", t.restic_init(self.repo("restic", sz), self.work / "restic-cache"))
        self.measure("borg init", t.borg_init(self.repo("borg", sz), self.work / "borg-home"))
        self.archives = 0
        self.rp_ids = []

    # --- full backups -------------------------------------------------------------------
    def fulls(self, size: int) -> None:
        gib = size / 1024
        for rep in range(self.cfg.reps):
            self.say(f"{size} MiB: full backups, repetition {rep + 1}/{self.cfg.reps}")
            self._fresh(size)
            raw = self.measure("raw transport", self.tools.curl(
                self.url(size), self.lab.vcsim.cert_pem_path, self.curl_conf))
            self._put(size, "full", "raw", raw, gib)
            sp, doc = self.sp_backup(size, full=True)
            self._put(size, "full", "stillpoint", sp, gib)
            self.res.add(f"{size}:full:stillpoint:bytes_read", doc["bytes_read"])
            self.res.add(f"{size}:full:stillpoint:copy_s", doc["copy_s"])
            self.res.add(f"{size}:full:stillpoint:snapshot_s", doc["snapshot_s"])
            self.res.add(f"{size}:full:stillpoint:wall_without_snapshot",
                         sp.wall_s - doc["snapshot_s"])
            self._put(size, "full", "restic", self.restic_backup(size), gib)
            self._put(size, "full", "borg", self.borg_backup(size), gib)

    def _put(self, size: int, what: str, tool: str, s: Sample, gib: float) -> None:
        self.res.add(f"{size}:{what}:{tool}:wall", s.wall_s)
        self.res.add(f"{size}:{what}:{tool}:cpu_per_gib", s.cpu_s / gib)
        self.res.add(f"{size}:{what}:{tool}:rss_mib", s.maxrss_kib / 1024)

    def sp_backup(self, size: int, full: bool) -> tuple[Sample, dict[str, Any]]:
        args = ["backup", vm_name(size), "--app-aware", "off", "--json"]
        cmd = self.tools.sp(self.profile(size), *args, *(["--full"] if full else []))
        s = self.measure("stillpoint backup --full" if full else "stillpoint backup", cmd,
                         timestamps=True)
        doc: dict[str, Any] = {}
        copy_s = 0.0
        began = taken = 0.0
        for at, line in s.lines:
            item = json.loads(line)
            event = item.get("event", "")
            if "backup job" in event and event.endswith("starting"):
                began = at
            elif event.startswith(f"{vm_name(size)}: snapshot") and "taken" in event:
                taken = at
            if "result" in item:
                doc = item["result"]
            elif item.get("done") and item.get("rate_bps"):
                copy_s += item["total"] / item["rate_bps"]
        if not doc.get("ok"):
            raise RuntimeError(f"stillpoint backup failed: {doc or s.stdout[-2000:]}")
        doc["copy_s"] = copy_s
        # From the job's start to the snapshot: login, CBT and stale-snapshot checks, the
        # snapshot (an external QEMU snapshot: milliseconds, as ESXi's redirect-on-write).
        doc["snapshot_s"] = max(0.0, taken - began)
        self.rp_ids.append(doc["restore_point"])
        return s, doc

    def restic_backup(self, size: int) -> Sample:
        return self.measure("restic backup", self.tools.restic_backup(
            self.repo("restic", size), self.work / "restic-cache", self.flat(size)))

    def borg_backup(self, size: int) -> Sample:
        self.archives += 1
        return self.measure("borg create", self.tools.borg_create(
            self.repo("borg", size), self.work / "borg-home", f"disk-{self.archives}",
            self.flat(size)))

    # --- incrementals on the last full's repositories -----------------------------------
    def incrementals(self, size: int) -> None:
        """One shared chain: per kind, change the disk, then every tool backs it up once;
        so the three repositories hold the same backups of the same states."""
        for fraction, pattern in self.cfg.changes:
            self.say(f"{size} MiB: incremental {_kind(fraction, pattern)}, every tool")
            self._incremental(size, fraction, pattern, peers=True)
        for tool in ("stillpoint", "restic", "borg"):
            self.res.facts[f"{size}:repo_bytes:{tool}"] = _du(self.repo(tool, size))
        self.res.facts[f"{size}:backups"] = self.archives

    def more_incrementals(self, size: int) -> None:
        """Further Stillpoint repetitions of each kind, for medians (after restores and
        checks, which compare with the shared chain's newest state)."""
        for _ in range(self.cfg.reps - 1):
            for fraction, pattern in self.cfg.changes:
                self.say(f"{size} MiB: incremental {_kind(fraction, pattern)}, Stillpoint again")
                self._incremental(size, fraction, pattern, peers=False)

    def _incremental(self, size: int, fraction: float, pattern: str, peers: bool) -> None:
        gib = size / 1024
        kind = _kind(fraction, pattern)
        self.seed += 1
        changed = self.change(size, fraction, pattern, self.seed)
        s, doc = self.sp_backup(size, full=False)
        self._put(size, kind, "stillpoint", s, gib)
        self.res.add(f"{size}:{kind}:stillpoint:bytes_read", doc["bytes_read"])
        self.res.add(f"{size}:{kind}:stillpoint:snapshot_s", doc["snapshot_s"])
        self.res.add(f"{size}:{kind}:stillpoint:wall_without_snapshot",
                     s.wall_s - doc["snapshot_s"])
        self.res.add(f"{size}:{kind}:changed", changed)
        if peers:
            self._put(size, kind, "restic", self.restic_backup(size), gib)
            self._put(size, kind, "borg", self.borg_backup(size), gib)

    # --- restores of the newest backup --------------------------------------------------
    def restores(self, size: int) -> None:
        out_dir = self.work / "restore"
        gib = size / 1024
        flat = self.flat(size)
        reps = restore_reps(self.cfg)
        for rep in range(reps):
            self.say(f"{size} MiB: restores, repetition {rep + 1}/{reps}")
            for tool in TOOLS:
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                target = out_dir / "disk.img"
                cmd = self._restore_cmd(tool, size, out_dir, target)
                s = self.measure(f"restore {tool}", cmd)
                self._put(size, "restore", tool, s, gib)
                if rep == 0:
                    self.res.facts[f"{size}:restore_identical:{tool}"] = _same(target, flat)
        shutil.rmtree(out_dir, ignore_errors=True)

    def _restore_cmd(self, tool: str, size: int, out_dir: Path, target: Path) -> Cmd:
        t = self.tools
        if tool == "raw":
            inner = Cmd(["cat", str(self.flat(size))], stdout=target)
        elif tool == "stillpoint":
            inner = t.sp(self.profile(size), "restore", "disk", self.rp_ids[-1], "--disk", "0",
                         "--to", str(target))
        elif tool == "restic":
            inner = t.restic(self.repo("restic", size), self.work / "restic-cache", "restore",
                             "latest", "--target", str(out_dir))
        else:
            inner = t.borg(self.work / "borg-home", "extract", "--sparse",
                           f"{self.repo('borg', size)}::disk-{self.archives}", cwd=out_dir)
        return then_sync(inner, target)

    # --- repository checks --------------------------------------------------------------
    def checks(self, size: int) -> None:
        self.say(f"{size} MiB: check --read-data")
        t = self.tools
        cmds = {"stillpoint": t.sp(self.profile(size), "check", "--read-data")}
        if self.cfg.peer_checks:
            cmds["restic"] = t.restic(self.repo("restic", size), self.work / "restic-cache",
                                      "check", "--read-data")
            cmds["borg"] = t.borg(self.work / "borg-home", "check", "--verify-data",
                                  str(self.repo("borg", size)))
        for tool, cmd in cmds.items():
            s = self.measure(f"check {tool}", cmd)
            self.res.add(f"{size}:check:{tool}:wall", s.wall_s)
            self.res.add(f"{size}:check:{tool}:gib_per_s",
                         _du(self.repo(tool, size)) / (1 << 30) / s.wall_s)


def _kind(fraction: float, pattern: str) -> str:
    return f"inc{round(fraction * 100)}%{pattern}"


def restore_reps(cfg: BenchConfig) -> int:
    """Restores are the slowest figures: one repetition fewer (at least one)."""
    return max(1, cfg.reps - 1)


def _du(path: Path) -> int:
    """Bytes the repository's files hold (apparent sizes)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _same(a: Path, b: Path, chunk: int = 8 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
