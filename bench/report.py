"""The results as tables (plain text for the terminal, Markdown for bench/RESULTS.md),
the targets met or missed, and the machine and tool versions."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.measure import Stat
from bench.scenario import TOOLS, BenchConfig, Results, restore_reps

MIB = 1 << 20
LAB_FREE = "stillpoint without the lab's snapshot"
WITHOUT = ", without the lab's snapshot"
GIB = 1 << 30


def _sh(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as err:
        return f"unavailable ({err.strerror})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


def machine() -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "?")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    import os

    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores"
               + (" (SHA-NI, AES-NI)" if " sha_ni" in Path("/proc/cpuinfo").read_text() else ""),
        "Memory": f"{int(mem) // 1024 // 1024} GiB",
        "Kernel": platform.release(),
        "OS": _sh(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "File system of the work area": _sh(["findmnt", "-n", "-o", "FSTYPE", "--target",
                                            "/var/tmp"]),
    }


def versions() -> dict[str, str]:
    import cryptography
    import zstandard

    repo = Path(__file__).resolve().parents[1]
    return {
        "Stillpoint": "git " + _sh(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "Python": sys.version.split()[0],
        "zstandard (python)": zstandard.__version__,
        "cryptography (python)": f"{cryptography.__version__}",
        "OpenSSL": _sh([sys.executable, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"]),
        "restic": _sh(["restic", "version"]),
        "borg": _sh(["borg", "--version"]),
        "curl": _sh(["curl", "--version"]),
        "vCenter simulator": "govmomi simulator 0.24.2 (Debian) + tests/lab/vcsim, "
                             + _sh(["go", "version"]),
        "PostgreSQL (content)": _sh(["/usr/lib/postgresql/15/bin/postgres", "--version"]),
        "mkfs.ext4 (content)": _sh(["sh", "-c", "mkfs.ext4 -V 2>&1"]),
    }


# --- figures -------------------------------------------------------------------------------

def st(res: Results, key: str) -> Stat | None:
    values = res.samples.get(key)
    return Stat.of(values) if values else None


def fmt_s(s: Stat | None) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.median:.2f}"
    return f"{s.median:.2f} ({s.low:.2f}–{s.high:.2f})"


def _rate(size_mib: int, s: Stat | None) -> str:
    if s is None:
        return "-"
    return f"{size_mib / s.median:.0f} ({size_mib / s.high:.0f}–{size_mib / s.low:.0f})" \
        if s.n > 1 else f"{size_mib / s.median:.0f}"


def _ratio(a: Stat | None, b: Stat | None) -> float | None:
    """Throughput of b relative to a's (time a / time b)."""
    if a is None or b is None:
        return None
    return a.median / b.median


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def tables(res: Results, cfg: BenchConfig) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for size in cfg.sizes_mib:
        rows = []
        raw = st(res, f"{size}:full:raw:wall")
        for tool in TOOLS:
            w = st(res, f"{size}:full:{tool}:wall")
            cpu = st(res, f"{size}:full:{tool}:cpu_per_gib")
            rss = st(res, f"{size}:full:{tool}:rss_mib")
            rows.append([tool, fmt_s(w), _rate(size, w), _x(_ratio(raw, w)),
                         f"{cpu.median:.2f}" if cpu else "-", f"{rss.median:.0f}" if rss else "-"])
            if tool == "stillpoint":
                w = st(res, f"{size}:full:stillpoint:wall_without_snapshot")
                rows.append([LAB_FREE, fmt_s(w), _rate(size, w), _x(_ratio(raw, w)), "", ""])
        cp = st(res, f"{size}:full:stillpoint:copy_s")
        br = st(res, f"{size}:full:stillpoint:bytes_read")
        sn = st(res, f"{size}:full:stillpoint:snapshot_s")
        note = (f"Stillpoint read {br.median / MIB:.0f} MiB (the allocated areas); its copy "
                f"phase took {cp.median:.2f} s, the lab's snapshot {sn.median:.2f} s"
                if cp and br and sn else "")
        out.append(((f"Full backup, {size} MiB disk ({res.facts.get(f'{size}:allocated', 0) // MIB}"
                    f" MiB allocated). {note}"),
                    ["tool", "seconds, median (min–max)", "MiB/s of disk", "vs raw",
                     "CPU s / GiB", "peak RSS MiB"], rows))
    big = max(cfg.sizes_mib)
    full = st(res, f"{big}:full:stillpoint:wall")
    full2 = st(res, f"{big}:full:stillpoint:wall_without_snapshot")
    fbytes = st(res, f"{big}:full:stillpoint:bytes_read")
    rows = []
    for fraction, pattern in cfg.changes:
        kind = f"inc{round(fraction * 100)}%{pattern}"
        w = st(res, f"{big}:{kind}:stillpoint:wall")
        w2 = st(res, f"{big}:{kind}:stillpoint:wall_without_snapshot")
        b = st(res, f"{big}:{kind}:stillpoint:bytes_read")
        rows.append([f"{round(fraction * 100)} % {pattern}", fmt_s(w),
                     f"{100 * w.median / full.median:.1f} %" if w and full else "-",
                     fmt_s(w2), f"{100 * w2.median / full2.median:.1f} %" if w2 and full2 else "-",
                     f"{b.median / MIB:.0f}" if b else "-",
                     f"{100 * b.median / fbytes.median:.1f} %" if b and fbytes else "-",
                     fmt_s(st(res, f"{big}:{kind}:restic:wall")),
                     fmt_s(st(res, f"{big}:{kind}:borg:wall"))])
    out.append(((f"Incremental backups, {big} MiB disk (Stillpoint: median of "
                f"{cfg.reps}; restic and borg: once per kind, they re-read the whole disk; "
                "percentages against Stillpoint's own full)"),
                ["changed blocks", "Stillpoint s", "of its full's time",
                 "without the lab's snapshot, s", "of its full's time (same basis)", "MiB read",
                 "of the full's bytes read", "restic s", "borg s"], rows))
    raw = st(res, f"{big}:restore:raw:wall")
    rows = []
    for tool in TOOLS:
        w = st(res, f"{big}:restore:{tool}:wall")
        ident = res.facts.get(f"{big}:restore_identical:{tool}")
        rows.append([{"raw": "raw copy (cat)"}.get(tool, tool), fmt_s(w), _rate(big, w),
                     _x(_ratio(raw, w)), "yes" if ident else "NO" if ident is False else "-"])
    out.append(((f"Restore of the whole {big} MiB disk to a file (timed until fsync'd; "
                f"{restore_reps(cfg)} runs)"),
                ["tool", "seconds, median (min–max)", "MiB/s", "vs raw copy",
                 "identical to the disk"], rows))
    rsize = res.facts.get(f"{big}:repo_bytes:restic")
    rows = []
    for tool in ("stillpoint", "restic", "borg"):
        b = res.facts.get(f"{big}:repo_bytes:{tool}")
        n = res.facts.get(f"{big}:backups")
        rows.append([tool, f"{b / MIB:.0f}" if b else "-",
                     f"{b / rsize:.2f}×" if b and rsize else "-", str(n or "-")])
    out.append((f"Repository size after the full and the incrementals, {big} MiB disk",
                ["tool", "MiB", "vs restic", "backups stored"], rows))
    rows = []
    for tool in ("stillpoint", "restic", "borg"):
        w = st(res, f"{big}:check:{tool}:wall")
        g = st(res, f"{big}:check:{tool}:gib_per_s")
        if w:
            rows.append([tool, fmt_s(w), f"{g.median * 1024:.0f}" if g else "-"])
    out.append((("Full repository check re-reading all data, once each (stillpoint check "
                "--read-data, restic check --read-data, borg check --verify-data)"),
                ["tool", "seconds", "MiB/s of repository"], rows))
    return out


def targets(res: Results, cfg: BenchConfig) -> list[tuple[str, str, bool | None]]:
    big, small = max(cfg.sizes_mib), min(cfg.sizes_mib)
    t: list[tuple[str, str, bool | None]] = []

    def add(name: str, value: float | None, ok: bool | None, unit: str = "×") -> None:
        t.append((name, "-" if value is None else f"{value:.2f}{unit}", ok))

    for size in cfg.sizes_mib:
        raw = st(res, f"{size}:full:raw:wall")
        for suffix, basis in (("wall", ""), ("wall_without_snapshot", WITHOUT)):
            sp = st(res, f"{size}:full:stillpoint:{suffix}")
            r = _ratio(raw, sp)
            add(f"full ≥ 0.8× raw transport ({size} MiB){basis}", r,
                None if r is None else r >= 0.8)
            for peer in ("restic", "borg"):
                r = _ratio(st(res, f"{size}:full:{peer}:wall"), sp)
                add(f"full ≥ {peer} throughput ({size} MiB){basis}", r,
                    None if r is None else r >= 1.0)
    for suffix, basis in (("wall", ""), ("wall_without_snapshot", WITHOUT)):
        full = st(res, f"{big}:full:stillpoint:{suffix}")
        for pattern in [p for f, p in cfg.changes if round(f * 100) == 1]:
            w = st(res, f"{big}:inc1%{pattern}:stillpoint:{suffix}")
            v = 100 * w.median / full.median if w and full else None
            add(f"1 %-changed incremental ({pattern}) ≤ 5 % of the full's time{basis}", v,
                None if v is None else v <= 5.0, " %")
    r = _ratio(st(res, f"{big}:restore:raw:wall"), st(res, f"{big}:restore:stillpoint:wall"))
    add("restore ≥ 0.8× raw copy", r, None if r is None else r >= 0.8)
    sp_b, re_b = res.facts.get(f"{big}:repo_bytes:stillpoint"), res.facts.get(
        f"{big}:repo_bytes:restic")
    r = sp_b / re_b if sp_b and re_b else None
    add("repository ≤ restic's size", r, None if r is None else r <= 1.0)
    rss = {s: st(res, f"{s}:full:stillpoint:rss_mib") for s in (small, big)}
    top = max((x.high for x in rss.values() if x), default=None)
    add("peak RSS ≤ 300 MiB", top, None if top is None else top <= 300, " MiB")
    if rss[small] and rss[big] and small != big:
        growth = rss[big].median / rss[small].median
        add(f"peak RSS flat from {small} to {big} MiB (≤ 1.1× growth)", growth, growth <= 1.1)
    return t


# --- rendering --------------------------------------------------------------------------------

def text_table(title: str, head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))

    return "\n".join([title, line(head), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: object) -> str:
        return str(c).replace("|", "\\|")

    return "\n".join(["| " + " | ".join(esc(h) for h in head) + " |",
                      "|" + "|".join("---" for _ in head) + "|",
                      *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)])


def render_text(res: Results, cfg: BenchConfig) -> str:
    parts = [text_table(t, h, r) for t, h, r in tables(res, cfg)]
    parts.append(text_table("Targets", ["target", "measured", "met"],
                            [[n, v, _met(ok)] for n, v, ok in targets(res, cfg)]))
    return "\n\n".join(parts)


def _met(ok: bool | None) -> str:
    return "met" if ok else "MISSED" if ok is False else "not measured"


def render_markdown(res: Results, cfg: BenchConfig, notes: str = "") -> str:
    out = ["# Stillpoint benchmarks", "",
           f"Generated by `make bench` (`python -m bench.run`) on {res.facts.get('started')}; "
           f"the run took {res.facts.get('duration_s', 0) / 60:.1f} min. Medians of {cfg.reps} "
           "runs with min–max unless a figure says otherwise. Disk sizes: "
           + ", ".join(f"{s} MiB" for s in cfg.sizes_mib) + ".", ""]
    out += [("Medians of fewer runs where a table says so. Throughput is the disk's size "
            "divided by the wall time: every tool covers the same disk."), ""]
    out += ["## Targets", "", md_table(["target", "measured", "met"],
                                       [[n, v, _met(ok)] for n, v, ok in targets(res, cfg)]), ""]
    for title, head, rows in tables(res, cfg):
        out += [f"## {title}", "", md_table(head, rows), ""]
    if notes:
        out += [notes.strip(), ""]
    out += ["## Machine", "", md_table(["", ""], [[k, v] for k, v in machine().items()]), ""]
    out += ["## Versions", "", md_table(["tool", "version"],
                                        [[k, v] for k, v in versions().items()]), ""]
    out += ["## Exact commands", "",
            ("Paths are this run's; `stillpoint` is `python -m appliance.cli` of this checkout "
            "with `STILLPOINT_PROFILE` set. Secrets come from 0600 files: "
            "`RESTIC_PASSWORD_FILE`, `BORG_PASSCOMMAND=cat <file>`, curl's `-K <file>` (the "
            "session cookie)."), "", "```"]
    out += [f"# {label}\n{cmd}" for label, cmd in res.commands.items()]
    out += ["```", ""]
    return "\n".join(out)


def write(path: Path, text: str) -> None:
    path.write_text(text)


def as_json(res: Results) -> dict[str, Any]:
    return {"samples": res.samples, "facts": res.facts, "commands": res.commands}
