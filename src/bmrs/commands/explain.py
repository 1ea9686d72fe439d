"""``bmrs explain``: the evidence behind a run's pruning decisions, and its calibration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import BMRSError
from ..calibration import DEFAULT_DRAWS
from ..experiments.analysis import explain_run
from ..reporting.evidence import CALIBRATION_ROWS, write_evidence
from ._common import Formatter, out_path, percent, positive, say, set_threads


def _refuse_foreign(out: Path, force: bool) -> None:
    names = ("explain.json", "explain.md", "evidence.png", "reliability.png")
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise BMRSError(f"{out} already holds {', '.join(existing)}; pass --force to replace them, or choose another --out")


def run(args) -> int:
    set_threads(args)
    positive("--draws", args.draws, 0)
    out = None if args.out is None else Path(args.out)
    if out is not None:
        _refuse_foreign(out, args.force)
    result = explain_run(args.run, criterion=args.criterion, budget=args.budget, draws=args.draws,
                         split=args.split, data_dir=args.data_dir)
    files = write_evidence(result, out) if out is not None else {}
    if args.json:
        say(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, sort_keys=True))
        return 0
    ev = result["evidence"]
    say(f"evidence of {result['run']} under {result['criterion']} "
        f"(delta F - margin in nats; >= 0 favours removing; |.| < {ev['ambiguity_nats']:g}: ambiguous)")
    say(result["table"])
    say(f"the evidence alone removes {ev['evidence_removes']} structures; {ev['ambiguous']} decisions are ambiguous; "
        f"most over-parameterised: {ev['most_overparameterised']}")
    if "budget" in result:
        say("budget:")
        for line in result["budget"]["summary"].splitlines():
            say(f"  {line}")
        say(f"  removed against the evidence {ev['removed_against']}, kept beyond it {ev['kept_beyond']}, "
            f"evidence spent {ev['evidence_spent']:.3g} nats")
    say(f"calibration on the {result['split']} set (ECE over 15 bins; NLL in nats per example):")
    for name, label in CALIBRATION_ROWS.items():
        c = result["calibration"].get(name)
        if c is not None:
            say(f"  {label:<48} accuracy {percent(c['accuracy']):>8}  NLL {c['nll']:.4f}  ECE {percent(c['ece'])}")
    for key, path in files.items():
        say(f"wrote {path}" if key == "json" else f"      {path}")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs explain``."""
    p = commands.add_parser(
        "explain", parents=[parents["threads"]], formatter_class=Formatter,
        help="the evidence behind a run's pruning decisions, and its calibration",
        description="Rebuild a run's gated model and say, per layer, what the evidence says of its\n"
        "decisions: kept/total, the quantiles of delta F - margin (nats) of the kept and the removed\n"
        "structures, the ambiguous decisions (|delta F - margin| < 1 nat: within a factor e of\n"
        "evidence), what the evidence alone removes, and the layer it finds most over-parameterised.\n"
        "With --budget, the run is first pruned further until the budget holds (as 'bmrs compact\n"
        "--budget' does) and the report says what the budget forced against the evidence and the\n"
        "evidence spent. Then the calibration (accuracy, NLL, expected calibration error over 15\n"
        "bins) of the unpruned model (masks cleared), the pruned gated model, the compacted one and\n"
        "the gates' Monte Carlo predictive (theta sampled --draws times, softmax averaged).\n"
        "With --out, also OUT/explain.json, explain.md, evidence.png (delta F - margin per structure,\n"
        "sorted, per layer) and reliability.png (reliability diagrams).",
        epilog="example: bmrs explain runs/demo --out runs/demo/explain",
    )
    p.add_argument("run", metavar="RUN", help="run directory, its model.pt or checkpoint.pt")
    p.add_argument("--criterion", default=None,
                   help="evidence criterion to explain with, e.g. bmrs-u8 (default: the run's method if it is one, "
                   "else the recommended bmrs-n-kr)")
    p.add_argument("--budget", metavar="KIND=FRACTION", default=None,
                   help="prune further until at most FRACTION of the full network's KIND remains (flops, params, "
                   "latency), and explain what that cost")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="draws of the Monte Carlo predictive (0: none)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split the calibration is measured on")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--out", metavar="DIR", type=out_path, default=None, help="also write the report and its figures here")
    p.add_argument("--force", action="store_true", help="replace the report files in OUT")
    p.set_defaults(func=run)
