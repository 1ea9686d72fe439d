"""Budgets: prune in the order of a criterion's evidence until the compacted network fits.

A budget says how much of the full network may remain after compaction, as a fraction of
the full network's FLOPs, parameters or measured latency (``{"flops": 0.2}``: at most 20 %
of the FLOPs remain). :func:`budget_cut` ranks the family slots by the criterion's family
score (for BMRS ``-delta F``, so the structures with the strongest evidence for removal come
first), finds the shortest prefix of that ranking whose removal meets the budget, and prunes
that prefix or the criterion's own decision (``delta F >= 0`` for BMRS, the threshold for the
baselines), whichever removes more. Both numbers are reported in a :class:`BudgetResult`, so
that what the evidence says and what the budget forced stay visible.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..compaction import compact, count_flops, count_parameters
from ..errors import BMRSError
from ..gates import gate_layout, gates
from ..structures.sites import PRODUCERS
from .criteria import Criterion, EvidenceCriterion, resolve_criterion
from .slots import family_scores, pruned_slots, set_masks

__all__ = ["BUDGET_KINDS", "BudgetResult", "budget_cut", "parse_budget"]

#: What a budget can bound, as a fraction of the full network (gates folded, nothing removed).
BUDGET_KINDS = ("flops", "params", "latency")
_LABELS = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}


@dataclass(frozen=True)
class BudgetResult:
    """The masks a budget leads to, and what the criterion alone would have pruned.

    Structure counts count every gated structure (a family slot counts once per member).
    Fractions are of the full network: the compacted network's FLOPs, parameters or eval
    latency over those of the same network with nothing removed.

    Attributes:
        masks: keep masks per gate (bool), to pass to :func:`bmrs.pruning.set_masks`.
        criterion: the criterion's name.
        rule: its own pruning rule, in words (``"delta F >= 0"`` for BMRS_N).
        budget: ``{kind: fraction to keep}`` as given.
        structures: gated structures in all.
        evidence_pruned: structures the criterion's own rule prunes (``delta F >= 0`` for
            BMRS), ``None`` for a criterion without one (l2, taylor, random).
        evidence_kept: ``{kind: fraction remaining}`` under the criterion's own rule.
        budget_pruned: structures the budget needs (the shortest prefix of the ranking).
        budget_kept: ``{kind: fraction remaining}`` with that prefix removed.
        pruned: structures pruned in the end: the larger of the two.
        kept: ``{kind: fraction remaining}`` in the end.
        kept_structures: unmasked structures per gate in the end.
    """

    masks: dict[str, Tensor]
    criterion: str
    rule: str
    budget: dict[str, float]
    structures: int
    evidence_pruned: int | None
    evidence_kept: dict[str, float] | None
    budget_pruned: int
    budget_kept: dict[str, float]
    pruned: int
    kept: dict[str, float]
    kept_structures: dict[str, int]

    @property
    def forced(self) -> int:
        """Structures pruned because of the budget beyond what the criterion's rule prunes."""
        return self.pruned - (self.evidence_pruned or 0)

    def summary(self) -> str:
        """Two or three lines: what the evidence prunes, what the budget needs, the outcome."""
        goal = ", ".join(f"{_LABELS[k]} <= {_pct(v)}" for k, v in self.budget.items())
        rule = self.rule
        if self.evidence_pruned is None:
            first = f"{self.criterion} has no pruning rule of its own (it needs a budget or a target)"
        else:
            first = (f"{rule} prunes {self.evidence_pruned} of {self.structures} structures "
                     f"({_fractions(self.evidence_kept)} remain)")
        second = (f"the budget ({goal}) needs {self.budget_pruned} of {self.structures} "
                  f"({_fractions(self.budget_kept)} remain)")
        if self.evidence_pruned is not None and self.evidence_pruned >= self.budget_pruned:
            third = f"pruned {self.pruned}: the evidence alone meets the budget"
        else:
            third = f"pruned {self.pruned}: {self.forced} forced by the budget beyond the evidence"
        return "\n".join((first, second, third))

    def __str__(self) -> str:
        return self.summary()


def parse_budget(text: str | dict) -> dict[str, float]:
    """``"flops=0.2"`` or ``"flops=0.2,params=0.3"`` (or a dict) as a checked ``{kind: fraction}``."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",")):
            kind, sep, value = part.partition("=")
            if not sep:
                raise BMRSError(f"a budget is KIND=FRACTION (e.g. flops=0.2), got {part!r}")
            try:
                items.append((kind.strip(), float(value)))
            except ValueError:
                raise BMRSError(f"budget {kind.strip()}: {value.strip()!r} is not a number") from None
    budget = {}
    for kind, value in items:
        if kind not in BUDGET_KINDS:
            raise BMRSError(f"unknown budget kind {kind!r}; choose from {', '.join(BUDGET_KINDS)}")
        if kind in budget:
            raise BMRSError(f"budget kind {kind} given twice ({kind}={budget[kind]:g} and {kind}={value}); give each once")
        if not 0.0 < float(value) <= 1.0:
            raise BMRSError(f"budget {kind}={value}: the fraction of the full network to keep must lie in (0, 1]")
        budget[kind] = float(value)
    if not budget:
        raise BMRSError("the budget is empty; give e.g. {'flops': 0.2}")
    return budget


def budget_cut(
    model: nn.Module,
    criterion: Criterion | str,
    budget: dict | str,
    example_input,
    *,
    keep_pruned: bool = False,
) -> BudgetResult:
    """The masks that meet ``budget``, pruning in the order of ``criterion``'s evidence.

    Each candidate is measured on the network :func:`~bmrs.compaction.compact` makes of
    it, with ``example_input``: FLOPs with :func:`~bmrs.compaction.count_flops`, parameters
    with :func:`~bmrs.compaction.count_parameters`, latency as the fastest eval-mode time of
    a forward pass on ``example_input`` (its batch size, PyTorch's current thread setting),
    timed interleaved with the full network. FLOPs and parameters fall monotonically with
    every slot removed, so the shortest prefix is found by bisection and the budget holds
    exactly; latency is noisy, and the prefix found is where the measured ratio crossed it.
    ``model`` is not modified (see :func:`bmrs.pruning.prune` to write the masks).

    Raises:
        ValueError: for an unknown kind or a fraction outside (0, 1], or a budget that
            removing every structure cannot meet (a layer keeps one structure).
    """
    criterion = resolve_criterion(criterion)

    budget = parse_budget(budget)
    layout = gate_layout(model)
    scores = torch.cat(family_scores(model, criterion))
    first = torch.cat(pruned_slots(model)) if keep_pruned else torch.zeros(len(scores), dtype=torch.bool)
    order = torch.sort(torch.where(first, -torch.inf, scores), stable=True).indices
    members = torch.cat([torch.full((f.size,), len(f.members)) for f in layout.families])
    sizes = [f.size for f in layout.families]
    names = list(gates(model))

    def masks_for(k: int) -> dict[str, Tensor]:
        gone = torch.zeros(len(scores), dtype=torch.bool)
        gone[order[:k]] = True
        masks = {name: torch.ones(gates(model)[name].num_structures, dtype=torch.bool) for name in names}
        for fam, slots in zip(layout.families, torch.split(gone, sizes)):
            for name, idx in fam.members:
                masks[name][torch.as_tensor(idx)] = ~slots
        return masks

    def structures(k: int) -> int:
        return int(members[order[:k]].sum())

    measure = _Measure(model, example_input, budget)

    def fits(k: int, exact: bool = False) -> bool:
        kept = (measure.exact if exact else measure)(masks_for(k))
        return all(v <= budget[kind] + 1e-12 for kind, v in kept.items())

    evidence = None
    if criterion.threshold is not None:
        prune_rule = scores <= criterion.threshold if criterion.evidence_based else scores < criterion.threshold
        evidence = int((prune_rule | first).sum())
    n = len(scores)
    if not fits(n, exact=True):
        raise BMRSError(
            f"the budget {_goal(budget)} cannot be met: with every structure pruned (one kept per layer), "
            f"{_fractions(measure.exact(masks_for(n)))} remain"
        )
    lo, hi = 0, n  # the smallest k with fits(k)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    while not fits(lo, exact=True):  # only if the fast count and the compacted network disagree
        lo += 1
    final = max(lo, evidence or 0)
    masks = masks_for(final)
    return BudgetResult(
        masks=masks, criterion=criterion.name, rule=_rule(criterion), budget=budget,
        structures=int(members.sum()),
        evidence_pruned=None if evidence is None else structures(evidence),
        evidence_kept=None if evidence is None else measure.exact(masks_for(evidence)),
        budget_pruned=structures(lo), budget_kept=measure.exact(masks_for(lo)),
        pruned=structures(final), kept=measure.exact(masks), kept_structures={n: int(m.sum()) for n, m in masks.items()},
    )


class _Measure:
    """Fractions of the full network that remain under given masks, per budget kind.

    ``exact`` compacts the masked network and counts it. ``__call__`` counts FLOPs and
    parameters from the removed rows and columns of every Linear/Conv/norm layer (the
    families' ``effects``) when that reproduces the full network's counts, which is much
    faster; the bisection uses it and every reported number is then counted exactly.
    """

    def __init__(self, model: nn.Module, example_input, budget: dict[str, float]) -> None:
        if example_input is None:
            raise BMRSError("a budget needs example_input: the FLOPs, parameters and latency are measured on it")
        self.inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
        self.kinds = list(budget)
        self.net = copy.deepcopy(model).eval()
        self.layout = gate_layout(self.net)
        self.full_flops = count_flops(self.net, self.inputs)
        self.full_params = count_parameters(self.net)
        self.full = None
        if "latency" in self.kinds:
            self.full = compact(self.net_with(None), self.inputs, check=False)
        self.layers = self._layers()
        self.cache: dict[tuple, dict[str, float]] = {}
        self.exact_cache: dict[tuple, dict[str, float]] = {}

    def net_with(self, masks: dict[str, Tensor] | None) -> nn.Module:

        if masks is None:
            masks = {n: torch.ones(g.num_structures, dtype=torch.bool) for n, g in gates(self.net).items()}
        set_masks(self.net, masks)
        return self.net

    def _layers(self) -> dict[str, tuple[int, int, int, int]] | None:
        """Per Linear/Conv: (FLOPs per output-input pair, out, in, parameters per pair), or
        None when these do not add up to the full network's counts (attention, groups)."""
        if any(not f.effects for f in self.layout.families):
            return None
        found, handles = {}, []
        for name, module in self.net.named_modules():
            if isinstance(module, PRODUCERS):
                if getattr(module, "groups", 1) != 1:
                    return None

                def hook(mod, args, out, name=name):
                    out_dim = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                    in_dim = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                    per_pair = mod.weight.numel() // (out_dim * in_dim)
                    found[name] = (2 * (out.numel() // out_dim) * per_pair, out_dim, in_dim, per_pair)

                handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.net_with(None)(*self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        if sum(f * o * i for f, o, i, _ in found.values()) != self.full_flops:
            return None
        return found

    def __call__(self, masks: dict[str, Tensor]) -> dict[str, float]:
        key = tuple(tuple(m.tolist()) for m in masks.values())
        if key in self.cache:
            return self.cache[key]
        if self.layers is None or "latency" in self.kinds:
            return self.exact(masks)
        cut: dict[tuple[str, str], set[int]] = {}
        for fam in self.layout.families:
            gone = torch.stack([~masks[n][torch.as_tensor(idx)] for n, idx in fam.members]).all(dim=0)
            slots = torch.nonzero(gone).flatten().tolist()
            if len(slots) == fam.size:  # compaction keeps one placeholder
                slots = slots[1:]
            for name, side, per_slot in fam.effects:
                indices = cut.setdefault((name, side), set())
                for j in slots:
                    indices.update(per_slot[j])
        modules = dict(self.net.named_modules())
        flops, params = 0, self.full_params
        for name, (per_pair, out_dim, in_dim, _) in self.layers.items():
            flops += per_pair * (out_dim - len(cut.get((name, "out"), ()))) * (in_dim - len(cut.get((name, "in"), ())))
        for name in {n for n, _ in cut}:
            params -= _removed(modules[name], len(cut.get((name, "out"), ())), len(cut.get((name, "in"), ())))
        found = {"flops": flops / self.full_flops, "params": params / self.full_params}
        self.cache[key] = {kind: found[kind] for kind in self.kinds}
        return self.cache[key]

    def exact(self, masks: dict[str, Tensor]) -> dict[str, float]:
        """Compact the masked network and count (and time) it; once per set of masks."""
        key = tuple(tuple(m.tolist()) for m in masks.values())
        if key in self.exact_cache:
            return self.exact_cache[key]
        small = compact(self.net_with(masks), self.inputs, check=False)
        found = {}
        for kind in self.kinds:
            if kind == "flops":
                found[kind] = count_flops(small, self.inputs) / self.full_flops
            elif kind == "params":
                found[kind] = count_parameters(small) / self.full_params
            else:
                found[kind] = _latency_ratio(small, self.full, self.inputs)
        self.cache[key] = self.exact_cache[key] = found
        return found


def _removed(module: nn.Module, n_out: int, n_in: int) -> int:
    """Parameter elements of ``module`` lost when ``n_out`` output and ``n_in`` input indices go."""
    total = 0
    for p in module.parameters(recurse=False):
        if p.dim() >= 2:  # Linear [out, in], Conv [out, in, *k]
            rest = p.numel() // (p.shape[0] * p.shape[1])
            total += p.numel() - (p.shape[0] - n_out) * (p.shape[1] - n_in) * rest
        elif p.dim() == 1:  # bias and norm parameters live on the output side
            total += min(n_out, p.shape[0])
    return total


def _latency_ratio(small: nn.Module, full: nn.Module, inputs: tuple, repeats: int = 15) -> float:
    """Fastest time of ``small`` over that of ``full``, timed interleaved (eval, no grad)."""
    times = {id(small): [], id(full): []}
    with torch.inference_mode():
        for net in (small, full):
            net(*inputs)
        for rep in range(repeats):
            for net in ((small, full) if rep % 2 == 0 else (full, small)):
                start = time.perf_counter()
                net(*inputs)
                times[id(net)].append(time.perf_counter() - start)
    return min(times[id(small)]) / min(times[id(full)])  # pauses for other processes only add time


def _rule(criterion: Criterion) -> str:
    """The criterion's own rule in words: ``delta F >= margin`` for the evidence criteria."""
    if not criterion.evidence_based:
        return f"{criterion.name}'s threshold ({criterion.threshold:g})" if criterion.threshold is not None else ""
    if type(criterion).gate_margin is not EvidenceCriterion.gate_margin:
        return "delta F >= its per-structure margin"
    return "delta F >= 0" if criterion.margin == 0 else f"delta F >= {criterion.margin:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _goal(budget: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in budget.items())


def _fractions(kept: dict[str, float]) -> str:
    return ", ".join(f"{_pct(v)} of the {_LABELS[k]}" for k, v in kept.items())
