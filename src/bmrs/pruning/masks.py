"""Turning criteria into masks, and counting what the masks remove."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..errors import BMRSError
from ..gates import check_finite_gates, gate_layout, gates, layer_names
from ..structures.kinds import Blocks
from .budget import budget_cut
from .criteria import Criterion, resolve_criterion
from .slots import family_scores, pruned_slots, set_masks

__all__ = [
    "decide", "prune", "kept_structures", "kept_per_layer", "structure_compression",
    "parameter_compression", "count_trainable_parameters", "removed_parameters",
]


def decide(
    model: nn.Module,
    criterion: Criterion | str,
    *,
    target: float | None = None,
    target_kind: str = "structures",
    keep_pruned: bool = True,
    budget: dict | str | None = None,
    example_input=None,
):
    """Keep masks (bool, per gate) that ``criterion`` decides for ``model``.

    Args:
        criterion: a :class:`~bmrs.pruning.criteria.Criterion`, or its name or label
            (``"bmrs-n-kr"``, ``"bmrs-u4"``; see :func:`~bmrs.pruning.criteria.resolve_criterion`).
        target: ``None`` to use the criterion's own rule (delta F >= 0 prunes for BMRS, the
            threshold for the baselines); or a compression in [0, 1]: prune the
            lowest-scored structures across all layers until that fraction is removed.
        target_kind: what ``target`` counts: ``"structures"`` (gated structures) or
            ``"params"`` (trainable parameters, as :func:`parameter_compression` counts them).
        keep_pruned: structures already masked stay pruned (and count towards ``target``);
            the default, as in :func:`prune`, so that a decision never brings back a
            structure the model has lost. ``False`` decides from the scores alone, as if
            nothing were masked.
        budget: instead of ``target``, what may remain of the compacted network as a
            fraction of the full one, e.g. ``{"flops": 0.2}`` (also ``"params"``,
            ``"latency"``; several kinds must all hold): structures are pruned in the order of
            the criterion's scores until the budget holds, or as the criterion's own rule
            says if that prunes more. Then a :class:`~bmrs.pruning.budget.BudgetResult` is
            returned (its ``masks``, and what the rule and the budget each prune) instead of
            the masks. Needs ``example_input`` (see :func:`~bmrs.pruning.budget.budget_cut`).
        example_input: an input of the model, for ``budget``.

    Families of coupled structures are decided as one, from the criterion's family score.
    """
    criterion = resolve_criterion(criterion)
    if budget is not None:
        if target is not None:
            raise BMRSError("give a target or a budget, not both")
        check_finite_gates(model, masked=not keep_pruned)
        return budget_cut(model, criterion, budget, example_input, keep_pruned=keep_pruned)
    if target_kind not in ("structures", "params"):
        raise BMRSError(f"target_kind must be 'structures' or 'params', got {target_kind!r}")
    model = unwrap(model)
    layout = gate_layout(model)
    check_finite_gates(model, masked=not keep_pruned)
    scores = family_scores(model, criterion)
    already = pruned_slots(model)
    if target is None:
        if criterion.threshold is None:
            raise BMRSError(f"criterion {criterion.name!r} has no threshold: give a target compression")
        keep_slots = []
        for score in scores:
            # BMRS prunes at delta F >= 0, i.e. keeps -delta F > 0; baselines keep score >= threshold
            keep_slots.append(score > criterion.threshold if criterion.evidence_based else score >= criterion.threshold)
    else:
        if not 0.0 <= float(target) <= 1.0:
            raise BMRSError(f"target compression must lie in [0, 1], got {target}")
        keep_slots = _rank_and_cut(model, layout, scores, already if keep_pruned else None, float(target), target_kind)
    if keep_pruned:
        keep_slots = [k & ~a for k, a in zip(keep_slots, already)]
    masks = {name: torch.ones(g.num_structures, dtype=torch.bool) for name, g in gates(model).items()}
    for fam, keep in zip(layout.families, keep_slots):
        for name, idx in fam.members:
            masks[name][torch.as_tensor(idx)] = keep
    return masks


def _rank_and_cut(model, layout, slot_scores, already, target, target_kind) -> list[Tensor]:
    scores = torch.cat(slot_scores)
    if already is not None:  # pruned structures go first
        scores = torch.where(torch.cat(already), -torch.inf, scores)
    order = torch.sort(scores, stable=True).indices
    sizes = [f.size for f in layout.families]

    def pruned_by(k: int) -> list[Tensor]:
        gone = torch.zeros(len(scores), dtype=torch.bool)
        gone[order[:k]] = True
        return list(torch.split(gone, sizes))

    if target_kind == "structures":
        weights = torch.cat([torch.full((f.size,), float(len(f.members))) for f in layout.families])
        removed = torch.cumsum(weights[order].double(), 0) / float(weights.sum())
        # smallest prefix of the ranking whose removal reaches the target
        k = int(torch.searchsorted(removed, torch.tensor(target, dtype=torch.float64) - 1e-12)) + 1 if target > 0 else 0
    else:  # removal counts overlap between layers: bisect on the exact count
        total = float(count_trainable_parameters(model))
        lo, hi = 0, len(scores)
        while lo < hi:
            mid = (lo + hi) // 2
            if removed_parameters(model, pruned_by(mid)) / total >= target - 1e-12:
                hi = mid
            else:
                lo = mid + 1
        k = lo
    return [~gone for gone in pruned_by(min(k, len(scores)))]


def prune(
    model: nn.Module,
    criterion: Criterion | str,
    *,
    target: float | None = None,
    target_kind: str = "structures",
    keep_pruned: bool = True,
    budget: dict | str | None = None,
    example_input=None,
):
    """Decide with ``criterion`` (see :func:`decide`), write the masks, return kept counts per gate.

    By default a structure pruned earlier stays pruned (``keep_pruned=True``, as in
    :func:`decide`). With a ``budget`` (e.g. ``{"flops": 0.2}``, with ``example_input``) the
    masks are written and the :class:`~bmrs.pruning.budget.BudgetResult` is returned:
    ``print(result)`` says what ``delta F >= 0`` prunes and what the budget needs;
    ``result.kept_structures`` are the kept counts.
    """
    criterion = resolve_criterion(criterion)
    if budget is not None:
        result = decide(model, criterion, target=target, keep_pruned=keep_pruned, budget=budget, example_input=example_input)
        set_masks(model, result.masks)
        return result
    masks = decide(model, criterion, target=target, target_kind=target_kind, keep_pruned=keep_pruned)
    set_masks(model, masks)
    return kept_structures(model)


def kept_structures(model: nn.Module) -> dict[str, int]:
    """Number of unmasked structures per gate."""
    return {name: int(g.mask.sum().item()) for name, g in gates(model).items()}


def kept_per_layer(model: nn.Module) -> dict[str, int]:
    """:func:`kept_structures` keyed by the name of the layer each gate prunes
    (:func:`bmrs.layer_names`): what bmrs prints, logs and writes into run metrics."""
    names = layer_names(model)
    return {names[name]: k for name, k in kept_structures(model).items()}


def structure_compression(model: nn.Module) -> float:
    """Fraction of gated structures that are pruned."""
    named = gates(model)
    total = sum(g.num_structures for g in named.values())
    return (total - sum(kept_structures(model).values())) / total if total else 0.0


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters of the (gated) model, gates included."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def removed_parameters(model: nn.Module, pruned: list[Tensor]) -> int:
    """Trainable parameters removed when the given family slots are removed.

    Counted per parameter tensor from the surviving rows and columns, so a weight between
    two removed units is removed once; plus the removed structures' gate parameters. A
    removed residual block (kind ``"blocks"``) counts every parameter in it, gates
    included, and nothing inside it is counted again; a family slot tied to layers both
    inside and outside it counts as removed only when all its members are masked (compaction
    may remove more: the members left outside decide there).
    """
    model = unwrap(model)
    layout = gate_layout(model)
    modules = dict(model.named_modules())
    cut: dict[tuple[str, str], set[int]] = {}
    removed = 0
    # whole residual blocks removed: their parameters, and the gates inside them, go with them
    deleted = [layout.sites[fam.members[0][0]].producer for fam, gone in zip(layout.families, pruned)
               if layout.sites[fam.members[0][0]].kind == Blocks.name and bool(gone.any())]

    def inside(name: str, *, strictly: bool = False) -> bool:
        return any(name.startswith(b + ".") or (name == b and not strictly) for b in deleted)

    for fam, gone in zip(layout.families, pruned):
        slots = torch.nonzero(gone).flatten().tolist()
        first = layout.sites[fam.members[0][0]]
        if first.kind == Blocks.name:
            if slots and not inside(first.producer, strictly=True):
                inner = sum(2 * s.num_structures for s in layout.sites.values() if inside(s.producer) and s is not first)
                removed += fam.slot_params[0] + inner
            continue
        if not fam.effects:  # disjoint per-slot parameters (attention heads)
            if not inside(first.producer):
                removed += sum(fam.slot_params[j] for j in slots)
            continue
        outside = sum(not inside(layout.sites[n].producer) for n, _ in fam.members)
        removed += 2 * outside * len(slots)  # the gates' loc and log_scale
        for name, side, per_slot in fam.effects:
            if inside(name):
                continue
            indices = cut.setdefault((name, side), set())
            for j in slots:
                indices.update(per_slot[j])
    for name in {n for n, _ in cut}:
        removed += _removed_in_module(modules[name], len(cut.get((name, "out"), ())), len(cut.get((name, "in"), ())))
    return removed


def _removed_in_module(module: nn.Module, n_out: int, n_in: int) -> int:
    """Parameters of ``module`` lost when ``n_out`` output and ``n_in`` input indices go."""
    total = 0
    for _, p in module.named_parameters(recurse=False):
        if not p.requires_grad:
            continue
        if p.dim() >= 2:  # Linear [out, in], Conv [out, in, *k]
            rest = p.numel() // (p.shape[0] * p.shape[1])
            total += p.numel() - (p.shape[0] - n_out) * (p.shape[1] - n_in) * rest
        else:  # bias and norm parameters live on the output side
            total += min(n_out, p.shape[0]) if p.dim() == 1 else 0
    return total


def parameter_compression(model: nn.Module) -> float:
    """Fraction of trainable parameters that the current masks remove (the paper's "Comp.").

    A pruned structure removes its incoming weights and bias, its BatchNorm parameters,
    the outgoing weights that read it, and its gate's two parameters; a weight joining two
    removed structures counts once. A family slot counts as removed when every member is
    masked.
    """
    return removed_parameters(model, pruned_slots(model)) / count_trainable_parameters(model)
