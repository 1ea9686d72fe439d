"""``bmrs sweep``: post-training pruning of a trained run at many compression levels."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BMRSError
from ..experiments.sweep import DEFAULT_LEVELS, default_criteria, sweep_run
from ..pruning.criteria import CRITERIA
from ._common import Formatter, float_list, out_path, percent, positive, say, set_threads

def _swept_epoch(config: dict) -> str:
    """Which epoch a sweep pruned, in words."""
    epoch, epochs = config.get("epoch"), config.get("epochs")
    last = Path(config["run"]).name == "checkpoint.pt"
    which = "the last epoch" if last else "the best validation epoch"
    other = "--epoch best: the best validation epoch" if last else "--epoch last: the last epoch"
    if epoch is None:
        return f"{which} ({other})"
    return f"epoch {epoch}{f' of {epochs}' if epochs else ''}, {which} ({other})"


def run(args) -> int:
    set_threads(args)
    positive("--finetune-epochs", args.finetune_epochs, 0)
    levels = list(DEFAULT_LEVELS) if args.levels is None else args.levels
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if bad:
        raise BMRSError(f"--levels must lie in [0, 1], got {', '.join(f'{v:g}' for v in bad)}")
    out = Path(args.out)
    existing = [name for name in ("sweep.json", "sweep.csv") if (out / name).exists()]
    if existing and not args.force:
        raise BMRSError(f"{out} already holds {' and '.join(existing)}; pass --force to replace them, or choose another --out")
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    if args.epoch is not None and not Path(args.run).is_dir():
        raise BMRSError("--epoch applies to a run directory (a state file is the epoch it holds)")
    result = sweep_run(
        args.run, out, criteria=args.criteria, levels=levels,
        finetune_epochs=args.finetune_epochs, split=args.split, target_kind=args.target_kind,
        data_dir=args.data_dir, epoch=args.epoch or "last", progress=not args.no_progress,
    )
    config, records = result["run_config"], result["records"]
    say(f"sweep of {args.run} ({config['model']} on {config['dataset']}): {len(records)} points, "
         f"{len(result['config']['criteria'])} criteria x {len(result['config']['levels'])} levels")
    say(f"swept model: {_swept_epoch(result['config'])}, {args.split} accuracy {percent(result['model_accuracy'])}")
    stops = [r for r in records if r["kind"] == "stop"]
    if stops:
        say("stopping points (BMRS: delta F >= the criterion's margin; baselines: their threshold):")
        for r in stops:
            say(f"  {r['criterion']:<12} {percent(r['parameter_compression']):>9} of parameters  "
                 f"accuracy {percent(r['accuracy'])}")
    say(f"wrote {out / 'sweep.json'} and {out / 'sweep.csv'}")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs sweep``."""
    p = commands.add_parser(
        "sweep", parents=[parents["threads"], parents["progress"]], formatter_class=Formatter,
        help="post-training pruning of a trained run at many compression levels",
        description="Prune a trained run's last epoch (typically a --method none run: gated, unpruned)\n"
        "with each criterion to each compression level, optionally fine-tune, and measure the\n"
        "accuracy. Criteria with a stopping rule (BMRS: delta F >= 0; snr, etheta: threshold)\n"
        "also get that point (kind 'stop'). Writes OUT/sweep.json (settings, the run's\n"
        "configuration, records) and OUT/sweep.csv (the records).",
        epilog="example: bmrs sweep --run runs/none --criteria bmrs-n-code,bmrs-u8,l2 --out runs/none-sweep",
    )
    p.add_argument("--run", metavar="RUN_DIR", required=True,
                   help="a run directory (see --epoch), or one of its state files: checkpoint.pt (the last "
                   "epoch) or model.pt (the best validation epoch)")
    p.add_argument("--epoch", choices=("last", "best"), default=None,
                   help="which model of a run directory to prune: last (default: the network training ended "
                   "with, its gates settled; its checkpoint.pt) or best (the best validation epoch, its "
                   "model.pt, often an early one whose gates have not settled)")
    p.add_argument("--criteria", default=",".join(default_criteria()),
                   help="comma-separated criteria: " + ", ".join(c.label_syntax or n for n, c in CRITERIA.items()))
    p.add_argument("--levels", type=float_list, default=None,
                   help=f"comma-separated compression levels in [0, 1] (default: {','.join(f'{v:g}' for v in DEFAULT_LEVELS)})")
    p.add_argument("--target-kind", choices=("params", "structures"), default="params", help="what the levels count")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after each pruning (masks fixed)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split the accuracy is measured on")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing sweep.json and sweep.csv in OUT")
    p.add_argument("--out", metavar="DIR", type=out_path, required=True, help="directory to write sweep.json and sweep.csv into")
    p.set_defaults(func=run)
