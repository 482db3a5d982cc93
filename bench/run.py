"""`python -m bench.run` (`make bench`): run the benchmark, print the table, write RESULTS.md.

    python -m bench.run                       # 2 GiB and 8 GiB disks, 3 repetitions
    python -m bench.run --sizes 256 --reps 1 --out /tmp/r.md     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench import report
from bench.scenario import BenchConfig, Results, run_bench

HERE = Path(__file__).resolve().parent
NOTES = HERE / "NOTES.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192", help="disk sizes in MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every timed figure")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/stillpoint-bench"),
                    help="scratch area (content cache, lab, repositories)")
    ap.add_argument("--lab-id", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-peer-checks", action="store_true",
                    help="skip restic's and borg's own full checks")
    ap.add_argument("--render", type=Path, metavar="RESULTS.json",
                    help="do not measure: render the tables of an earlier run again")
    args = ap.parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        cfg = BenchConfig(**{k: tuple(tuple(c) for c in v) if k == "changes" else
                             tuple(v) if k == "sizes_mib" else v
                             for k, v in doc["config"].items() if k != "work"})
        res = Results(doc["samples"], doc["facts"], doc["commands"])
        return _write(res, cfg, args.out)
    if os.geteuid() != 0:
        print("bench: the lab needs root (QEMU, taps on a bridge, loop devices)", file=sys.stderr)
        return 2
    cfg = BenchConfig(sizes_mib=tuple(int(s) for s in args.sizes.split(",")), reps=args.reps,
                      work=args.work, lab_id=args.lab_id, peer_checks=not args.no_peer_checks)
    res = run_bench(cfg, say=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    doc = report.as_json(res)
    doc["config"] = {"sizes_mib": cfg.sizes_mib, "reps": cfg.reps, "lab_id": cfg.lab_id,
                     "changes": cfg.changes, "peer_checks": cfg.peer_checks}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return _write(res, cfg, args.out)


def _write(res: Results, cfg: BenchConfig, out: Path) -> int:
    print(report.render_text(res, cfg))
    notes = NOTES.read_text() if NOTES.exists() else ""
    report.write(out, report.render_markdown(res, cfg, notes))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
