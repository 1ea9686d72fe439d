"""Wall time of one digits run of `bmrs train` with --nproc 1 and --nproc 2.

Runs the same training (the digits MLP of `make demo`, BMRS_N as the paper's code computes
it) three ways, interleaved, ``--repeats`` times, each into a fresh run directory:

  n1        --nproc 1, --batch-size B
  n2        --nproc 2, --batch-size B per process (a global batch of 2B: half the steps)
  n2-same   --nproc 2, --batch-size B/2 per process (the global batch and steps of n1)

and prints per arm the median wall time of the whole command (process start, data,
training, compaction), the median training time recorded in metrics.json and the test
accuracy, and the ratios of n1 to each two-process arm (above 1: two processes are faster).

    python benchmarks/distributed_wall_time.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--dataset", "digits", "--model", "mlp", "--method", "bmrs-n-code", "--width", "64", "--epochs", "30",
         "--finetune-epochs", "5", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="B: the batch of the one-process run")
    args = parser.parse_args(argv)
    arms = {"n1": (1, args.batch_size), "n2": (2, args.batch_size), "n2-same": (2, args.batch_size // 2)}
    wall = {arm: [] for arm in arms}
    train = {arm: [] for arm in arms}
    accuracy = {arm: [] for arm in arms}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for arm, (nproc, batch) in arms.items():
                out = Path(root) / f"{arm}-{repeat}"
                began = time.perf_counter()
                subprocess.run([sys.executable, "-m", "bmrs", "train", *TRAIN, "--batch-size", str(batch),
                                "--nproc", str(nproc), "--out", str(out)], check=True, env=env,
                               stdout=subprocess.DEVNULL)
                wall[arm].append(time.perf_counter() - began)
                metrics = json.loads((out / "metrics.json").read_text())
                train[arm].append(metrics["train_seconds"])
                accuracy[arm].append(metrics["test_accuracy"])
    print(f"{os.cpu_count()} CPUs, {args.repeats} repeats")
    for arm, (nproc, batch) in arms.items():
        print(f"{arm:<8} --nproc {nproc} --batch-size {batch:<3}: wall {statistics.median(wall[arm]):6.1f} s, "
              f"training {statistics.median(train[arm]):6.1f} s, test accuracy {statistics.median(accuracy[arm]):.4f}")
    for arm in ("n2", "n2-same"):
        print(f"ratio n1 / {arm}: wall {statistics.median(wall['n1']) / statistics.median(wall[arm]):.2f}, "
              f"training {statistics.median(train['n1']) / statistics.median(train[arm]):.2f}")


if __name__ == "__main__":
    main()
