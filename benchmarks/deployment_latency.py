"""Deployment latency: the full and the compacted network in eager PyTorch, torch.compile and
onnxruntime, side by side, with the deployment gain and (optionally) per-operator profiles.

For each bundled model: gates with random posteriors, masks that keep the same fraction of
every layer's structures (the largest fraction whose compacted network has at most
1 - --flops-removed of the FLOPs, as benchmarks/compaction_latency.py chooses them), then
bmrs.deploy.benchmark on the full network (E[theta] folded in, nothing removed) and the
compacted one: BatchNorm folded into the convolutions of both, each network in the fastest
setting of each runtime, every (runtime, network) pair timed interleaved in one run.

Prints per model the table of latencies, full/compact within each runtime beside the FLOP
ratio (and that ratio over the FLOP ratio), and the deployment gain: eager full network
over the compacted network in its fastest runtime. --profile adds, at the largest batch,
the operators that take the time in eager PyTorch (torch.profiler) and in onnxruntime
(its own profiler), for both networks.

    python benchmarks/deployment_latency.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compaction_latency import SHAPES, check_args, gated_model, masks_for_flops  # noqa: E402

from bmrs.compaction import compact  # noqa: E402
from bmrs.deploy import RUNTIMES, benchmark, full_network, prepare  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["mlp", "lenet5", "resnet"],
                        help="bundled models (default: all three; resnet is ResNet-20 of width 16)")
    parser.add_argument("--flops-removed", type=float, default=0.8, help="share of the FLOPs removed (default 0.8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes (default 1 256)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="runtimes (default all)")
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (default 1)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions (default 50; resnet: a fifth)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and posteriors")
    parser.add_argument("--round-to", type=int, default=None, metavar="N",
                        help="round every kept width to the nearest multiple of N (bmrs compact --round-to)")
    parser.add_argument("--profile", action="store_true", help="per-operator profiles at the largest batch")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write all figures to FILE")
    return check_args(parser, parser.parse_args(argv))


def networks(name: str, removed: float, seed: int, round_to: int | None = None):
    model = gated_model(name, seed)
    example = torch.zeros(1, *SHAPES[name])
    full = full_network(model, example)
    masks_for_flops(model, example, removed, "first", seed, round_to)
    return full, compact(model, example)


def widths(net) -> list[int]:
    """Output widths of the network's linear and convolutional layers, the last (the classes) left out."""
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels for m in layers[:-1]]


def eager_profile(net, x, rows: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(3):
            net(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                net(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def ort_profile(net, x, threads: int, level: str, rows: int = 6) -> str:
    from bmrs.deploy import _onnx_bytes, _ort

    ort = _ort()
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(_onnx_bytes(net, x), options, providers=["CPUExecutionProvider"])
        for _ in range(8):
            session.run(None, {"input": x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 8 / 1e3
    total = sum(per_op.values())
    lines = [f"    {op:<28} {ms:9.3f} ms  {100 * ms / total:5.1f} %" for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines[:rows]) + f"\n    {'all operators':<28} {total:9.3f} ms"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}, FLOPs removed >= {args.flops_removed:.0%}")
    everything = {}
    for name in args.models:
        full, small = networks(name, args.flops_removed, args.seed, args.round_to)
        repeats = max(5, args.repeats // 5) if name == "resnet" else args.repeats
        data = benchmark(full, small, SHAPES[name], batches=args.batches, runtimes=args.runtimes,
                         threads=args.threads, repeats=repeats, warmup=args.warmup, seed=args.seed)
        everything[name] = data
        flop = data["flop_ratio"]
        print(f"\n{name}: parameters {data['networks']['full']['parameters']:,} -> {data['networks']['compact']['parameters']:,}, "
              f"FLOPs/example {data['networks']['full']['flops']:,} -> {data['networks']['compact']['flops']:,} "
              f"(FLOP ratio {flop:.2f}), compact widths {'-'.join(map(str, widths(small)))}, {repeats} repetitions, "
              f"load average {data['machine']['load_average_before'][0]} "
              f"-> {data['machine']['load_average_after'][0]}")
        print("| runtime | batch | full ms | compact ms | full/compact | / FLOP ratio | settings (full; compact) |")
        print("|---|---|---|---|---|---|---|")
        for r in data["results"]:
            print(f"| {r['runtime']} | {r['batch']} | {r['full_ms']:.4f} | {r['compact_ms']:.4f} | {r['ratio']:.2f} | "
                  f"{r['ratio'] / flop:.2f} | {r['full_setting']}; {r['compact_setting']} |")
        for g in data["deployment_gain"]:
            print(f"deployment gain, batch {g['batch']}: eager full {g['eager_full_ms']:.4f} ms / compact in "
                  f"{g['runtime']} {g['compact_ms']:.4f} ms = {g['gain']:.2f}x")
        if args.profile:
            batch = max(args.batches)
            x = torch.randn(batch, *SHAPES[name])
            for key, net in (("full", full), ("compact", small)):
                ready = prepare(net, x[:1])
                if "eager" in args.runtimes:
                    print(f"\n{name} {key}, eager (default settings), batch {batch}, 5 calls:")
                    print(eager_profile(ready, x))
                if "onnxruntime" in args.runtimes:
                    for level in ("all", "extended"):
                        print(f"{name} {key}, onnxruntime level {level}, batch {batch}, per call:")
                        print(ort_profile(ready, x, args.threads, level))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2) + "\n")


if __name__ == "__main__":
    main()
