"""Compress a trained network, head to head with Torch-Pruning, at the same MACs reduction
and the same budget of epochs.

1. A base network (a bundled CIFAR-style ResNet) is trained once with SGD on the data set and
   cached in OUT/base.pt (a plain state dict) with its accuracy in OUT/base.json.
2. For every target MACs reduction (default 2.1x, 2.5x and 4x) and every seed of the pruning
   phase, each method starts from a copy of the base network and gets the same --epochs over
   it, the same optimiser for the network's weights (SGD, momentum 0.9, learning rate
   --lr divided by 10 at 60 % and 80 % of each phase, weight decay 5e-4 outside sparse
   learning: Torch-Pruning's CIFAR fine-tuning recipe), the same data and augmentation
   (random crops of the zero-padded image, horizontal flips) and the same recovery
   fine-tuning of the pruned plain network:

   * bmrs-n, bmrs-u: gates attached so that the network is unchanged
     (bmrs.training.gate_trained), --gate-epochs of the ELBO (the gates' posteriors with
     Adam at bmrs.training.TRAINED_GATE_LR), then the budget
     (bmrs.pruning budget, flops = 1 / target) prunes in the order of delta F under BMRS_N
     or BMRS_U (8 bits), compaction removes, and the rest of the epochs fine-tune;
   * bmrs (no target, once per seed): the same, but pruning continuously with the
     recommended criterion (bmrs-n-kr, delta F >= -1) every --prune-every epochs and stopping
     where the evidence says: its own compression;
   * tp-l1, tp-l2, tp-taylor, random: Torch-Pruning's progressive global pruning
     (pruning_ratio 1, --tp-steps iterative steps, a step at a time until the MACs
     reduction reaches the target; Taylor with the gradient of one training batch before every
     step), then every epoch fine-tunes;
   * tp-bn-scale, tp-group-sl: sparse learning first (BNScalePruner with reg 1e-5,
     GroupNormPruner with reg 5e-4 and max-normalised group L2 importance, as in
     Torch-Pruning's ResNet-56 recipe) for --reg-epochs, then the same progressive pruning,
     then fine-tuning for the rest.

3. Every pruned network is measured: MACs and parameters (bmrs.compaction counts, the same
   for all), test accuracy, and for the first --latency-seeds seeds the latency in eager
   PyTorch and onnxruntime (batches 1 and 256, one thread) against the base network in the
   same bmrs.deploy.benchmark call.

Results are cached per row in OUT/rows/ (rerun the same command to resume); --json writes
the summary shaped as docs/results/head-to-head.json, --figure the accuracy against the
measured speed-up. Files this script did not write are never replaced.

    python benchmarks/head_to_head.py --out runs/head-to-head --json docs/results/head-to-head.json \\
        --figure docs/results/head-to-head.png
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bmrs import BMRSError
from bmrs._io import read_json, write_atomic, write_json
from bmrs.compaction import compact, count_flops, count_parameters
from bmrs.datasets import load_dataset
from bmrs.deploy import benchmark
from bmrs.pruning import RECOMMENDED
from bmrs.gates import gates
from bmrs.models import MODELS
from bmrs.pruning import make_criterion, prune
from bmrs.pruning.schedules import ContinuousPruning
from bmrs.training import TRAINED_GATE_LR, elbo_loss, gate_trained, seed_everything

FORMAT = "bmrs-head-to-head"
BMRS_TARGETED = ("bmrs-n", "bmrs-u")
TP_METHODS = ("tp-l1", "tp-l2", "tp-taylor", "tp-bn-scale", "tp-group-sl", "random")
SPARSE = {"tp-bn-scale", "tp-group-sl"}
METHODS = (*BMRS_TARGETED, *TP_METHODS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the cached base network and the per-row results")
    p.add_argument("--dataset", default="fashion-mnist", help="data set (default fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory searched first for the data files")
    p.add_argument("--model", choices=("resnet", "resnet56"), default="resnet56", help="bundled ResNet (default resnet56)")
    p.add_argument("--depth", type=int, default=None, help="depth of --model resnet (6n+2; default 20)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    p.add_argument("--image-size", type=int, default=None, help="resize the images to SxS (default: native)")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images (default all)")
    p.add_argument("--test-subset", type=int, default=None, help="measure accuracy on the first N test images (default all)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--base-epochs", type=int, default=200, help="epochs of the base network (default 200, lr 0.1)")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the trained network for every method (default 100)")
    p.add_argument("--gate-epochs", type=int, default=None,
                   help="bmrs: ELBO epochs before compaction, counted in --epochs (default a fifth of them, at least 1)")
    p.add_argument("--prune-every", type=int, default=None,
                   help="bmrs without a target: prune every K ELBO epochs (default: half the gate epochs, at least 1)")
    p.add_argument("--reg-epochs", type=int, default=None,
                   help="sparse learning epochs of tp-bn-scale and tp-group-sl, counted in --epochs (default as --gate-epochs)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the pruning phase (default 0.01)")
    p.add_argument("--tp-steps", type=int, default=400, help="Torch-Pruning's iterative steps (default 400, its recipe)")
    p.add_argument("--targets", type=float, nargs="+", default=[2.1, 2.5, 4.0], help="MACs reductions (default 2.1 2.5 4)")
    p.add_argument("--methods", nargs="+", choices=(*METHODS, "bmrs"), default=[*METHODS, "bmrs"], help="methods (default all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the pruning phase (default 3)")
    p.add_argument("--latency-seeds", type=int, default=1, help="seeds whose networks are timed (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per network and batch (default 20)")
    p.add_argument("--threads", type=int, default=1, help="threads for training and timing (default 1)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the summary here")
    p.add_argument("--figure", metavar="FILE", default=None, help="write the accuracy-against-speed-up figure here (PNG)")
    p.add_argument("--table", action="store_true", help="print the summary as a Markdown table at the end")
    p.add_argument("--force", action="store_true", help="replace --json / --figure files this script did not write")
    args = p.parse_args(argv)
    for name in ("batch_size", "base_epochs", "epochs", "seeds", "repeats", "threads", "tp_steps"):
        if getattr(args, name) < 1:
            raise BMRSError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gate_epochs is None:
        args.gate_epochs = max(1, args.epochs // 5)
    if args.reg_epochs is None:
        args.reg_epochs = args.gate_epochs
    if args.prune_every is None:
        args.prune_every = max(1, args.gate_epochs // 2)
    for name in ("gate_epochs", "reg_epochs"):
        if not 1 <= getattr(args, name) < args.epochs:
            raise BMRSError(f"--{name.replace('_', '-')} must lie in [1, --epochs), got {getattr(args, name)}")
    if any(t <= 1 for t in args.targets):
        raise BMRSError(f"--targets are MACs reductions above 1, got {args.targets}")
    if args.model == "resnet56" and args.depth is not None:
        raise BMRSError("--depth applies to --model resnet")
    return args


# --- data and training ---------------------------------------------------------------------------

class Data:
    def __init__(self, args) -> None:
        splits = load_dataset(args.dataset, args.data_dir, seed=0, image_size=args.image_size)
        x, y = splits.train.tensors
        if args.train_subset is not None:
            x, y = x[: args.train_subset], y[: args.train_subset]
        tx, ty = splits.test.tensors
        if args.test_subset is not None:
            tx, ty = tx[: args.test_subset], ty[: args.test_subset]
        self.x, self.y, self.test_x, self.test_y = x, y, tx, ty
        self.input_shape, self.num_classes = tuple(splits.input_shape), splits.num_classes
        self.batch_size = args.batch_size

    def batches(self, generator: torch.Generator):
        """One epoch of augmented training batches: random crops of the image padded by an
        eighth of its side, and horizontal flips (the CIFAR augmentation)."""
        n, (_, h, w) = len(self.x), self.input_shape
        pad = max(1, h // 8)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = F.pad(self.x[idx], (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
            x = x[:, :, dy:dy + h, dx:dx + w]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            yield x, self.y[idx]

    @torch.no_grad()
    def accuracy(self, net: nn.Module) -> float:
        training = net.training
        net.eval()
        correct = sum(int((net(self.test_x[i:i + 1000]).argmax(1) == self.test_y[i:i + 1000]).sum())
                      for i in range(0, len(self.test_x), 1000))
        net.train(training)
        return correct / len(self.test_x)


def _sgd(net: nn.Module, lr: float, epochs: int, steps: int, weight_decay: float = 5e-4, params=None):
    """SGD with momentum 0.9, the rate divided by 10 at 60 % and 80 % of the phase (per step)."""
    params = list(net.parameters()) if params is None else params
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * steps
    milestones = [int(0.6 * total), int(0.8 * total)]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)


def train_plain(net: nn.Module, data: Data, epochs: int, lr: float, generator, *, pruner=None, weight_decay=5e-4) -> None:
    """Cross-entropy training of a plain network; with ``pruner`` (sparse learning), its
    regulariser acts on the gradients after every backward pass and weight decay is off,
    as in Torch-Pruning's recipe."""
    steps = math.ceil(len(data.x) / data.batch_size)
    opt, sched = _sgd(net, lr, epochs, steps, 0.0 if pruner is not None else weight_decay)
    net.train()
    for _ in range(epochs):
        for x, y in data.batches(generator):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if pruner is not None:
                pruner.regularize(net)
            opt.step()
            sched.step()


def train_gated(net: nn.Module, data: Data, epochs: int, lr: float, generator, *, pruning=None) -> None:
    """ELBO fine-tuning of a gated trained network: the weights with the same SGD as every
    method, the gates' posteriors with Adam; ``pruning`` (continuous) after each epoch."""
    gate_ids = {id(p) for g in gates(net).values() for p in g.parameters()}
    weights = [p for p in net.parameters() if id(p) not in gate_ids]
    posterior = [p for p in net.parameters() if id(p) in gate_ids]
    steps = math.ceil(len(data.x) / data.batch_size)
    opt, sched = _sgd(net, lr, epochs, steps, params=weights)
    gate_opt = torch.optim.Adam(posterior, lr=TRAINED_GATE_LR)
    net.train()
    for epoch in range(1, epochs + 1):
        for x, y in data.batches(generator):
            loss, _, _ = elbo_loss(net(x), y, net, kl_reduction=RECOMMENDED["kl_reduction"])
            opt.zero_grad(set_to_none=True)
            gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            gate_opt.step()
            sched.step()
        if pruning is not None:
            pruning(net, epoch)


# --- the methods ---------------------------------------------------------------------------------

def _macs(net: nn.Module, shape) -> int:
    return count_flops(net.eval(), torch.zeros(1, *shape)) // 2  # bmrs counts a multiply-add as 2 FLOPs


def run_bmrs(base: nn.Module, data: Data, args, seed: int, method: str, target: float | None) -> nn.Module:
    generator = seed_everything(seed)
    net = copy.deepcopy(base)
    example = data.test_x[:64]
    gate_trained(net, example)
    pruning = None
    if target is None:
        pruning = ContinuousPruning(make_criterion(RECOMMENDED["method"]), args.prune_every)
    train_gated(net, data, args.gate_epochs, args.lr, generator, pruning=pruning)
    if target is not None:
        criterion = make_criterion("bmrs-n") if method == "bmrs-n" else make_criterion("bmrs-u", bits=8.0)
        prune(net, criterion, budget={"flops": 1.0 / target}, example_input=example[:1], keep_pruned=True)
    small = compact(net.eval(), example)
    train_plain(small, data, args.epochs - args.gate_epochs, args.lr, generator)
    return small


def _tp_pruner(net: nn.Module, method: str, example, num_classes: int, steps: int):
    import torch_pruning as tp

    ignored = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    common = dict(global_pruning=True, pruning_ratio=1.0, iterative_steps=steps, ignored_layers=ignored)
    if method == "tp-l1":
        return tp.pruner.MetaPruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=1), **common)
    if method == "tp-l2":
        return tp.pruner.MetaPruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=2), **common)
    if method == "tp-taylor":
        return tp.pruner.MetaPruner(net, example, importance=tp.importance.GroupTaylorImportance(), **common)
    if method == "random":
        return tp.pruner.MetaPruner(net, example, importance=tp.importance.RandomImportance(), **common)
    if method == "tp-bn-scale":
        return tp.pruner.BNScalePruner(net, example, importance=tp.importance.BNScaleImportance(), reg=1e-5, **common)
    if method == "tp-group-sl":
        imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
        return tp.pruner.GroupNormPruner(net, example, importance=imp, reg=5e-4, **common)
    raise BMRSError(f"unknown Torch-Pruning method {method!r}")


def run_tp(base: nn.Module, data: Data, args, seed: int, method: str, target: float) -> nn.Module:
    import torch_pruning as tp

    generator = seed_everything(seed)
    net = copy.deepcopy(base)
    example = data.test_x[:1]
    pruner = _tp_pruner(net, method, example, data.num_classes, args.tp_steps)
    finetune = args.epochs
    if method in SPARSE:
        train_plain(net, data, args.reg_epochs, args.lr, generator, pruner=pruner)
        finetune -= args.reg_epochs
    net.eval()
    base_macs, _ = tp.utils.count_ops_and_params(net, example_inputs=example)
    speed_up = 1.0
    grad_batches = data.batches(generator) if method == "tp-taylor" else None
    while speed_up < target:
        if grad_batches is not None:  # Taylor: the gradient of one training batch before each step
            try:
                x, y = next(grad_batches)
            except StopIteration:
                grad_batches = data.batches(generator)
                x, y = next(grad_batches)
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(net, example_inputs=example)
        speed_up = float(base_macs) / macs
        if pruner.current_step == pruner.iterative_steps:
            break
    net.zero_grad(set_to_none=True)
    train_plain(net, data, finetune, args.lr, generator)
    return net


# --- rows, caching and the summary ----------------------------------------------------------------

def _row_name(method: str, target: float | None, seed: int) -> str:
    return f"{method}-{'stop' if target is None else f'{target:g}x'}-seed{seed}.json"


def measure_row(base: nn.Module, net: nn.Module, data: Data, args, seed: int, seconds: float) -> dict:
    shape = data.input_shape
    row = {
        "accuracy": data.accuracy(net),
        "macs": _macs(net, shape), "params": count_parameters(net),
        "macs_ratio": _macs(base, shape) / _macs(net, shape),
        "params_ratio": count_parameters(base) / count_parameters(net),
        "seconds": seconds,
    }
    if seed < args.latency_seeds:
        began = time.perf_counter()
        bench = benchmark(base.eval(), net.eval(), shape, batches=(1, 256), runtimes=("eager", "onnxruntime"),
                          threads=args.threads, repeats=args.repeats, warmup=2)
        row["latency"] = {f"{r['runtime']}@{r['batch']}": {"base_ms": r["full_ms"], "pruned_ms": r["compact_ms"],
                                                          "ratio": r["ratio"]} for r in bench["results"]}
        row["latency_seconds"] = time.perf_counter() - began
    return row


def base_network(args, data: Data, out: Path, log) -> tuple[nn.Module, dict]:
    options = {"width": args.width} | ({"depth": args.depth} if args.model == "resnet" and args.depth else {})
    net = MODELS[args.model](data.input_shape, data.num_classes, **options)
    settings = {"model": args.model, "options": options, "dataset": args.dataset, "image_size": args.image_size,
                "train_subset": args.train_subset, "test_subset": args.test_subset, "epochs": args.base_epochs,
                "batch_size": args.batch_size, "lr": 0.1}
    if (out / "base.json").is_file() and (out / "base.pt").is_file():
        info = read_json(out / "base.json")
        if info["settings"] != settings:
            raise BMRSError(f"{out} holds a base network trained with other settings; choose another --out")
        net.load_state_dict(torch.load(out / "base.pt", map_location="cpu", weights_only=True))
        log(f"base network cached: accuracy {100 * info['accuracy']:.2f} %")
        return net.eval(), info
    log(f"training the base network ({args.base_epochs} epochs)")
    began = time.perf_counter()
    train_plain(net, data, args.base_epochs, 0.1, seed_everything(0))
    info = {"format": FORMAT, "settings": settings, "accuracy": data.accuracy(net),
            "seconds": time.perf_counter() - began, "macs": _macs(net, data.input_shape),
            "params": count_parameters(net)}
    write_atomic(out / "base.pt", lambda tmp: torch.save(net.state_dict(), tmp))
    write_json(info, out / "base.json")
    log(f"base network: accuracy {100 * info['accuracy']:.2f} % in {info['seconds']:.0f} s")
    return net.eval(), info


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _aggregate(rows: list[dict]) -> dict:
    out = {"accuracy": _mean_std([r["accuracy"] for r in rows]),
           "macs_ratio": statistics.fmean(r["macs_ratio"] for r in rows),
           "params_ratio": statistics.fmean(r["params_ratio"] for r in rows), "seeds": len(rows)}
    timed = [r for r in rows if "latency" in r]
    if timed:
        for key in timed[0]["latency"]:
            runtime, batch = key.split("@")
            label = "ort" if runtime == "onnxruntime" else runtime
            out[f"latency_ratio_{label}_b{batch}"] = statistics.fmean(r["latency"][key]["ratio"] for r in timed)
        out["latency_ratio_ort"] = out.get("latency_ratio_ort_b256")
        out["latency_seeds"] = len(timed)
    return out


def summary(args, base_info: dict, rows: dict, seconds: float) -> dict:
    targets = {}
    for target in args.targets:
        entries = {}
        for method in (m for m in args.methods if m != "bmrs"):
            found = [rows[(method, target, s)] for s in range(args.seeds) if (method, target, s) in rows]
            if found:
                entries[method] = _aggregate(found)
        targets[f"{target:g}"] = {"rows": entries}
    result = {
        "format": FORMAT, "model": args.model if args.model == "resnet56" else f"resnet{args.depth or 20}",
        "dataset": args.dataset, "base_accuracy": [base_info["accuracy"], 0.0],
        "base": {"macs": base_info["macs"], "params": base_info["params"], "train_seconds": base_info["seconds"]},
        "targets": targets,
    }
    stops = [rows[("bmrs", None, s)] for s in range(args.seeds) if ("bmrs", None, s) in rows]
    if stops:
        result["bmrs_stop"] = _aggregate(stops) | {"criterion": RECOMMENDED["method"]}
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "figure", "force", "out", "table")}
    result["cost"] = {"pruning_phase_seconds": sum(r["seconds"] + r.get("latency_seconds", 0.0) for r in rows.values()),
                      "this_invocation_seconds": seconds, "rows": len(rows)}
    return result


def _writable(path: Path, force: bool) -> None:
    if not path.exists() or force:
        return
    if path.suffix == ".json":
        try:
            if read_json(path).get("format") == FORMAT:
                return
        except (ValueError, OSError, AttributeError):
            pass
    elif FORMAT.encode() in path.read_bytes()[:4096]:  # a figure this script wrote (its PNG description)
        return
    raise BMRSError(f"{path} exists and was not written by this script; pass --force to replace it")


def figure(result: dict, path: Path) -> None:
    """Accuracy against the MACs reduction and the measured speed-up at batch 256 in eager
    PyTorch and in onnxruntime (one panel each): a line per method through its targets, the base network
    as a horizontal line, BMRS's own stopping point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    methods = sorted({m for t in result["targets"].values() for m in t["rows"]})
    panels = (("macs_ratio", "MACs reduction (counted; the targets)"),
              ("latency_ratio_eager_b256", "measured speed-up, eager PyTorch, batch 256, 1 thread"),
              ("latency_ratio_ort_b256", "measured speed-up, onnxruntime, batch 256, 1 thread"))
    for ax, (key, label) in zip(axes, panels):
        for method in methods:
            points = [(t["rows"][method].get(key), *t["rows"][method]["accuracy"])
                      for t in result["targets"].values() if method in t["rows"]]
            points = [p for p in points if p[0] is not None]
            if not points:
                continue
            xs, ys, es = zip(*sorted(points))
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], capsize=3, label=method,
                        fmt="-o" if method.startswith("bmrs") else "--s",
                        linewidth=2.2 if method.startswith("bmrs") else 1.2)
        stop = result.get("bmrs_stop")
        if stop and stop.get(key) is not None:
            ax.errorbar([stop[key]], [100 * stop["accuracy"][0]], yerr=[100 * stop["accuracy"][1]], fmt="*",
                        markersize=16, color="black", label="bmrs (own stop)")
        ax.axhline(100 * result["base_accuracy"][0], color="grey", linewidth=0.8, linestyle=":", label="base network")
        ax.axvline(1.0, color="grey", linewidth=0.6)
        ax.set_xlabel(label + " (base / pruned)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    axes[2].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{result['model']} on {result['dataset']}: accuracy against measured speed-up "
                 "(points of a method: its MACs targets)")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata={"Description": FORMAT}))
    plt.close(fig)


def table(result: dict) -> str:
    """The summary as a Markdown table: one line per target and method, best first."""
    def pm(pair):
        return f"{100 * pair[0]:.2f} ± {100 * pair[1]:.2f}"

    def ratio(row, key):
        return f"{row[key]:.2f}x" if row.get(key) is not None else "–"

    lines = ["| target | method | accuracy (%) | Δ vs base (points) | MACs reduction | params reduction | "
             "speed-up ort b1 | ort b256 | eager b1 | eager b256 | seeds |", "|" + "---|" * 11]
    base = result["base_accuracy"][0]
    entries = [(f"{t}x", rows) for t, rows in ((t, v["rows"]) for t, v in result["targets"].items())]
    if "bmrs_stop" in result:
        entries.append(("own stop", {"bmrs (" + result["bmrs_stop"]["criterion"] + ")": result["bmrs_stop"]}))
    for label, rows in entries:
        for method, row in sorted(rows.items(), key=lambda kv: -kv[1]["accuracy"][0]):
            lines.append(f"| {label} | {method} | {pm(row['accuracy'])} | {100 * (row['accuracy'][0] - base):+.2f} | "
                         f"{row['macs_ratio']:.2f}x | {row['params_ratio']:.2f}x | {ratio(row, 'latency_ratio_ort_b1')} | "
                         f"{ratio(row, 'latency_ratio_ort_b256')} | {ratio(row, 'latency_ratio_eager_b1')} | "
                         f"{ratio(row, 'latency_ratio_eager_b256')} | {row['seeds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch_pruning")
    out = Path(args.out)
    for target in (args.json, args.figure):
        if target is not None:
            _writable(Path(target), args.force)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:7.0f} s] {text}", flush=True)

    data = Data(args)
    base, base_info = base_network(args, data, out, log)
    jobs = [(m, None, s) for s in range(args.seeds) for m in ("bmrs",) if m in args.methods]
    jobs += [(m, t, s) for s in range(args.seeds) for t in args.targets for m in args.methods if m != "bmrs"]
    rows = {}
    for i, (method, target, seed) in enumerate(jobs, 1):
        file = out / "rows" / _row_name(method, target, seed)
        if file.is_file():
            rows[(method, target, seed)] = read_json(file)
            continue
        start = time.perf_counter()
        if method.startswith("bmrs"):
            net = run_bmrs(base, data, args, seed, method, target)
        else:
            net = run_tp(base, data, args, seed, method, target)
        row = measure_row(base, net, data, args, seed, time.perf_counter() - start)
        row |= {"method": method, "target": target, "seed": seed}
        write_json(row, file)
        rows[(method, target, seed)] = row
        log(f"{i}/{len(jobs)} {method} {'stop' if target is None else f'{target:g}x'} seed {seed}: "
            f"accuracy {100 * row['accuracy']:.2f} %, MACs /{row['macs_ratio']:.2f}, "
            f"ort@256 x{row.get('latency', {}).get('onnxruntime@256', {}).get('ratio', float('nan')):.2f} "
            f"({row['seconds']:.0f} s)")
    result = summary(args, base_info, rows, time.perf_counter() - began)
    if args.json is not None:
        write_json(result, Path(args.json))
        log(f"wrote {args.json}")
    if args.figure is not None:
        figure(result, Path(args.figure))
        log(f"wrote {args.figure}")
    if args.table:
        print(table(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BMRSError as err:
        print(f"head_to_head: {err}", file=sys.stderr)
        sys.exit(2)
