"""The benchmark's smoke variant: a tiny disk, one repetition, every figure produced and the
report well-formed. It keeps `make bench` from rotting; it asserts no timings.

The bench VM is a QEMU VM without an OS (one boot of SeaBIOS, nothing to wait for); the
changes of the incremental go through the hypervisor's block layer, and the incremental must
read them (and little else) through CBT. Its own lab: STILLPOINT_BENCH_LAB_ID (default 3,
the bench's; never the id of the session's lab, whose VMs a bench lab's teardown would
stop)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import report
from bench.scenario import TOOLS, BenchConfig, Results, run_bench

SIZE = 128
CHANGES = ((0.01, "scattered"),)


@pytest.fixture(scope="module")
def smoke() -> Iterator[tuple[Results, BenchConfig]]:
    if os.geteuid() != 0:
        pytest.skip("the benchmark's lab needs root (QEMU, taps on a bridge, loop devices)")
    # Not under pytest's 0700 tmp: the content recipe runs initdb as the postgres user.
    work = Path(tempfile.mkdtemp(prefix="stillpoint-bench-smoke-", dir="/var/tmp"))
    work.chmod(0o755)
    cfg = BenchConfig(sizes_mib=(SIZE,), reps=1, work=work, changes=CHANGES,
                      lab_id=int(os.environ.get("STILLPOINT_BENCH_LAB_ID", "3")))
    try:
        res = run_bench(cfg, say=lambda m: print(f"bench: {m}", flush=True))
        print("bench smoke figures:", json.dumps(
            {k: v for k, v in res.samples.items() if ":full:" in k or ":inc" in k}))
        yield res, cfg
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(900)
def test_every_figure_is_measured(smoke: tuple[Results, BenchConfig]) -> None:
    res, cfg = smoke
    figures = [f"{SIZE}:full:{t}:{m}" for t in TOOLS for m in ("wall", "cpu_per_gib", "rss_mib")]
    for fraction, pattern in CHANGES:
        kind = f"inc{round(fraction * 100)}%{pattern}"
        figures += [f"{SIZE}:{kind}:{t}:wall" for t in ("stillpoint", "restic", "borg")]
        figures.append(f"{SIZE}:{kind}:stillpoint:bytes_read")
    figures += [f"{SIZE}:restore:{t}:wall" for t in TOOLS]
    figures += [f"{SIZE}:check:{t}:gib_per_s" for t in ("stillpoint", "restic", "borg")]
    for figure in figures:
        assert len(res.samples.get(figure, [])) == cfg.reps, figure
        assert all(v > 0 for v in res.samples[figure]), figure
    for tool in ("stillpoint", "restic", "borg"):
        assert res.facts[f"{SIZE}:repo_bytes:{tool}"] > 0
    # Every restore wrote the disk exactly as it is.
    assert all(res.facts[f"{SIZE}:restore_identical:{t}"] for t in TOOLS)
    assert res.facts[f"{SIZE}:backups"] == 1 + len(CHANGES)   # the same chain for every tool
    # An incremental reads what changed (CBT, the VM's dirty bitmaps, saw the writes made
    # through the hypervisor), not the disk.
    inc = res.samples[f"{SIZE}:inc1%scattered:stillpoint:bytes_read"][0]
    changed = res.samples[f"{SIZE}:inc1%scattered:changed"][0]
    assert changed <= inc < res.samples[f"{SIZE}:full:stillpoint:bytes_read"][0] / 10
    assert res.samples[f"{SIZE}:inc1%scattered:change_calls"][0] >= 1


def test_report_is_well_formed(smoke: tuple[Results, BenchConfig]) -> None:
    res, cfg = smoke
    md = report.render_markdown(res, cfg)
    for section in ("## Targets", "## Full backup", "## Incremental", "## Restore",
                    "## Repository size", "## Full repository check", "## Machine",
                    "## Versions", "## Exact commands"):
        assert section in md, section
    tables = re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.MULTILINE)
    assert len(tables) >= 8
    for table in tables:
        lines = table.strip("\n").split("\n")
        assert re.fullmatch(r"\|(---\|)+", lines[1]), lines[1]
        cells = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
        assert len(cells) == 1, table           # every row as wide as its header
    body = md.split("## Machine")[0]
    assert "not measured" not in body and "| - |" not in body
    for cmd in ("curl", "stillpoint backup", "restic", "borg create", "check --read-data"):
        assert cmd in md.split("## Exact commands")[1], cmd
    text = report.render_text(res, cfg)
    assert "MISSED" in text or "met" in text
