"""``bmrs bench``: latency of the full and the compacted network, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._io import read_json, write_json
from ..deploy import BENCH, BENCH_FORMAT, RUNTIMES, benchmark
from ..errors import BMRSError
from ._common import Formatter, positive, say
from ._models import networks

def bench_file(path: Path) -> Path:
    """Where the figures of 'bmrs bench PATH' are recorded: RUN/bench.json, or FILE.bench.json."""
    if path.is_dir():
        return path / "bench.json"
    if path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file():
        return path.parent / "bench.json"
    return path.with_name(path.stem + ".bench.json")


def read_bench(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = read_json(file, BENCH)
    except (ValueError, OSError):
        return None
    return data if data.get("format") == BENCH_FORMAT else None


def print_bench(data: dict, indent: str = "") -> None:
    nets = data["networks"]
    say(f"{indent}full     {nets['full']['parameters']:,} parameters, {nets['full']['flops']:,} FLOPs per example")
    say(f"{indent}compact  {nets['compact']['parameters']:,} parameters, {nets['compact']['flops']:,} FLOPs per example "
         f"(FLOPs {data['flop_ratio']:.2f}x fewer, parameters {data['parameter_ratio']:.2f}x)")
    settings = data["settings"]
    say(f"{indent}measured {data['measured_at']}, {settings['threads']} thread(s), fastest of {settings['repeats']} "
         f"interleaved repetitions, load average {data['machine']['load_average_before']} before, "
         f"{data['machine']['load_average_after']} after")
    say(f"{indent}| runtime | batch | full ms | compact ms | full/compact | FLOP ratio | settings (full; compact) |")
    say(f"{indent}|---|---|---|---|---|---|---|")
    for r in data["results"]:
        say(f"{indent}| {r['runtime']} | {r['batch']} | {r['full_ms']:.4f} | {r['compact_ms']:.4f} | "
             f"{r['ratio']:.2f} | {data['flop_ratio']:.2f} | {r['full_setting']}; {r['compact_setting']} |")
    for g in data["deployment_gain"]:
        say(f"{indent}deployment gain at batch {g['batch']}: eager full {g['eager_full_ms']:.4f} ms / compact in "
             f"{g['runtime']} {g['compact_ms']:.4f} ms = {g['gain']:.2f}x")


def run(args) -> int:
    positive("--threads", args.threads)
    positive("--repeats", args.repeats)
    positive("--warmup", args.warmup, 0)
    for b in args.batch:
        positive("--batch", b)
    path = Path(args.source)
    record = bench_file(path)
    if record.exists() and read_bench(record) is None:
        raise BMRSError(f"{record} exists and was not written by 'bmrs bench'; it is left alone: move it away first")
    small, full, architecture, _, source = networks(path, args.data_dir, need_full=True)
    data = benchmark(full, small, architecture["input_shape"], batches=args.batch, runtimes=args.runtime,
                     threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    data["source"] = str(path)
    data["full_network"] = source
    say(f"bmrs bench {path}: {architecture['name']}; full network: {source}")
    print_bench(data)
    write_json(data, record)
    say(f"wrote {record}")
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs bench``."""
    p = commands.add_parser(
        "bench", formatter_class=Formatter,
        help="latency of the full and the compacted network, side by side, per runtime",
        description="Time the full network (a run's gated model with E[theta] folded in and nothing removed;\n"
        "for a compacted file, its architecture at full width with random weights) and the compacted\n"
        "one, in each runtime, at each batch size, interleaved (a new random order every repetition;\n"
        "the fastest repetition counts), with BatchNorm folded into the convolutions of both:\n"
        "  eager        PyTorch, no_grad\n"
        "  compile      torch.compile (needs a C++ compiler)\n"
        "  onnxruntime  the ONNX export, all graph optimisations (needs the extra bmrs[onnx])\n"
        "Prints parameters, FLOPs and the table of latencies and full/compact ratios, and the\n"
        "deployment gain (eager full vs compact in its fastest runtime). The figures are written\n"
        "to RUN/bench.json (FILE.bench.json beside a file); 'bmrs info' shows them.",
        epilog="example: bmrs bench runs/demo --batch 1 256 --runtime eager compile onnxruntime",
    )
    p.add_argument("source", metavar="RUN_OR_FILE", help="run directory, its model.pt / checkpoint.pt, or a compacted model file")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="runtimes")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every runtime")
    p.add_argument("--repeats", type=int, default=50, help="timed repetitions per network, runtime and batch")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=run)
