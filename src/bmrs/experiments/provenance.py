"""What produced a run: the command, the code and the machine, recorded in ``metrics.json``.

Training is deterministic for a given seed on one kind of machine, not across machines:
the same command on two processors whose math kernels round differently (an AMD EPYC and
an Intel Xeon with AVX-512, say) follows two different trajectories, and continuous
pruning amplifies the difference into different widths. So every run records, beside its
configuration, everything that decides its numbers, and an equivalent ``bmrs train``
command that pins every setting (so that a change of a default can never change what the
command means).
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..distributed import world_size
from ..pruning.criteria import CRITERIA

__all__ = ["provenance", "train_command"]

# RunConfig field -> `bmrs train` flag; booleans are switches, model_options expand to their own flags.
_FLAGS = {
    "dataset": "--dataset", "model": "--model", "method": "--method", "bits": "--bits",
    "threshold": "--threshold", "target": "--target", "match": "--match", "epochs": "--epochs",
    "finetune_epochs": "--finetune-epochs", "prune_every": "--prune-every", "seed": "--seed",
    "lr": "--lr", "batch_size": "--batch-size", "kl_reduction": "--kl-reduction",
    "image_size": "--image-size", "data_dir": "--data-dir",
}
_SWITCHES = {"recompute_masks": "--recompute-masks"}
_OPTION_FLAGS = {"width": "--width", "hidden_layers": "--hidden-layers", "depth": "--depth", "patch_size": "--patch-size"}


def train_command(config, out_dir, threads: int | None = None, processes: int = 1) -> str:
    """The ``bmrs train`` command line that reruns ``config`` (resolved) into ``out_dir``,
    every setting spelled out."""
    values = asdict(config)
    criterion = CRITERIA.get(config.method)
    if criterion is None or "bits" not in criterion.needs:
        values["bits"] = None  # only the criteria that use it take --bits
    words = ["bmrs", "train"]
    for field, flag in _FLAGS.items():
        if values.get(field) is not None:
            words += [flag, str(values[field])]
    words += [flag for field, flag in _SWITCHES.items() if values.get(field)]
    for option, value in sorted(values.get("model_options", {}).items()):
        if option in _OPTION_FLAGS:
            words += [_OPTION_FLAGS[option], str(value)]
    if threads is not None:
        words += ["--threads", str(threads)]
    if processes > 1:
        words += ["--nproc", str(processes)]
    words += ["--out", str(out_dir)]
    return shlex.join(words)


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the bmrs source tree, with ``+dirty`` for local changes; None outside git."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(config, out_dir) -> dict:
    """The record of what produced a run, for ``metrics.json``."""
    threads = torch.get_num_threads()
    return {
        "argv": shlex.join(sys.argv),
        "command": train_command(config, out_dir, threads, world_size()),
        "bmrs": __version__,
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
