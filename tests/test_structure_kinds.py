"""Structure kinds are classes with one interface (bmrs.structures.kinds.StructureKind), resolved by
name from a registry, and compaction removes each kind through a dispatch on its class."""

from __future__ import annotations

import pytest
import torch

from bmrs import BMRSError, gate_layout
from bmrs.compaction import compact
from bmrs.models import build_model
from bmrs.pruning import make_criterion, prune
from bmrs.structures.kinds import (
    STRUCTURE_KINDS, Channels, Heads, StructureKind, register_structure_kind, structure_kind,
)


@pytest.fixture
def registry():
    saved = dict(STRUCTURE_KINDS)
    yield STRUCTURE_KINDS
    STRUCTURE_KINDS.clear()
    STRUCTURE_KINDS.update(saved)


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 3, width=12).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert gate_layout(model).sites  # the bundled models come gated
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, x


def test_the_generic_kinds_are_registered_by_name():
    assert isinstance(STRUCTURE_KINDS["channels"], Channels)
    assert isinstance(STRUCTURE_KINDS["heads"], Heads)
    model, _ = _mlp()
    assert {type(structure_kind(site, model)) for site in gate_layout(model).sites.values()} == {Channels}


def test_a_new_kind_plugs_in_through_the_interface(registry):
    """A subclass of a kind is found by name, weighed by its input_weights and removed by
    the removal registered for its base class: the compacted network equals the gated one."""

    class Neurons(Channels):
        name = "neurons"

    register_structure_kind(Neurons())
    model, x = _mlp()
    before = make_criterion("l2").structure_scores(model)
    for site in gate_layout(model).sites.values():
        site.kind = "neurons"
    assert make_criterion("l2").structure_scores(model).keys() == before.keys()
    assert all(torch.equal(make_criterion("l2").structure_scores(model)[k], before[k]) for k in before)
    prune(model, make_criterion("l2"), target=0.5)
    model.eval()
    small = compact(model, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-9)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_kind_without_a_removal_is_refused_by_compact(registry):
    class Unremovable(StructureKind):
        name = "unremovable"

        def input_weights(self, model, site):
            return model.get_submodule(site.producer).weight

    register_structure_kind(Unremovable())
    model, x = _mlp()
    for site in gate_layout(model).sites.values():
        site.kind = "unremovable"
    with pytest.raises(NotImplementedError, match="no removal is registered"):
        compact(model, x)


def test_an_unknown_kind_without_an_adapter_is_a_user_error():
    model, x = _mlp()
    for site in gate_layout(model).sites.values():
        site.kind = "ffn-neurons"
    with pytest.raises(BMRSError, match="no adapter handles this model"):
        compact(model, x)
    with pytest.raises(TypeError):
        register_structure_kind(StructureKind())  # a kind needs a name


def test_an_adapter_without_the_protocols_methods_is_refused():
    from bmrs.structures.adapters import ADAPTERS, Adapter, register_adapter

    class Partial:
        def handles(self, model):
            return False

        def layout(self, model, example_input, *, exclude, heads):
            return [], [], []

    with pytest.raises(BMRSError, match="has no compact, input_weights, architecture"):
        register_adapter(Partial())
    assert not any(isinstance(a, Partial) for a in ADAPTERS)
    assert all(isinstance(a, Adapter) for a in ADAPTERS)
