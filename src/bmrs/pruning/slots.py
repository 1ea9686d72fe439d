"""The family slots of a gated model as pruning sees them: their scores under a criterion,
which of them are pruned, and writing keep masks into the gates.

A family (:class:`bmrs.structures.kinds.Family`) is a set of structures removed together: slot
``j`` of a family is structure ``indices[j]`` of every member gate. Deciding by a
criterion's rule or a target (:mod:`bmrs.pruning.masks`), by a budget
(:mod:`bmrs.pruning.budget`) and rounding widths (:mod:`bmrs.pruning.rounding`) all start
from here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import broadcast
from ..gates import gate_layout, gates
from .criteria import Criterion

__all__ = ["current_masks", "family_scores", "pruned_slots", "set_masks"]


def family_scores(model: nn.Module, criterion: Criterion) -> list[Tensor]:
    """Per family of the model's layout, ``criterion``'s score of each slot (float64, on the CPU)."""
    layout = gate_layout(model)
    scores = criterion.structure_scores(model)
    return [
        criterion.family_score(torch.stack([scores[name].double().cpu()[idx] for name, idx in fam.members]))
        for fam in layout.families
    ]


def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """Per gate, its keep mask as a bool tensor on the CPU."""
    return {name: gate.mask.detach().cpu() > 0 for name, gate in gates(model).items()}


def pruned_slots(model: nn.Module) -> list[Tensor]:
    """Per family, which slots are removed: those whose members are all masked."""
    current = current_masks(model)
    return [
        torch.stack([~current[name][idx] for name, idx in fam.members]).all(dim=0)
        for fam in gate_layout(model).families
    ]


def set_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Write keep masks into the gates. Under ``torch.distributed``, rank 0's masks are
    broadcast so that every rank prunes exactly the same structures."""
    for name, gate in gates(model).items():
        gate.mask.copy_(broadcast(masks[name].to(device=gate.mask.device, dtype=gate.mask.dtype)))
