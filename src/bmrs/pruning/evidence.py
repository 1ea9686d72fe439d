"""What the evidence says about each pruning decision: :func:`explain`.

An evidence criterion (BMRS) prunes a structure where its ΔF reaches the criterion's
margin. The distance ``ΔF − margin`` (nats) is how strongly the evidence favours the
decision: ``ΔF − margin = 1`` is a factor e in the model evidence for removing it,
``ΔF − margin = −1`` a factor e for keeping it. So, per layer, :func:`explain` reports

* how many structures are kept, and the quantiles of ``ΔF − margin`` of the kept and of the
  removed ones;
* the **ambiguous** decisions: ``|ΔF − margin| < 1``, within a factor e of evidence, where
  a little more training or another seed could tip the decision;
* what the evidence alone removes (the criterion's own rule, from the scores alone), and
  where the model's masks differ from it: structures removed **against** the evidence (a
  budget asked for more) and kept **beyond** it (a budget of other kinds, or rounding,
  kept them), with the **evidence spent** on them: the sum of ``|ΔF − margin|`` of those
  structures, in nats;
* the layer the evidence finds most over-parameterised: the largest share of structures
  the evidence alone removes.

Decisions are taken per family (channels tied by residual additions go together, by the sum
of their members' ``ΔF − margin``); the numbers here count and sum each member structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import BMRSError
from ..gates import gates, layer_names
from .criteria import Criterion
from .masks import decide

__all__ = ["AMBIGUITY", "EvidenceReport", "LayerEvidence", "explain"]

#: Decisions with ``|ΔF − margin|`` below this (nats) are ambiguous: within a factor e.
AMBIGUITY = 1.0
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class LayerEvidence:
    """The evidence of one gated layer (see the module's docstring); ``ΔF − margin`` in nats.

    Attributes:
        layer: the layer the gate prunes.
        total: its structures; ``kept``: unmasked now.
        kept_quantiles, removed_quantiles: min, 25 %, median, 75 % and max of ``ΔF − margin``
            of the kept and of the removed structures (``None`` when there are none).
        ambiguous: structures with ``|ΔF − margin| < 1``.
        evidence_removes: structures the criterion's own rule removes (scores alone).
        removed_against: structures masked although the evidence keeps them.
        kept_beyond: structures kept although the evidence removes them.
        evidence_spent: ``|ΔF − margin|`` summed over those two groups.
        delta_f_minus_margin: every structure's ``ΔF − margin``, in the gate's order.
        kept_mask: whether each structure is kept now.
    """

    layer: str
    total: int
    kept: int
    kept_quantiles: tuple[float, ...] | None
    removed_quantiles: tuple[float, ...] | None
    ambiguous: int
    evidence_removes: int
    removed_against: int
    kept_beyond: int
    evidence_spent: float
    delta_f_minus_margin: tuple[float, ...]
    kept_mask: tuple[bool, ...]

    def summary(self) -> dict:
        """The numbers without the per-structure lists (what metrics.json records)."""
        data = asdict(self)
        del data["delta_f_minus_margin"], data["kept_mask"]
        return data


@dataclass(frozen=True)
class EvidenceReport:
    """:func:`explain`'s result: one :class:`LayerEvidence` per gated layer, in order."""

    criterion: str
    layers: list[LayerEvidence]

    @property
    def most_overparameterised(self) -> str:
        """The layer whose largest share of structures the evidence alone removes."""
        return max(self.layers, key=lambda e: (e.evidence_removes / e.total, -self.layers.index(e))).layer

    @property
    def evidence_spent(self) -> float:
        return sum(e.evidence_spent for e in self.layers)

    def summary(self) -> dict:
        """Per layer :meth:`LayerEvidence.summary`, the totals and the most over-parameterised layer."""
        return {
            "criterion": self.criterion,
            "ambiguity_nats": AMBIGUITY,
            "layers": {e.layer: e.summary() for e in self.layers},
            "ambiguous": sum(e.ambiguous for e in self.layers),
            "evidence_removes": sum(e.evidence_removes for e in self.layers),
            "removed_against": sum(e.removed_against for e in self.layers),
            "kept_beyond": sum(e.kept_beyond for e in self.layers),
            "evidence_spent": self.evidence_spent,
            "most_overparameterised": self.most_overparameterised,
        }

    def table(self) -> str:
        """The per-layer numbers as a Markdown table."""
        def q(values):
            return "–" if values is None else f"{values[0]:.3g} / {values[2]:.3g} / {values[4]:.3g}"

        rows = ["| layer | kept | ΔF−margin of kept (min / median / max) | of removed | ambiguous (< 1 nat) "
                "| evidence removes | removed against | kept beyond | evidence spent (nats) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for e in self.layers:
            rows.append(f"| {e.layer} | {e.kept}/{e.total} | {q(e.kept_quantiles)} | {q(e.removed_quantiles)} | "
                        f"{e.ambiguous} | {e.evidence_removes} | {e.removed_against} | {e.kept_beyond} | "
                        f"{e.evidence_spent:.3g} |")
        return "\n".join(rows)


def _quantiles(values: torch.Tensor) -> tuple[float, ...] | None:
    if values.numel() == 0:
        return None
    return tuple(float(v) for v in torch.quantile(values, torch.tensor(_QUANTILES, dtype=values.dtype)))


def explain(model: nn.Module, criterion: Criterion) -> EvidenceReport:
    """The evidence behind the masks of ``model``'s gates under ``criterion`` (an evidence
    criterion, e.g. ``make_criterion("bmrs-n-kr")``); see the module's docstring.

    Raises:
        BMRSError: ``criterion`` is not evidence-based (it has no ΔF), or the model has no gates.
    """
    if not getattr(criterion, "evidence_based", False):
        raise BMRSError(f"{criterion!r} is not an evidence criterion: only BMRS criteria have a delta F to explain")
    named = gates(model)
    if not named:
        raise BMRSError("the model has no gates: attach them with bmrs.attach_gates and train it first")
    layer = layer_names(model)
    with torch.no_grad():
        evidence_keeps = decide(model, criterion, keep_pruned=False)  # the rule, from the scores alone
        layers = []
        for name, gate in named.items():
            distance = (-criterion.score_gate(gate)).double().cpu()  # delta F - margin
            kept = gate.mask.detach().cpu() > 0
            by_evidence = evidence_keeps[name].cpu()
            against = ~kept & by_evidence
            beyond = kept & ~by_evidence
            layers.append(LayerEvidence(
                layer=layer[name], total=gate.num_structures, kept=int(kept.sum()),
                kept_quantiles=_quantiles(distance[kept]), removed_quantiles=_quantiles(distance[~kept]),
                ambiguous=int((distance.abs() < AMBIGUITY).sum()),
                evidence_removes=int((~by_evidence).sum()),
                removed_against=int(against.sum()), kept_beyond=int(beyond.sum()),
                evidence_spent=float(distance[against | beyond].abs().sum()),
                delta_f_minus_margin=tuple(distance.tolist()), kept_mask=tuple(kept.tolist()),
            ))
    return EvidenceReport(getattr(criterion, "name", type(criterion).__name__), layers)
