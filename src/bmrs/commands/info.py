"""``bmrs info``: layer widths, parameters, FLOPs and the last measured latency of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..compaction import count_flops, count_parameters
from ..experiments.runs import layer_widths
from ..gates import gates, layer_names
from ..reporting.collect import natural_key
from ._common import Formatter, say, set_threads
from ._models import describe_compact, load_run_model
from .bench import bench_file, print_bench, read_bench

def _describe_gated(path: Path, data_dir) -> dict:
    _, model, architecture, _, _ = load_run_model(path, data_dir)
    shape = [1, *architecture["input_shape"]]
    layer = layer_names(model)
    return {
        "file": str(path), "kind": "gated (not compacted)", "architecture": architecture,
        "widths": layer_widths(model),
        "kept": {layer[name]: f"{int(g.mask.sum())}/{g.num_structures}" for name, g in gates(model).items()},
        "parameters": count_parameters(model), "flops": count_flops(model, torch.zeros(shape)), "input_shape": shape,
    }


def run(args) -> int:
    set_threads(args)
    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        info = describe_compact(path / "compact.pt") if (path / "compact.pt").is_file() else _describe_gated(path, args.data_dir)
    elif path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file():
        info = _describe_gated(path, args.data_dir)
    else:
        info = describe_compact(path)
    bench = read_bench(bench_file(path))
    if bench is not None:
        info["bench"] = bench
    if args.json:
        say(json.dumps(info, indent=2, sort_keys=True))
        return 0
    arch = info["architecture"]
    say(f"{info['file']}: {info['kind']} model")
    if arch is not None:
        say(f"architecture  {arch['name']}, {arch['num_classes']} classes, options {arch['options'] or '{}'}")
    say("layer widths:")
    for name in sorted(info["widths"], key=natural_key):
        say(f"  {name:<24} {info['widths'][name]}")
    if info.get("kept"):
        say("kept structures per layer: " + ", ".join(f"{n}: {k}" for n, k in sorted(info["kept"].items(), key=lambda kv: natural_key(kv[0]))))
    say(f"parameters    {info['parameters']:,}")
    if info["flops"] is not None:
        say(f"FLOPs         {info['flops']:,} (one forward pass, input shape {tuple(info['input_shape'])})")
    else:
        say("FLOPs         unknown (saved without an architecture description)")
    if bench is not None:
        say(f"last measured latency ('bmrs bench', {bench_file(path)}):")
        print_bench(bench, indent="  ")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs info``."""
    p = commands.add_parser(
        "info", parents=[parents["threads"]], formatter_class=Formatter,
        help="layer widths, parameters and FLOPs of a compacted model or a run",
        description="Describe a compacted model file, or a run directory (its compact.pt if there is\n"
        "one, else its gated model): layer widths, parameter count and FLOPs of one forward\n"
        "pass of one example, with the input shape used.",
        epilog="example: bmrs info runs/demo/compact.pt",
    )
    p.add_argument("file", metavar="FILE", help="compacted model file or run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=run)
