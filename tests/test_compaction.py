"""Compaction: the compacted network must compute what the gated network computes in eval mode.

The truth is always the gated model itself (``model.eval()(x)``), in float64 so that the
tolerances mean something. Gate posteriors are set to varied values so that E[theta] is far
from 1, and every test checks that the gates change the outputs, so a compaction that
forgot to fold them would fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bmrs import attach_gates, detach_gates, gate_layout, gates
from bmrs.compaction import compact, count_flops, count_parameters, load_compact, save_compact
from bmrs.models import build_model
from bmrs.pruning import decide, make_criterion, parameter_compression, set_masks
from bmrs.pruning import count_trainable_parameters as count_trainable

from nets import randomize

SHAPES = {
    "mlp": (1, 8, 8), "lenet5": (1, 28, 28), "lenet5-gelu": (1, 28, 28), "resnet": (3, 16, 16), "transformer": (5, 16),
    "vit": (3, 16, 16),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models run much faster on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A gated model with random weights, BatchNorm statistics and gate posteriors."""
    torch.manual_seed(seed)
    if name == "transformer":
        model = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
        attach_gates(model, torch.zeros(2, *SHAPES[name]))  # its attention heads and feed-forward units
    elif name == "vit":
        model = build_model("vit", SHAPES[name], 10, patch_size=4, embed_dim=16, depth=2, num_heads=4)
    elif name == "mlp":
        model = build_model("mlp", SHAPES[name], 10, width=24)
    elif name == "lenet5-gelu":
        model = build_model("lenet5", SHAPES[name], 10, activation="gelu")
    elif name == "resnet":
        model = build_model("resnet", SHAPES[name], 10, depth=8, width=4)
    else:
        model = build_model(name, SHAPES[name], 10)
    model = model.to(dtype)
    randomize(model, gates(model))
    return model


def inputs(name: str, batch: int = 5, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SHAPES[name], dtype=dtype, generator=torch.Generator().manual_seed(seed))


def set_family_masks(model: nn.Module, rule, seed: int = 0) -> None:
    """Masks per family slot from ``rule(size, generator) -> bool keep``, the same for every member."""
    generator = torch.Generator().manual_seed(seed)
    masks = {name: torch.ones(g.num_structures, dtype=torch.bool) for name, g in gates(model).items()}
    for family in gate_layout(model).families:
        keep = rule(family.size, generator)
        for name, idx in family.members:
            masks[name][torch.as_tensor(idx)] = keep
    set_masks(model, masks)


def random_keep(size, generator):
    return torch.rand(size, generator=generator) < 0.5


def one_left(size, generator):
    keep = torch.zeros(size, dtype=torch.bool)
    keep[int(torch.randint(size, (1,), generator=generator))] = True
    return keep


def none_left(size, generator):
    return torch.zeros(size, dtype=torch.bool)


def bmrs_masks(model: nn.Module, seed: int = 0) -> None:
    """Half the structures get posteriors piled up near theta = 0; BMRS-N decides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates(model).values():
            low = torch.rand(gate.num_structures, generator=generator) < 0.5
            n = int(low.sum())
            gate.loc[low] = (torch.rand(n, generator=generator) * 4.0 - 20.0).to(gate.loc.dtype)
            gate.log_scale[low] = torch.rand(n, generator=generator).to(gate.loc.dtype)
    set_masks(model, decide(model, make_criterion("bmrs-n-code")))


def assert_equivalent(model: nn.Module, compacted: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    """``compacted(x)`` equals ``model.eval()(x)``, and the gates do matter for that output."""
    with torch.no_grad():
        expected = model.eval()(x)
        ungated = copy.deepcopy(model)
        detach_gates(ungated)
        assert (ungated(x) - expected).abs().max() > 1e-3 * expected.abs().max(), "the gates do not change the output"
        actual = compacted(x)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


MASKS = {
    "random": lambda m: set_family_masks(m, random_keep),
    "bmrs": bmrs_masks,
    "one-left": lambda m: set_family_masks(m, one_left),
    "all-pruned": lambda m: set_family_masks(m, none_left),
}


@pytest.mark.parametrize("masks", list(MASKS))
@pytest.mark.parametrize("name", ["mlp", "lenet5", "lenet5-gelu", "resnet", "transformer", "vit"])
def test_compact_equals_gated_model(name, masks):
    model = make(name)
    MASKS[masks](model)
    pruned = sum(int((g.mask == 0).sum()) for g in gates(model).values())
    assert pruned > 0
    compacted = compact(model, inputs(name, batch=2, seed=7))
    assert not gates(compacted) and not any(m._forward_hooks for m in compacted.modules())
    assert_equivalent(model, compacted, inputs(name))
    assert count_parameters(compacted) < count_parameters(model)


def test_one_layer_fully_pruned_keeps_a_silent_placeholder():
    model = make("lenet5")
    set_family_masks(model, random_keep)
    gates(model)["act2"].mask.zero_()  # every filter of the second convolution (conv2)
    compacted = compact(model, inputs("lenet5", batch=2))
    assert compacted[4].out_channels == 1 and compacted[8].in_features == 25
    assert torch.count_nonzero(compacted[8].weight) == 0
    assert_equivalent(model, compacted, inputs("lenet5"))


def test_family_members_masked_differently():
    """A residual channel masked in one member only stays, with that member's part zeroed."""
    model = make("resnet")
    set_family_masks(model, random_keep)
    gates(model)["blocks.1.bn2"].mask[:3] = 0
    gates(model)["blocks.1.shortcut.1"].mask[:3] = 1
    compacted = compact(model, inputs("resnet", batch=2))
    assert compacted.blocks[1].bn2.num_features == compacted.blocks[1].shortcut[1].num_features
    assert_equivalent(model, compacted, inputs("resnet"))


def test_float32_model():
    model = make("lenet5", dtype=torch.float32)
    set_family_masks(model, random_keep)
    compacted = compact(model, inputs("lenet5", batch=2, dtype=torch.float32))
    assert_equivalent(model, compacted, inputs("lenet5", dtype=torch.float32), rtol=1e-5)


def test_non_default_log_bounds():
    torch.manual_seed(0)
    model = build_model("mlp", SHAPES["mlp"], 10, width=24, gated=False)
    attach_gates(model, torch.zeros(2, *SHAPES["mlp"]), log_low=-8.0, log_high=1.5)
    model = model.double()
    with torch.no_grad():
        for gate in gates(model).values():
            gate.loc.uniform_(-3.0, 1.5)
            gate.log_scale.uniform_(-3.0, 1.0)
    set_family_masks(model, random_keep)
    assert max(float(g.expected_gate().detach().max()) for g in gates(model).values()) > 1.0
    assert_equivalent(model, compact(model, inputs("mlp", batch=2)), inputs("mlp"))


def test_input_model_is_untouched():
    model = make("resnet").train()
    set_family_masks(model, random_keep)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    compact(model, inputs("resnet", batch=2))
    assert model.training and set(gates(model)) == set(gate_layout(model).sites)
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_parameter_count_matches_parameter_compression():
    """On the MLP (d -> h1 -> h2 -> c) the deleted parameters follow from the masks exactly.

    With k1, k2 neurons kept, the MLP has n(k1, k2) = k1 (d + 1) + k2 (k1 + 1) + c (k2 + 1)
    parameters. parameter_compression counts n(h, h) - n(k1, k2) plus the pruned neurons'
    gate parameters (2 each). Compaction deletes n(h, h) - n(k1', k2'), where k' = max(k, 1):
    a layer that loses every neuron keeps one placeholder. So the two counts differ by the
    gates' parameters and by the placeholders' n(k1', k2') - n(k1, k2), and by nothing else.
    """
    d, h, c = 64, 24, 10

    def n(k1, k2):
        return k1 * (d + 1) + k2 * (k1 + 1) + c * (k2 + 1)

    for keep_first, keep_second in ((random_keep, random_keep), (none_left, random_keep), (random_keep, none_left)):
        model = make("mlp")
        first, second = (fam.members[0][0] for fam in gate_layout(model).families)
        generator = torch.Generator().manual_seed(3)
        masks = {first: keep_first(h, generator), second: keep_second(h, generator)}
        set_masks(model, masks)
        k1, k2 = (int(m.sum()) for m in masks.values())
        compacted = compact(model, inputs("mlp", batch=2))
        assert count_parameters(model) == n(h, h)
        assert count_parameters(compacted) == n(max(k1, 1), max(k2, 1))
        deleted = count_parameters(model) - count_parameters(compacted)
        counted = round(parameter_compression(model) * count_trainable(model))
        gate_params = 2 * (2 * h - k1 - k2)
        placeholders = n(max(k1, 1), max(k2, 1)) - n(k1, k2)
        assert counted == deleted + gate_params + placeholders


def test_flop_counts_are_twice_the_multiply_adds():
    model = make("lenet5")
    x = inputs("lenet5", batch=3)
    macs = 6 * 25 * 28 * 28 + 16 * 6 * 25 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_flops(model, x) == 2 * 3 * macs
    set_family_masks(model, random_keep)
    assert count_flops(model, x) == 2 * 3 * macs  # masks do not change the gated model's work
    k = {name: max(int(g.mask.sum()), 1) for name, g in gates(model).items()}
    compacted = compact(model, x)
    macs = k["act1"] * 25 * 28 * 28 + k["act2"] * k["act1"] * 25 * 100 + 25 * k["act2"] * k["act3"] + k["act3"] * k["act4"] + k["act4"] * 10
    assert count_flops(compacted, x) == 2 * 3 * macs


@pytest.mark.parametrize("name,options", [
    ("mlp", {"width": 24}), ("lenet5", {}), ("resnet", {"depth": 8, "width": 4}),
    ("vit", {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 4}),
])
def test_save_and_load(tmp_path, name, options):
    model = make(name)
    set_family_masks(model, random_keep)
    compacted = compact(model, inputs(name, batch=2))
    path = tmp_path / f"{name}.pt"
    architecture = {"name": name, "input_shape": list(SHAPES[name]), "num_classes": 10, "options": options}
    save_compact(compacted, path, architecture=architecture)
    assert isinstance(torch.load(path, weights_only=True)["metadata"], str)
    loaded = load_compact(path)
    assert not loaded.training
    x = inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compacted(x), rtol=0, atol=0)
    assert count_parameters(loaded) == count_parameters(compacted)


def test_save_and_load_user_model(tmp_path):
    model = make("transformer")
    set_family_masks(model, random_keep)
    compacted = compact(model, inputs("transformer", batch=2))
    save_compact(compacted, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="without an architecture"):
        load_compact(tmp_path / "t.pt")
    blank = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True).double()
    loaded = load_compact(tmp_path / "t.pt", model=blank)
    assert blank.linear1.out_features == 32 and loaded.linear1.out_features == compacted.linear1.out_features
    x = inputs("transformer")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compacted(x), rtol=0, atol=0)


def test_architectures_resolve_registered_then_bundled(tmp_path, monkeypatch):
    """load_compact finds a bundled builder by name (registered by bmrs.models), a later
    registration before a bundled one of the same name, and names the known ones otherwise."""
    from bmrs import models
    from bmrs.compaction import architecture_builder, register_architecture

    from bmrs.compaction import storage

    monkeypatch.setattr(storage, "ARCHITECTURES", dict(storage.ARCHITECTURES))
    assert architecture_builder("lenet5") is models.lenet5
    with pytest.raises(ValueError, match="neither registered nor bundled.*lenet5, mlp, resnet"):
        architecture_builder("lenet6")
    calls = []
    register_architecture("mlp", lambda *a, **k: calls.append(a) or models.mlp(*a, **k))
    compacted = compact(make("mlp"), inputs("mlp", batch=2))
    architecture = {"name": "mlp", "input_shape": list(SHAPES["mlp"]), "num_classes": 10, "options": {"width": 24}}
    save_compact(compacted, tmp_path / "m.pt", architecture=architecture)
    load_compact(tmp_path / "m.pt")
    assert calls and all(c == (list(SHAPES["mlp"]), 10) for c in calls)  # the registered builder, not the bundled one
    with pytest.raises(ValueError, match="'lenet6' is neither"):
        save_compact(compacted, tmp_path / "x.pt", architecture={**architecture, "name": "lenet6"})


def test_whole_module_pickles(tmp_path):
    model = make("resnet")
    set_family_masks(model, random_keep)
    compacted = compact(model, inputs("resnet", batch=2))
    torch.save(compacted, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    x = inputs("resnet")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compacted(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("name,how", [
    ("mlp", "export"), ("mlp", "trace"), ("lenet5", "export"), ("lenet5", "trace"), ("resnet", "trace"),
])
def test_export_and_trace(name, how):
    model = make(name)
    set_family_masks(model, random_keep)
    compacted = compact(model, inputs(name, batch=2))
    x = inputs(name)
    with torch.no_grad():
        if how == "export":
            exported = torch.export.export(compacted, (x,)).module()
        else:
            exported = torch.jit.trace(compacted, (x,))
        torch.testing.assert_close(exported(inputs(name, seed=3)), compacted(inputs(name, seed=3)))


def test_coupled_gate_that_only_folds_forward_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.inner, self.act, self.head = nn.Linear(8, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.act(self.inner(h)) + h)

    model = Residual()
    layout = attach_gates(model, torch.zeros(2, 8))
    assert any(len(f.members) > 1 for f in layout.families)
    with pytest.raises(ValueError, match="residual addition"):
        compact(model, torch.zeros(2, 8))


def test_gate_whose_output_is_shifted_is_refused():
    """tanh before the gate blocks backward folding; the shift after it blocks forward folding."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)) + 1.0)

    model = Shifted()
    attach_gates(model, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="cannot be folded .* AddBackward"):
        compact(model, torch.zeros(2, 8))


def test_attention_heads_leave_whole():
    model = make("transformer")
    layout = gate_layout(model)
    heads = next(name for name, site in layout.sites.items() if site.kind == "heads")
    gates(model)[heads].mask.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    compacted = compact(model, inputs("transformer", batch=2))
    assert compacted.self_attn.num_heads == 2
    assert_equivalent(model, compacted, inputs("transformer"))
