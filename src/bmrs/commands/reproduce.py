"""``bmrs reproduce``: run an experiment suite, then report it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments import suites
from ..reporting.diagnostics import diagnostic_methods
from ..reporting.paper import SUITE_PAPERS
from ._common import Formatter, out_path, positive, say, wrap
from .report import write_report_dir

def _suites_epilog() -> str:
    lines = ["suites:"]
    for name, (description, seeds, _) in suites.SUITES.items():
        lines.append(f"  {name:<14} {description} (default {seeds} seeds)")
    return "\n".join(lines)


def run(args) -> int:
    positive("--seeds", args.seeds)
    positive("--jobs", args.jobs)
    out = Path(args.out)
    run_dirs = suites.run_suite(args.suite, out, seeds=args.seeds, jobs=args.jobs, progress=not args.no_progress)
    say(f"suite {args.suite}: {len(run_dirs)} runs under {out}")
    # the suite's own report folder: bmrs made the suite directory, so its report is rewritten
    write_report_dir([out], out / "report", paper=SUITE_PAPERS.get(args.suite), analysis=True, force=True)
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs reproduce``."""
    p = commands.add_parser(
        "reproduce", parents=[parents["progress"]], formatter_class=Formatter,
        help="run an experiment suite, then report it",
        description="Run every run of SUITE under OUT (complete runs are skipped, interrupted ones\n"
        "resume), then write the report of OUT into OUT/report as 'bmrs report OUT --out\n"
        "OUT/report' does, and in addition:\n"
        "  comparison.md, comparison.json  ours beside the paper's Table 1, and our summary as\n"
        "  paper-fmnist.json               in the paper (paper-fmnist only)\n"
        "  knees.md, knees.json            BMRS stopping points of the sweeps against the knees\n"
        "                                  of the accuracy-vs-compression curves\n"
        "  diagnostics.md, diagnostics.csv the gates of the lowest-seed runs of each of\n"
        "  posteriors_*.png, delta-f_*.png " + wrap(", ".join(diagnostic_methods()) + ", per model", 54, 34),
        epilog=_suites_epilog() + "\n\nexample: bmrs reproduce quick --out runs/quick --jobs 2",
    )
    p.add_argument("suite", choices=tuple(suites.SUITES), metavar="SUITE", help=f"one of {', '.join(suites.SUITES)}")
    p.add_argument("--out", metavar="DIR", type=out_path, required=True, help="suite directory")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.set_defaults(func=run)
