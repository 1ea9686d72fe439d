"""CPU latency of a gated model before and after compaction.

For each model: attach gates (random posteriors), choose masks that remove at least a target
share of the FLOPs (keep the same fraction of every layer's structures, the largest fraction
that reaches the target), then time, with interleaved repetitions in one run:

  (a) the gated model in eval mode with every mask 1 (the network before pruning),
  (b) the same gated model with the masks (pruned, but not compacted),
  (c) the compacted model from bmrs.compaction.compact,
  (d) for reference, the network of (a) without its gates (what the gates' own work costs).

Prints median latencies, the ratios a/c, b/c and d/c, and the parameter and FLOP ratios.

    python benchmarks/compaction_latency.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time

import torch

from bmrs import detach_gates, gate_layout, gates
from bmrs.compaction import compact, count_flops, count_parameters
from bmrs.models import build_model
from bmrs.pruning import round_width, set_masks

SHAPES = {"lenet5": (1, 32, 32), "mlp": (1, 32, 32), "resnet": (3, 32, 32)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["lenet5"],
                        help="bundled models to time (default: lenet5); input shapes: %s" % SHAPES)
    parser.add_argument("--flops-removed", type=float, default=0.8,
                        help="share of the FLOPs the masks must remove (default 0.8)")
    parser.add_argument("--mask-order", choices=["first", "random"], default="first",
                        help="which structures each layer keeps: the first k, or k at random (default first)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes (default 1 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=200, help="timed repetitions per model and batch (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per model before timing (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, posteriors and random masks")
    return check_args(parser, parser.parse_args(argv))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The checks of the options both latency benchmarks share."""
    if not 0.0 < args.flops_removed < 1.0:
        parser.error("--flops-removed must lie strictly between 0 and 1")
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or min(args.batches) < 1:
        parser.error("--threads, --repeats and --batches must be positive, --warmup non-negative")
    return args


def gated_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = {"depth": 20, "width": 16} if name == "resnet" else {}
    model = build_model(name, SHAPES[name], 10, **options)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.loc.uniform_(-3.0, 0.0)
            gate.log_scale.uniform_(-3.0, 1.0)
    return model.eval()


def keep_fraction(model: torch.nn.Module, fraction: float, order: str, seed: int, round_to: int | None = None) -> None:
    """Masks keeping ceil(fraction * size) slots (at least one) of every family; with
    ``round_to``, that count moved to the nearest multiple (``bmrs.pruning.round_width``)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {name: torch.ones(g.num_structures, dtype=torch.bool) for name, g in gates(model).items()}
    for family in gate_layout(model).families:
        k = max(1, math.ceil(fraction * family.size))
        if round_to is not None:
            k = round_width(k, family.size, round_to)
        slots = torch.arange(family.size) if order == "first" else torch.randperm(family.size, generator=generator)
        keep = torch.zeros(family.size, dtype=torch.bool)
        keep[slots[:k]] = True
        for name, idx in family.members:
            masks[name][torch.as_tensor(idx)] = keep
    set_masks(model, masks)


def masks_for_flops(model: torch.nn.Module, example: torch.Tensor, removed: float, order: str, seed: int,
                    round_to: int | None = None):
    """The largest keep fraction (to 1e-3) whose compacted model has <= (1 - removed) of the
    FLOPs (widths rounded with ``round_to``; if even the smallest rounded widths have more
    FLOPs, those)."""
    full = count_flops(model, example)
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        keep_fraction(model, mid, order, seed, round_to)
        if count_flops(compact(model, example, check=False), example) <= (1.0 - removed) * full:
            lo = mid
        else:
            hi = mid
    keep_fraction(model, lo, order, seed, round_to)
    return lo


def time_models(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward pass, models interleaved (order rotated every repetition)."""
    calls = max(1, 32 // x.shape[0])  # several calls per sample for tiny batches
    names = list(models)
    samples = {n: [] for n in names}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for rep in range(repeats):
            for k in range(len(names)):
                name = names[(rep + k) % len(names)]
                start = time.perf_counter()
                for _ in range(calls):
                    models[name](x)
                samples[name].append((time.perf_counter() - start) / calls)
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, warm-up {args.warmup}, "
          f"masks: keep the {args.mask_order} k of each layer, FLOPs removed >= {args.flops_removed:.1%}")
    rows = []
    for name in args.models:
        original = gated_model(name, args.seed)
        example = torch.zeros(1, *SHAPES[name])
        pruned = copy.deepcopy(original)
        fraction = masks_for_flops(pruned, example, args.flops_removed, args.mask_order, args.seed)
        compacted = compact(pruned, example)
        params = count_parameters(original) / count_parameters(compacted)
        flops = count_flops(original, example) / count_flops(compacted, example)
        print(f"{name}: keep fraction {fraction:.3f}, parameters {count_parameters(original)} -> "
              f"{count_parameters(compacted)}, FLOPs/example {count_flops(original, example)} -> "
              f"{count_flops(compacted, example)}")
        if 1.0 / flops > 1.0 - args.flops_removed:
            print(f"{name}: cannot remove {args.flops_removed:.1%} of the FLOPs with one structure left per layer")
        plain = copy.deepcopy(original)
        detach_gates(plain)
        models = {"a": original, "b": pruned, "c": compacted, "d": plain}
        for batch in args.batches:
            x = torch.randn(batch, *SHAPES[name], generator=torch.Generator().manual_seed(args.seed))
            t = time_models(models, x, args.repeats, args.warmup)
            rows.append([name, batch] + [t[k] * 1e3 for k in "abcd"] + [t[k] / t["c"] for k in "abd"] + [params, flops])
    header = ["model", "batch", "a: gated ms", "b: masked ms", "c: compact ms", "d: no gates ms",
              "a/c", "b/c", "d/c", "params a/c", "FLOPs a/c"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, batch, *numbers in rows:
        cells = [f"{v:.4f}" for v in numbers[:4]] + [f"{v:.2f}" for v in numbers[4:]]
        print(f"| {name} | {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
