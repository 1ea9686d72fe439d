"""``bmrs compact``: a run's pruned model as a smaller plain network."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BMRSError
from ..experiments.runs import compact_to_file
from ..experiments.sweep import parse_criteria
from ..pruning import make_criterion, parse_budget, prune, round_widths, set_masks
from ..reporting.collect import natural_key
from ..rundir import is_run_file, run_files
from ._common import Formatter, out_path, positive, say, set_threads
from ._models import load_run_model

def _width_lines(before: dict, after: dict) -> list[str]:
    return [f"  {name:<24} {before.get(name, '?'):>6} -> {after.get(name, '?')}" for name in sorted(set(before) | set(after), key=natural_key)]


def _order_criterion(config, args, flag: str):
    """The criterion (and its label) that orders the structures for --budget and --round-to."""
    text = args.criterion or (config.method if config.method != "none" else None)
    if text is None:
        raise BMRSError(f"this run has no pruning method (--method none): give --criterion with {flag}")
    if text == "bmrs-u" and args.criterion is None:
        text = f"bmrs-u{config.bits:g}"
    (_, name, options), = parse_criteria(text)
    return text, make_criterion(name, **options)


def _apply_budget(model, config, args, example) -> None:
    """Prune ``model`` further until ``--budget`` holds; print what the evidence and the budget prune."""
    budget = parse_budget(args.budget)
    text, criterion = _order_criterion(config, args, "--budget")
    result = prune(model, criterion, budget=budget, example_input=example[:1], keep_pruned=True)
    say(f"budget with {text} (structures the run pruned stay pruned):")
    for line in result.summary().splitlines():
        say(f"  {line}")


def _apply_rounding(model, config, args) -> None:
    """Round every kept width to a multiple of ``--round-to``; print what it cost in evidence."""
    text, criterion = _order_criterion(config, args, "--round-to")
    result = round_widths(model, criterion, args.round_to)
    set_masks(model, result.masks)
    say(f"widths rounded to multiples of {args.round_to} in the order of {text}:")
    for line in result.summary().splitlines():
        say(f"  {line}")


def run(args) -> int:
    set_threads(args)
    out = Path(args.out)
    if out.is_dir():
        raise BMRSError(f"--out {out} is a directory; give a file name such as {out / 'compact.pt'}")
    if args.criterion is not None and args.budget is None and args.round_to is None:
        raise BMRSError("--criterion applies with --budget or --round-to only")
    positive("--round-to", args.round_to)
    run_dir, state_file = run_files(Path(args.checkpoint))
    if is_run_file(out, [state_file]):
        raise BMRSError(f"--out {out} is a file of the run being compacted; choose another --out")
    if out.exists() and not args.force:
        raise BMRSError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    config, model, architecture, example, _ = load_run_model(Path(args.checkpoint), args.data_dir)
    if args.budget is not None:
        _apply_budget(model, config, args, example)
    if args.round_to is not None:
        _apply_rounding(model, config, args)
    info = compact_to_file(model, example, out, architecture)
    say(f"compacted {args.checkpoint} ({architecture['name']}) into {out}")
    say("layer widths (before -> after):")
    for line in _width_lines(info["widths_before"], info["widths_after"]):
        say(line)
    say(f"parameters  {info['parameters_before']:,} -> {info['parameters_after']:,}")
    say(f"FLOPs       {info['flops_before']:,} -> {info['flops_after']:,} (input {tuple(info['input_shape'])})")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs compact``."""
    p = commands.add_parser(
        "compact", parents=[parents["threads"]], formatter_class=Formatter,
        help="turn a run's pruned model into a smaller plain network",
        description="Rebuild a run's gated model, fold every gate's E[theta] * mask into the weights,\n"
        "delete the pruned structures and save the plain network (tensors + JSON metadata,\n"
        "loadable with bmrs.compaction.load_compact). Prints widths, parameters and FLOPs\n"
        "before and after. CHECKPOINT is a run directory, its model.pt or its checkpoint.pt\n"
        "(an unfinished run's last epoch); config.json must lie beside it.",
        epilog="example: bmrs compact runs/demo --out runs/demo-small.pt",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, model.pt or checkpoint.pt")
    p.add_argument("--budget", metavar="KIND=FRACTION", default=None,
                   help="prune further, in the order of the criterion's evidence, until at most FRACTION of the "
                   "full network's KIND remains (flops, params or latency; e.g. flops=0.2, or flops=0.2,params=0.3); "
                   "prints what delta F >= 0 prunes and what the budget needs")
    p.add_argument("--round-to", metavar="N", type=int, default=None,
                   help="then move every kept width to the nearest multiple of N (e.g. 8 or 16, the channel blocks of "
                   "CPU kernels; never to 0, at most the full width), in the order of the criterion; prints what "
                   "it cost in delta F")
    p.add_argument("--criterion", default=None,
                   help="criterion that orders the structures for --budget and --round-to (default: the run's method)")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.add_argument("--out", metavar="FILE", type=out_path, required=True, help="file to write")
    p.add_argument("--force", action="store_true", help="replace an existing FILE (never one of the run's own files)")
    p.set_defaults(func=run)
