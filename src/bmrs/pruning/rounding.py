"""Widths rounded to a multiple that the hardware computes at once, and what it costs in evidence.

Blocked kernels (oneDNN, onnxruntime's NCHWc, the GEMM micro-kernels) compute output channels
in blocks of 8 or 16: a layer of 33 neurons costs about what one of 48 costs, one of 32 a
third less. :func:`round_widths` moves the kept width of every family (the structures that
are removed together) to a multiple of ``multiple``, choosing the structures to prune or to
keep back in the order of the criterion's scores, and reports how far that goes against the
criterion: for an evidence criterion the change in ``sum(delta F - margin)`` over the
structures whose fate changed (negative: the evidence prefers the unrounded masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import BMRSError
from ..gates import gate_layout, gates, layer_names
from .criteria import Criterion, resolve_criterion
from .slots import current_masks, family_scores

__all__ = ["ROUND_MODES", "RoundResult", "round_width", "round_widths"]

#: How a width moves to a multiple: to the nearer one (up on a tie), up, or down.
ROUND_MODES = ("nearest", "up", "down")


def round_width(kept: int, size: int, multiple: int, mode: str = "nearest") -> int:
    """``kept`` of ``size`` structures moved to a multiple of ``multiple`` (or to ``size``).

    A width of 0 stays 0 (the layer is gone), the full width stays full, and a width is
    never rounded down to 0 (that would remove a layer the masks keep): below ``multiple``
    it rounds up. Rounding up stops at ``size``.
    """
    if multiple < 1:
        raise BMRSError(f"the multiple to round widths to must be >= 1, got {multiple}")
    if mode not in ROUND_MODES:
        raise BMRSError(f"unknown rounding mode {mode!r}; choose from {', '.join(ROUND_MODES)}")
    if kept <= 0 or kept >= size:
        return max(0, min(kept, size))
    down = kept // multiple * multiple
    up = min(down + multiple, size) if down != kept else kept
    if down == 0 or mode == "up":
        return up
    if mode == "down":
        return down
    return up if up - kept <= kept - down else down


@dataclass
class RoundResult:
    """What :func:`round_widths` did.

    Attributes:
        masks: keep masks per gate after rounding (bool), for :func:`~bmrs.pruning.set_masks`.
        widths: ``{layer: (kept before, kept after)}``, by the name of the layer each gate
            prunes (:func:`bmrs.layer_names`), as printed.
        pruned: structures (family slots) pruned by the rounding.
        restored: structures kept back by the rounding.
        delta_f_change: for an evidence criterion, the change in ``sum(delta F - margin)``
            over the pruned set: the slots the rounding pruned add theirs, the slots it kept
            back subtract theirs. Negative means the evidence prefers the unrounded masks
            by that many nats. None for the other criteria.
        multiple: the multiple the widths were rounded to.
        sizes: ``{layer: full width}``.
    """

    masks: dict[str, Tensor]
    widths: dict[str, tuple[int, int]]
    pruned: int
    restored: int
    delta_f_change: float | None
    multiple: int
    sizes: dict[str, int]

    def summary(self) -> str:
        changed = [f"{name} {a} -> {b}" for name, (a, b) in self.widths.items() if a != b]
        full = [name for name, (a, _) in self.widths.items() if a == self.sizes.get(name)]
        if changed:
            detail = ", ".join(changed)
        elif len(full) == len(self.widths):
            detail = f"every layer keeps its full width ({', '.join(full)}), which is never rounded"
        else:
            detail = (f"every width was 0, its layer's full width (never rounded) or a multiple of {self.multiple} "
                      "already")
        lines = [f"rounding pruned {self.pruned} and kept back {self.restored} structures ({detail})"]
        if self.delta_f_change is not None:
            lines.append(f"change in sum(delta F - margin) over the pruned structures: {self.delta_f_change:+.3f} nats")
        return "\n".join(lines)


def round_widths(model: nn.Module, criterion: Criterion | str, multiple: int, *, mode: str = "nearest") -> RoundResult:
    """The masks of ``model`` with every family's kept width rounded to a multiple of
    ``multiple`` (see :func:`round_width`); the model is not changed.

    Going down, the kept slots with the lowest scores of ``criterion`` are pruned; going up,
    the pruned slots with the highest scores are kept back. A slot counts as kept when any
    member of its family keeps it, as compaction does.
    """
    criterion = resolve_criterion(criterion)
    layout = gate_layout(model)
    scores = family_scores(model, criterion)
    current = current_masks(model)
    masks = {name: current[name].clone() for name in gates(model)}
    pruned = restored = 0
    change = 0.0
    for family, score in zip(layout.families, scores):
        kept = torch.stack([current[name][torch.as_tensor(idx)] for name, idx in family.members]).any(dim=0)
        k = int(kept.sum())
        target = round_width(k, family.size, multiple, mode)
        if target == k:
            continue
        if target < k:  # prune the kept slots the criterion ranks lowest
            candidates = torch.nonzero(kept).flatten()
            chosen = candidates[torch.sort(score[candidates], stable=True).indices[: k - target]]
            pruned += len(chosen)
            change -= float(score[chosen].sum())  # score = -(delta F - margin)
            keep = False
        else:  # keep back the pruned slots the criterion ranks highest
            candidates = torch.nonzero(~kept).flatten()
            chosen = candidates[torch.sort(score[candidates], descending=True, stable=True).indices[: target - k]]
            restored += len(chosen)
            change += float(score[chosen].sum())
            keep = True
        for name, idx in family.members:
            masks[name][torch.as_tensor(idx)[chosen]] = keep
    layer = layer_names(model)
    return RoundResult(
        masks=masks, widths={layer[name]: (int(current[name].sum()), int(m.sum())) for name, m in masks.items()},
        pruned=pruned, restored=restored,
        delta_f_change=change if criterion.evidence_based else None, multiple=multiple,
        sizes={layer[name]: g.num_structures for name, g in gates(model).items()},
    )
