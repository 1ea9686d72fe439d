"""The closing summary of ``make demo``: what its runs, sweep and compaction showed.

``make demo`` writes three training runs and a sweep into one directory::

    unpruned/     bmrs train --method none        (gates trained, nothing removed)
    bmrs/         bmrs train                      (the recommended defaults)
    l2-matched/   bmrs train --method l2 --match bmrs/   (a baseline at BMRS's compression)
    sweep/        bmrs sweep --run unpruned/      (post-training pruning of its last epoch)
    report/       bmrs report

and then ``python -m bmrs.experiments.demo DIR`` prints what they show, read from their
files: accuracy and compression of the three runs, where each BMRS criterion of the sweep
stopped against the knee of its accuracy-vs-compression curve, the compacted network's size
and its latency measured against the gated model it came from, and the files to open.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .._io import read_json
from ..compaction import load_compact
from ..reporting.knees import curves_from_sweep, knee
from .runs import load_run
from ..rundir import METRICS, SWEEP, read_config

__all__ = ["demo_summary", "measure_latency"]

RUNS = (("unpruned", "unpruned (gates trained, nothing removed)"),
        ("bmrs", "BMRS, the recommended settings"),
        ("l2-matched", "L2 baseline at BMRS's compression"))


def measure_latency(first: torch.nn.Module, second: torch.nn.Module, inputs: torch.Tensor, *,
                    repeats: int = 30, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of one forward pass of each model on ``inputs``, timed interleaved
    (first, second, first, ...) so that a change in the machine's load hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for model in (first, second):
            model.eval()
            for _ in range(warmup):
                model(inputs)
        for _ in range(repeats):
            for model, sink in zip((first, second), times):
                began = time.perf_counter()
                model(inputs)
                sink.append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def _method(config: dict) -> str:
    method = config["method"]
    if method == "bmrs-u":
        method += f"{config['bits']:g}"
    return f"{method}, KL {config['kl_reduction']}"


def _runs_section(root: Path) -> tuple[list[str], dict]:
    results = {}
    for name, _ in RUNS:
        if (root / name / "metrics.json").is_file():
            results[name] = (read_config(root / name / "config.json"), read_json(root / name / "metrics.json", METRICS))
    if not results:
        return [], results
    lines = ["1. Pruning while training (test accuracy; share of the parameters removed):"]
    for name, description in RUNS:
        if name not in results:
            continue
        config, metrics = results[name]
        label = f"{description} [{_method(config)}]"
        lines.append(f"   {label:<66} {_pct(metrics['test_accuracy'])}   {_pct(metrics['parameter_compression'])} removed")
    if "unpruned" in results and "bmrs" in results:
        base = results["unpruned"][1]["test_accuracy"]
        bmrs = results["bmrs"][1]
        text = (f"   -> BMRS removed {_pct(bmrs['parameter_compression']).strip()} of the parameters at "
                f"{100 * (bmrs['test_accuracy'] - base):+.2f} points of accuracy")
        if "l2-matched" in results:
            l2 = results["l2-matched"][1]
            text += f"; L2, made to remove as much, {100 * (l2['test_accuracy'] - base):+.2f} points"
        lines.append(text + ".")
    return lines, results


def _sweep_section(root: Path) -> list[str]:
    path = root / "sweep" / "sweep.json"
    if not path.is_file():
        return []
    sweep = read_json(path, SWEEP)
    config = sweep["config"]
    epoch = config.get("epoch")
    which = "last epoch" if Path(config["run"]).name == "checkpoint.pt" else "best validation epoch"
    swept = f"epoch {epoch} of {config.get('epochs')}, its {which}" if epoch is not None else f"its {which}"
    lines = [f"2. Pruning after training: the unpruned run ({swept}, {_pct(sweep['model_accuracy']).strip()}) cut to",
             "   16 compression levels by each criterion, no fine-tuning. Where each criterion stops",
             "   by itself (BMRS: delta F >= its margin; SNR, E[theta]: their thresholds) and the knee of its curve:",
             f"   {'criterion':<12} {'stops at (removed, accuracy)':<30} {'knee of its curve':<22}"]
    for name, curve in curves_from_sweep(sweep["records"]).items():
        if curve["stop"] is None:
            continue
        comp, acc = curve["stop"]
        knee_text = "-"
        found = knee(curve["compression"], curve["accuracy"]) if len(set(curve["compression"])) >= 3 else None
        if found is not None:  # Kneedle finds none on a curve without a bend
            knee_text = f"{_pct(found[0])}, {_pct(found[1])}"
        lines.append(f"   {name:<12} {_pct(comp) + ', ' + _pct(acc):<30} {knee_text}")
    lines.append("   (l2 and random have no stopping rule: they need a compression target.)")
    return lines


def _compaction_section(root: Path, results: dict, repeats: int) -> list[str]:
    if "bmrs" not in results:
        return []
    info = results["bmrs"][1].get("compaction") or {}
    if "parameters_after" not in info:
        return []
    gated = load_run(root / "bmrs").model
    small = load_compact(root / "bmrs" / info["file"])
    inputs = torch.randn(256, *info["architecture"]["input_shape"], generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        slow, fast = measure_latency(gated, small, inputs, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    widths = ", ".join(f"{n} {info['widths_before'][n]} -> {info['widths_after'][n]}"
                       for n in info["widths_after"] if info["widths_before"].get(n) != info["widths_after"][n])
    return [
        f"3. The compacted network ({root / 'bmrs' / info['file']}): a plain torch network without the removed",
        f"   structures ({widths}).",
        f"   parameters {info['parameters_before']:,} -> {info['parameters_after']:,} "
        f"({info['parameters_before'] / max(info['parameters_after'], 1):.1f}x fewer); FLOPs per example "
        f"{info['flops_before']:,} -> {info['flops_after']:,}",
        f"   measured, a batch of 256 on 1 thread: {1e3 * slow:.2f} ms gated, {1e3 * fast:.2f} ms compacted "
        f"({slow / fast:.1f}x faster; median of {repeats}, timed interleaved)",
    ]


def demo_summary(root: str | Path, *, repeats: int = 30) -> str:
    """The summary of a ``make demo`` directory (see the module docstring)."""
    root = Path(root)
    runs, results = _runs_section(root)
    sections = [runs, _sweep_section(root), _compaction_section(root, results, repeats)]
    opened = [
        (root / "report" / "accuracy_vs_compression.png",
         "accuracy vs compression: the sweep's curves (BMRS in colour, baselines grey and dashed), "
         "stopping points as stars, the trained runs as large markers"),
        (root / "report" / "widths.png", "kept structures per layer of each trained run"),
        (root / "report" / "results.md", "the tables"),
        (root / "bmrs" / "metrics.json", "the BMRS run, epoch by epoch ('history')"),
    ]
    files = ["4. Open:"] + [f"   {path}  {what}" for path, what in opened if path.exists()]
    return "\n\n".join("\n".join(s) for s in [*sections, files] if s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmrs.experiments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", metavar="DIR", help="the directory make demo wrote (default demo-out)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes of each model")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"{parser.prog}: error: {args.root} is not a directory", file=sys.stderr)
        return 2
    print(demo_summary(args.root, repeats=args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
