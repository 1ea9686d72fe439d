"""Budgets: prune in the order of the evidence until the compacted network fits.

Every budget is checked on the compacted network itself (count_flops / count_parameters of
compact()), and the report must name both what delta F >= 0 prunes and what the budget needs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bmrs
from bmrs.compaction import compact, count_flops, count_parameters
from bmrs.models import build_model
from bmrs.pruning import decide, make_criterion, parse_budget
from bmrs.pruning.budget import _Measure


def gated(name: str, seed: int = 0):
    torch.manual_seed(seed)
    shape = (1, 32, 32) if name == "lenet5" else (1, 8, 8)
    options = {"width": 24, "hidden_layers": 2} if name == "mlp" else {}
    model = build_model(name, shape, 10, **options).eval()
    with torch.no_grad():
        for gate in bmrs.gates(model).values():
            gate.loc.uniform_(-4.0, 0.5)
            gate.log_scale.uniform_(-3.0, 1.0)
    return model, torch.randn(3, *shape, generator=torch.Generator().manual_seed(seed + 1))


def relax_some(model, share: float = 0.3, seed: int = 0) -> None:
    """Posteriors of a share of the structures at the prior's low end: delta F >= 0 prunes them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bmrs.gates(model).values():
            pick = torch.rand(gate.num_structures, generator=generator) < share
            gate.loc[pick] = -15.0
            gate.log_scale[pick] = 1.5


def flops_kept(model, masks, x) -> float:
    net = copy.deepcopy(model)
    bmrs.pruning.set_masks(net, masks)
    return count_flops(compact(net, x), x) / count_flops(model, x)


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_flops_budget_holds_on_the_compacted_network_and_reports_both_numbers(name):
    model, x = gated(name)
    relax_some(model, 0.1)
    before = {n: g.mask.clone() for n, g in bmrs.gates(model).items()}
    result = decide(model, make_criterion("bmrs-n"), budget={"flops": 0.2}, example_input=x)
    assert all(torch.equal(before[n], g.mask) for n, g in bmrs.gates(model).items())  # decide writes nothing
    kept = flops_kept(model, result.masks, x)
    assert kept <= 0.2
    assert result.kept["flops"] == pytest.approx(kept, rel=1e-12)
    assert 0 < result.evidence_pruned < result.budget_pruned == result.pruned
    assert result.forced == result.budget_pruned - result.evidence_pruned
    text = str(result)
    assert f"delta F >= 0 prunes {result.evidence_pruned} of {result.structures}" in text
    assert f"needs {result.budget_pruned} of {result.structures}" in text
    assert "FLOPs <= 20.00 %" in text


def test_the_budget_prunes_the_shortest_prefix_of_the_evidence():
    model, x = gated("mlp")
    criterion = make_criterion("bmrs-n")
    result = decide(model, criterion, budget="flops=0.3", example_input=x)
    scores = criterion.structure_scores(model)
    pruned = torch.cat([scores[n][~m] for n, m in result.masks.items()])
    kept = torch.cat([scores[n][m] for n, m in result.masks.items()])
    assert pruned.max() <= kept.min()  # the strongest evidence for removal goes first
    # one structure fewer (the last pruned one) no longer meets the budget
    name, index = min(((n, int(i)) for n, m in result.masks.items() for i in torch.nonzero(~m).flatten()),
                      key=lambda ni: -float(scores[ni[0]][ni[1]]))
    fewer = {n: m.clone() for n, m in result.masks.items()}
    fewer[name][index] = True
    assert flops_kept(model, fewer, x) > 0.3 >= flops_kept(model, result.masks, x)


def test_evidence_beyond_the_budget_is_kept_and_said():
    model, x = gated("mlp")
    relax_some(model, 0.85)
    result = bmrs.prune(model, make_criterion("bmrs-n"), budget={"flops": 0.5}, example_input=x)
    assert result.evidence_pruned > result.budget_pruned
    assert result.pruned == result.evidence_pruned and result.forced == 0
    assert "the evidence alone meets the budget" in str(result)
    assert bmrs.kept_structures(model) == result.kept_structures  # prune wrote the masks


def test_params_budget_and_a_criterion_without_a_rule():
    model, x = gated("mlp")
    result = decide(model, make_criterion("l2"), budget={"params": 0.25}, example_input=x)
    net = copy.deepcopy(model)
    bmrs.pruning.set_masks(net, result.masks)
    assert count_parameters(compact(net, x)) <= 0.25 * count_parameters(model)
    assert result.evidence_pruned is None and result.forced == result.pruned
    assert "l2 has no pruning rule of its own" in str(result)


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_the_fast_count_equals_the_compacted_network(name):
    model, x = gated(name)
    measure = _Measure(model, x, {"flops": 0.5, "params": 0.5})
    generator = torch.Generator().manual_seed(3)
    for share in (0.2, 0.6, 1.0):  # 1.0: every structure masked, placeholders kept
        masks = {n: torch.rand(g.num_structures, generator=generator) >= share for n, g in bmrs.gates(model).items()}
        fast = measure(masks)
        measure.cache.clear()
        assert fast == measure.exact(masks)


def test_latency_budget_is_measured():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 32, 32), 10).eval()  # 1024-150-150-10: time in its matrix products
    x = torch.randn(64, 1, 32, 32)
    result = decide(model, make_criterion("bmrs-n"), budget={"latency": 0.7}, example_input=x)
    assert 0.0 < result.kept["latency"] <= 0.7 and result.pruned > 0


def test_budget_errors():
    model, x = gated("mlp")
    crit = make_criterion("bmrs-n")
    with pytest.raises(ValueError, match="unknown budget kind 'memory'"):
        parse_budget("memory=0.2")
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        parse_budget({"flops": 0.0})
    with pytest.raises(ValueError, match="KIND=FRACTION"):
        parse_budget("flops")
    with pytest.raises(ValueError, match="not both"):
        decide(model, crit, target=0.5, budget={"flops": 0.2}, example_input=x)
    with pytest.raises(ValueError, match="needs example_input"):
        decide(model, crit, budget={"flops": 0.2})
    with pytest.raises(ValueError, match="cannot be met"):
        decide(model, crit, budget={"flops": 0.001}, example_input=x)
