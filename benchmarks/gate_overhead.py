"""What the noise gates cost in training: plain vs gated training step, side by side.

For each bundled model and batch size: the network built by ``bmrs.build_model(name, shape,
10)`` (gates attached) and the same layers without gates (``gated=False``), both trained
with cross-entropy (the gated one plus ``bmrs.model_kl``, the paper's ELBO), one training
step = forward, backward and an Adam step. Prints, per model and batch:

  * the median time of a step of each, measured in interleaved repetitions in one run (so
    both see the same machine load), and the ratio gated / plain: wall-clock time, and the
    CPU time of the timing thread (``time.thread_time``), which on a shared machine leaves
    out the time spent waiting for a core (with one thread, the work of the step);
  * the number of aten operations of one step (torch.profiler, nested calls included; the
    count is deterministic), plain and gated, and the difference per gate.

Adam is PyTorch's fused implementation by default (what the bundled runs use, see
``bmrs.training.adam``); ``--adam default`` uses the for-loop one, which costs about 25
operations per parameter tensor, i.e. about 50 per gate (its two parameter tensors).

    python benchmarks/gate_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bmrs import gates, model_kl
from bmrs.models import build_model

SHAPES = {"mlp": (1, 32, 32), "lenet5": (1, 32, 32), "resnet": (3, 32, 32)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="bundled models (default: all); input shapes %s" % SHAPES)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="batch sizes (default 32 128)")
    parser.add_argument("--adam", choices=["fused", "default"], default="fused",
                        help="Adam implementation for both networks (default fused)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="interleaved repetitions, each timing --steps steps of each network (default 30)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repetition (default 5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each network first (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.steps < 1 or args.warmup < 0 or min(args.batches) < 1:
        parser.error("--threads, --repeats, --steps and --batches must be positive, --warmup non-negative")
    return args


class Setup:
    """A network, its optimizer and one batch; ``step()`` is one training step."""

    def __init__(self, name: str, gated: bool, batch: int, adam: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = build_model(name, SHAPES[name], 10, gated=gated).train()
        self.gated = gated
        self.num_gates = len(gates(self.model)) if gated else 0
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True if adam == "fused" else None)
        self.inputs = torch.randn(batch, *SHAPES[name])
        self.targets = torch.randint(0, 10, (batch,))

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.inputs), self.targets)
        if self.gated:
            loss = loss + model_kl(self.model, "mean")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def count_ops(setup: Setup) -> int:
    """aten operations (nested calls included) of one training step after warm-up."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        setup.step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"Adam {args.adam}, {args.repeats} interleaved repetitions of {args.steps} steps")
    print(f"{'model':8} {'batch':>5} {'gates':>5} {'plain ms':>9} {'gated ms':>9} {'ratio':>6} "
          f"{'plain cpu':>9} {'gated cpu':>9} {'ratio':>6} {'ops plain':>9} {'ops gated':>9} {'ops/gate':>8}")
    for name in args.models:
        for batch in args.batches:
            plain = Setup(name, False, batch, args.adam, args.seed)
            gated = Setup(name, True, batch, args.adam, args.seed)
            for setup in (plain, gated):
                for _ in range(args.warmup):
                    setup.step()
            ops = {setup: count_ops(setup) for setup in (plain, gated)}
            wall: dict[Setup, list[float]] = {plain: [], gated: []}
            cpu: dict[Setup, list[float]] = {plain: [], gated: []}
            for rep in range(args.repeats):
                order = (plain, gated) if rep % 2 == 0 else (gated, plain)
                for setup in order:
                    began, began_cpu = time.perf_counter(), time.thread_time()
                    for _ in range(args.steps):
                        setup.step()
                    cpu[setup].append((time.thread_time() - began_cpu) / args.steps)
                    wall[setup].append((time.perf_counter() - began) / args.steps)
            w_plain, w_gated = statistics.median(wall[plain]), statistics.median(wall[gated])
            c_plain, c_gated = statistics.median(cpu[plain]), statistics.median(cpu[gated])
            per_gate = (ops[gated] - ops[plain]) / gated.num_gates
            print(f"{name:8} {batch:5d} {gated.num_gates:5d} {1e3 * w_plain:9.2f} {1e3 * w_gated:9.2f} "
                  f"{w_gated / w_plain:6.2f} {1e3 * c_plain:9.2f} {1e3 * c_gated:9.2f} {c_gated / c_plain:6.2f} "
                  f"{ops[plain]:9d} {ops[gated]:9d} {per_gate:8.1f}", flush=True)


if __name__ == "__main__":
    main()
