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
from collections.abc import Callable, Sequence

from torch import nn
from tqdm.auto import tqdm

from .._io import write_text
from ..pruning.criteria import Criterion
from ..pruning.masks import decide, parameter_compression, set_masks, structure_compression

__all__ = ["sweep", "DEFAULT_LEVELS", "write_sweep_csv", "fine_tuner"]

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
        set_masks(model, decide(model, criterion, target=target, target_kind=target_kind))
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

