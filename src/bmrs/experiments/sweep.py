"""Post-training pruning: accuracy against compression for several criteria.

Starting each time from the same trained state, every criterion prunes to a list of
compression levels (ranking all structures globally), optionally fine-tunes, and the
accuracy is measured. Criteria with their own stopping rule (BMRS: delta F >= 0; SNR and
E[theta] at their thresholds) also get that point, marked ``"stop"``.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import read_json, write_json, write_text
from ..errors import BMRSError
from ..pruning.criteria import Criterion, criterion_class, default_labels, parse_label
from ..pruning import decide, parameter_compression, set_masks, structure_compression
from .runs import load_run
from ..rundir import REPORTED_METRICS
from ..training import Trainer, adam, seed_everything

__all__ = ["sweep", "sweep_run", "parse_criteria", "DEFAULT_LEVELS", "default_criteria", "write_sweep_csv", "fine_tuner"]

#: Parameter-compression levels of a default sweep.
DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def sweep(
    model: nn.Module,
    criteria: dict[str, Criterion],
    evaluate: Callable[[nn.Module], float],
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    target_kind: str = "params",
    finetune: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Prune ``model`` to each level with each criterion and measure ``evaluate(model)``.

    Args:
        model: a trained gated model; it is restored to its state after every point and
            left in that state at the end.
        criteria: criteria by name.
        evaluate: returns the accuracy of the pruned model (e.g. on the test set).
        levels: compressions in [0, 1] to prune to (see ``target_kind``).
        target_kind: ``"params"`` (parameter compression) or ``"structures"``.
        finetune: called after pruning and before evaluation (e.g. a few epochs of training
            with the masks fixed).

    Returns:
        One record per point: criterion, ``kind`` (``"level"`` or ``"stop"``), target,
        structure and parameter compression reached, accuracy.
    """
    state = copy.deepcopy(model.state_dict())
    jobs = []
    for name, criterion in criteria.items():
        jobs += [(name, criterion, "level", float(level)) for level in levels]
        if criterion.threshold is not None:
            jobs.append((name, criterion, "stop", None))
    records = []
    for name, criterion, kind, target in tqdm(jobs, desc="sweep", disable=not progress, leave=False):
        model.load_state_dict(state)
        set_masks(model, decide(model, criterion, target=target, target_kind=target_kind, keep_pruned=False))
        if finetune is not None:
            finetune(model)
        records.append({
            "criterion": name,
            "kind": kind,
            "target": target,
            "structure_compression": structure_compression(model),
            "parameter_compression": parameter_compression(model),
            "accuracy": float(evaluate(model)),
        })
    model.load_state_dict(state)
    return records


#: The state file of a run directory that ``sweep_run(epoch=...)`` prunes.
_EPOCH_FILES = {"last": "checkpoint.pt", "best": "model.pt"}


def _run_epochs(run_dir: Path) -> int | None:
    """The number of epochs a complete run trained (None for an unfinished one)."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return None
    return len(read_json(metrics, REPORTED_METRICS).get("history", [])) or None


def default_criteria() -> tuple[str, ...]:
    """Criteria of a default sweep: the default labels of every registered criterion
    (``bmrs-u8`` and ``bmrs-u4`` for BMRS_U)."""
    return default_labels()


def parse_criteria(text: str) -> list[tuple[str, str, dict]]:
    """Criteria tokens of ``bmrs sweep --criteria`` as (label, criterion name, options).

    A token is a label of a registered criterion (:func:`~bmrs.pruning.criteria.parse_label`):
    its name (``bmrs-n``, ``snr``, ``l2``, ...) or, for BMRS_U, ``bmrs-uP`` with P bits
    (``bmrs-u8``, ``bmrs-u2.5``; ``bmrs-u`` alone has 8 bits).
    """
    out, seen = [], set()
    for token in (t.strip().lower().replace("_", "-") for t in text.split(",")):
        if not token:
            continue
        name, options = parse_label(token)
        label = criterion_class(name).label(**options)
        if label in seen:
            raise BMRSError(f"criterion {label!r} is given twice")
        seen.add(label)
        out.append((label, name, options))
    if not out:
        raise BMRSError("--criteria names no criterion")
    return out


def sweep_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    criteria: str | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    finetune_epochs: int = 0,
    split: str = "test",
    target_kind: str = "params",
    data_dir=None,
    epoch: str = "last",
    progress: bool = True,
) -> dict:
    """Post-training sweep of a trained run's final model; writes ``out/sweep.json`` (last:
    its presence marks the sweep complete) and ``out/sweep.csv``; returns the JSON content.

    Args:
        run: a run directory (typically ``--method none``: trained with gates, unpruned),
            or one of its state files (``checkpoint.pt``: the last epoch; ``model.pt``: the
            best validation epoch), which then decides the epoch.
        epoch: for a run directory, ``"last"`` (its ``checkpoint.pt``: the network training
            ended with, whose gates have settled under the KL) or ``"best"`` (its
            ``model.pt``: the best validation epoch, often an early one on which the
            BMRS criteria find nothing to prune).
        criteria: comma-separated tokens of :func:`parse_criteria` (default: :func:`default_criteria`).
        levels: parameter (or structure, see ``target_kind``) compressions to prune to.
        finetune_epochs: epochs of fine-tuning (masks fixed) after each pruning.
        split: ``"test"`` or ``"val"``: where accuracy is measured.
    """
    if split not in ("test", "val"):
        raise BMRSError(f"split must be 'test' or 'val', got {split!r}")
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if bad:
        raise BMRSError(f"levels must lie in [0, 1], got {', '.join(f'{v:g}' for v in bad)}")
    if finetune_epochs < 0:
        raise BMRSError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    specs = parse_criteria(",".join(default_criteria()) if criteria is None else criteria)
    if epoch not in _EPOCH_FILES:
        raise BMRSError(f"epoch must be 'last' or 'best', got {epoch!r}")
    if Path(run).is_dir():
        run = Path(run) / _EPOCH_FILES[epoch]
        if not run.is_file():
            raise FileNotFoundError(f"{run.parent} has no {run.name} (the {epoch} epoch)")
    loaded = load_run(run, data_dir, need_data=True)
    config, model, data = loaded.config, loaded.model, loaded.data
    generator = seed_everything(config.seed)
    train_loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(data.val, batch_size=1000)
    eval_loader = val_loader if split == "val" else torch.utils.data.DataLoader(data.test, batch_size=1000)

    context = {"data": train_loader, "seed": config.seed}
    built = {}
    for label, name, options in specs:
        cls = criterion_class(name)
        built[label] = cls(**{**{key: context[key] for key in cls.needs if key in context}, **options})

    @torch.no_grad()
    def evaluate(net) -> float:
        net.eval()
        correct = total = 0
        for inputs, targets in eval_loader:
            correct += (net(inputs).argmax(dim=1) == targets).sum().item()
            total += len(targets)
        return correct / max(total, 1)

    def trainer_factory(net):
        optimizer = adam(net.parameters(), config.lr)
        return Trainer(net, optimizer, kl_reduction=config.kl_reduction, dataset_size=len(data.train), progress=False)

    began = time.perf_counter()
    model_accuracy = evaluate(model)
    records = sweep(
        model, built, evaluate, levels=levels, target_kind=target_kind,
        finetune=fine_tuner(trainer_factory, train_loader, val_loader, finetune_epochs), progress=progress,
    )
    result = {
        "config": {
            "run": str(run), "criteria": [label for label, _, _ in specs], "levels": list(levels),
            "finetune_epochs": finetune_epochs, "split": split, "target_kind": target_kind,
            "epoch": loaded.epoch, "epochs": _run_epochs(Path(run).parent),
        },
        "run_config": asdict(config),
        "model_accuracy": model_accuracy,
        "seconds": time.perf_counter() - began,
        "records": records,
    }
    out = Path(out)
    write_sweep_csv(records, out / "sweep.csv")
    write_json(result, out / "sweep.json")
    return result


def write_sweep_csv(records: list[dict], path: str | os.PathLike) -> None:
    """Write sweep records as CSV (atomically)."""
    fields = ["criterion", "kind", "target", "structure_compression", "parameter_compression", "accuracy"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: r[k] for k in fields})
    write_text(path, buffer.getvalue())


def fine_tuner(trainer_factory: Callable[[nn.Module], object], train_loader, val_loader, epochs: int) -> Callable[[nn.Module], None] | None:
    """A ``finetune`` callback for :func:`sweep`: ``epochs`` epochs with masks fixed."""
    if epochs <= 0:
        return None

    def run(model: nn.Module) -> None:
        trainer = trainer_factory(model)
        trainer.fit(train_loader, val_loader, 0, finetune_epochs=epochs)

    return run

