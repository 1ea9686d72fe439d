"""Attention heads as prunable structures: the modules, head gates, compaction and the ViT."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import bmrs
from bmrs.structures.attention import (
    CompactMultiheadAttention,
    HeadedMultiheadAttention,
    MultiheadSelfAttention,
    compact_attention,
    expose_heads,
    head_input_weights,
    params_per_head,
)
from bmrs.models import MODELS, build_model, vit
from bmrs.pruning import L2, BMRSNCode, Random, Taylor, count_trainable_parameters, decide, parameter_compression, set_masks
from bmrs.structures.sites import find_sites


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return module


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest entry of ``b``."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _set_gate(gate, loc, log_scale=None):
    with torch.no_grad():
        gate.loc.copy_(torch.as_tensor(loc, dtype=gate.loc.dtype))
        if log_scale is not None:
            gate.log_scale.copy_(torch.as_tensor(log_scale, dtype=gate.loc.dtype))


def _quiet_attach(model, example, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bmrs.attach_gates(model, example, **kwargs)


# --- nn.MultiheadAttention with exposed heads behaves exactly like the original ---------------

E, H, N, L = 16, 4, 3, 6

CASES = [
    # batch_first, bias, kdim/vdim, need_weights, average, attn_mask, key padding, is_causal, unbatched
    dict(batch_first=True, bias=True, kv=None, need_weights=False, average=True, mask=None, kpm=False, causal=False, unbatched=False),
    dict(batch_first=False, bias=True, kv=None, need_weights=True, average=True, mask="bool", kpm=False, causal=False, unbatched=False),
    dict(batch_first=True, bias=False, kv=None, need_weights=True, average=False, mask="float", kpm=True, causal=False, unbatched=False),
    dict(batch_first=False, bias=False, kv=None, need_weights=False, average=True, mask="bool", kpm=True, causal=False, unbatched=False),
    dict(batch_first=True, bias=True, kv=None, need_weights=False, average=True, mask="3d", kpm=False, causal=False, unbatched=False),
    dict(batch_first=True, bias=True, kv=None, need_weights=False, average=True, mask="causal", kpm=False, causal=True, unbatched=False),
    dict(batch_first=False, bias=True, kv=None, need_weights=True, average=True, mask="causal", kpm=True, causal=True, unbatched=False),
    dict(batch_first=True, bias=True, kv=(5, 7), need_weights=True, average=False, mask="bool", kpm=True, causal=False, unbatched=False),
    dict(batch_first=False, bias=False, kv=(9, 9), need_weights=False, average=True, mask="float", kpm=False, causal=False, unbatched=False),
    dict(batch_first=True, bias=True, kv=None, need_weights=True, average=True, mask="bool", kpm=True, causal=False, unbatched=True),
]


def _inputs(case, generator):
    kdim, vdim = case["kv"] or (E, E)
    self_attention = case["kv"] is None
    source = L if self_attention else L + 2

    def seq(t, e):
        if case["unbatched"]:
            return torch.randn(t, e, generator=generator)
        shape = (N, t, e) if case["batch_first"] else (t, N, e)
        return torch.randn(*shape, generator=generator)

    query = seq(L, E)
    key, value = (query, query) if self_attention else (seq(source, kdim), seq(source, vdim))
    batch = 1 if case["unbatched"] else N
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand(L, source, generator=generator) < 0.3
        mask[:, 0] = False  # no row is masked entirely
    elif case["mask"] == "float":
        mask = torch.randn(L, source, generator=generator)
    elif case["mask"] == "3d":
        mask = torch.randn(batch * H, L, source, generator=generator)
    elif case["mask"] == "causal":
        mask = nn.Transformer.generate_square_subsequent_mask(L)
    padding = None
    if case["kpm"]:
        padding = torch.rand(batch, source, generator=generator) < 0.3
        padding[:, 0] = False
        if mask is not None and mask.dtype != torch.bool:  # torch wants matching mask types
            padding = torch.zeros(padding.shape).masked_fill(padding, float("-inf"))
        if case["unbatched"]:
            padding = padding[0]
    return query, key, value, mask, padding


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_exposed_multihead_attention_matches_torch(case):
    kdim, vdim = case["kv"] or (None, None)
    reference = nn.MultiheadAttention(E, H, bias=case["bias"], kdim=kdim, vdim=vdim, batch_first=case["batch_first"])
    _randomise(reference)
    exposed = expose_heads(copy.deepcopy(reference))
    assert isinstance(exposed, HeadedMultiheadAttention) and isinstance(exposed.heads, nn.Identity)
    query, key, value, mask, padding = _inputs(case, torch.Generator().manual_seed(1))
    kwargs = dict(key_padding_mask=padding, need_weights=case["need_weights"], attn_mask=mask,
                  average_attn_weights=case["average"], is_causal=case["causal"])
    for mode, grad in (("train", True), ("eval", True), ("eval", False)):  # eval+no_grad: torch's fast path
        reference.train(mode == "train")
        exposed.train(mode == "train")
        with torch.set_grad_enabled(grad):
            want, want_weights = reference(query, key, value, **kwargs)
            got, got_weights = exposed(query, key, value, **kwargs)
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-6
        if case["need_weights"]:
            assert got_weights.shape == want_weights.shape
            assert torch.allclose(got_weights, want_weights, atol=1e-6)
        else:
            assert got_weights is None and want_weights is None
    # same gradients, too
    reference.train()
    exposed.train()
    for module in (reference, exposed):
        module.zero_grad()
        out, _ = module(query, key, value, **kwargs)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), exposed.parameters()):
        assert _relative(q.grad, p.grad) < 1e-5, name


def test_masks_of_other_types_are_refused_or_warned_about_as_torch_does():
    """An integer mask is refused and a bool / float pair warns, in nn.MultiheadAttention and
    in ours (which no longer borrows PyTorch's private mask helper)."""
    reference = nn.MultiheadAttention(E, H, batch_first=True)
    exposed = expose_heads(copy.deepcopy(reference))
    x = torch.randn(N, L, E)
    for module in (reference, exposed):
        with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
            module(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
        with pytest.warns(UserWarning, match="key_padding_mask"):
            module(x, x, x, attn_mask=torch.zeros(L, L), key_padding_mask=torch.zeros(N, L, dtype=torch.bool))


def test_expose_heads_keeps_parameters_and_rejects_what_it_cannot_handle():
    module = nn.MultiheadAttention(E, H)
    keys = set(module.state_dict())
    weight = module.in_proj_weight
    exposed = expose_heads(module)
    assert exposed is module and set(module.state_dict()) == keys and module.in_proj_weight is weight
    assert expose_heads(module) is module  # already exposed
    with pytest.raises(ValueError, match="add_bias_kv"):
        expose_heads(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        expose_heads(nn.MultiheadAttention(E, H, add_zero_attn=True))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        expose_heads(nn.Linear(4, 4))


# --- the library's MultiheadSelfAttention -------------------------------------------------------


def test_multihead_self_attention_matches_torch_with_the_same_weights():
    ours = _randomise(MultiheadSelfAttention(E, H)).eval()
    torch_mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        torch_mha.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        torch_mha.out_proj.weight.copy_(ours.out.weight)
        torch_mha.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(N, L, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal}):
        want, _ = torch_mha(x, x, x, need_weights=False, **kwargs)
        assert _relative(ours(x, **kwargs), want) < 1e-6
    want, _ = torch_mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    assert _relative(ours(x, is_causal=True), want) < 1e-6


def test_multihead_self_attention_forward_backward_with_free_head_dim():
    attention = MultiheadSelfAttention(12, 3, head_dim=5, dropout=0.1)
    assert attention.q.weight.shape == (15, 12) and attention.out.weight.shape == (12, 15)
    captured = {}
    attention.heads.register_forward_hook(lambda m, a, out: captured.update(shape=tuple(out.shape)))
    x = torch.randn(2, 7, 12, requires_grad=True)
    y = attention.train()(x)
    assert y.shape == (2, 7, 12) and captured["shape"] == (2, 3, 7, 5)
    y.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in attention.parameters())
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(10, 3)
    with pytest.raises(ValueError, match=r"\(N, T, 12\)"):
        attention(torch.randn(7, 12))


# --- head gates -----------------------------------------------------------------------------------


def _encoder_layer(batch_first=True, seed=0):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=batch_first, dropout=0.0)


def test_attach_gates_on_a_transformer_encoder_layer_gates_heads_and_mlp():
    layer = _encoder_layer()
    keys = set(layer.state_dict())
    layout = _quiet_attach(layer, torch.randn(2, 5, 16))
    assert isinstance(layer.self_attn, HeadedMultiheadAttention)
    heads = layout.sites["self_attn.heads"]
    assert (heads.kind, heads.producer, heads.site, heads.dim, heads.num_structures) == (
        "heads", "self_attn", "self_attn.heads", 1, 4)
    mlp = layout.sites["linear1"]
    assert (mlp.kind, mlp.num_structures, mlp.dim) == ("channels", 32, -1)
    assert set(layout.sites) == {"self_attn.heads", "linear1"}
    assert not any(s.producer.startswith("self_attn.") for s in layout.sites.values())
    assert set(layer.state_dict()) - keys == {
        f"{g}.bmrs_gate.{k}" for g in ("self_attn.heads", "linear1") for k in ("loc", "log_scale", "mask")}
    assert "4 heads of self_attn" in layout.describe()
    layer.train()
    y = layer(torch.randn(3, 5, 16))
    (y * torch.randn(16)).sum().backward()
    for gate in bmrs.gates(layer).values():
        assert torch.isfinite(gate.loc.grad).all() and gate.loc.grad.abs().sum() > 0


def test_masked_head_contributes_exactly_nothing():
    attention = _randomise(MultiheadSelfAttention(E, H))
    _quiet_attach(attention, torch.randn(2, L, E))
    gate = bmrs.gates(attention)["heads"]
    gate.mask[2] = 0.0
    captured = {}
    gate.register_forward_hook(lambda m, a, out: captured.update(out=out))
    x = torch.randn(N, L, E)
    for mode in (True, False):
        attention.train(mode)(x)
        assert torch.equal(captured["out"][:, 2], torch.zeros(N, L, E // H))
        assert (captured["out"][:, [0, 1, 3]] != 0).all()
    # in eval, the output is that of the same weights with head 2's output columns zeroed
    plain = copy.deepcopy(attention)
    bmrs.detach_gates(plain)
    scale = gate.expected_gate().detach()
    with torch.no_grad():
        plain.out.weight.mul_(scale.repeat_interleave(E // H))
    assert _relative(attention.eval()(x), plain.eval()(x)) < 1e-6


@pytest.mark.parametrize("norm_first", [False, True])
def test_gated_encoder_layer_in_eval_without_grad_applies_the_gates(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    _quiet_attach(layer, torch.randn(2, 5, 16))
    bmrs.gates(layer)["self_attn.heads"].mask.zero_()  # every head pruned
    layer.eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        got = layer(x)
        # with no heads the attention block outputs its output bias only
        bias = layer.self_attn.out_proj.bias
        if norm_first:
            y = x + bias
            want = y + layer._ff_block(layer.norm2(y))
        else:
            y = layer.norm1(x + bias)
            want = layer.norm2(y + layer._ff_block(y))
    assert torch.allclose(got, want, atol=1e-6)


def test_transformer_encoder_does_not_route_around_gated_attention_with_nested_tensors():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True)
    assert encoder.use_nested_tensor
    layout = _quiet_attach(encoder, torch.randn(2, 5, 16))
    assert {"layers.0.self_attn.heads", "layers.1.self_attn.heads"} <= set(layout.sites)
    assert not encoder.use_nested_tensor
    bmrs.gates(encoder)["layers.1.self_attn.heads"].mask[1:] = 0.0
    encoder.eval()
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    want = encoder(x, src_key_padding_mask=padding)
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=padding)
    assert torch.allclose(got, want, atol=1e-6)


def test_head_gates_can_be_turned_off_or_excluded_and_unsupported_attention_is_reported():
    layer = _encoder_layer()
    sites, _ = find_sites(layer, torch.randn(2, 5, 16), heads=False)
    assert type(layer.self_attn) is nn.MultiheadAttention
    assert [s.site for s in sites] == ["linear1"]

    layout = _quiet_attach(layer, torch.randn(2, 5, 16), exclude=[nn.MultiheadAttention])
    assert type(layer.self_attn) is nn.MultiheadAttention and layout.skipped["self_attn"] == "excluded"
    assert set(layout.sites) == {"linear1"}

    class WithBiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = WithBiasKV()
    with pytest.warns(UserWarning, match="add_bias_kv"):
        layout = bmrs.attach_gates(model, torch.randn(2, 4, 8))
    assert "add_bias_kv" in layout.skipped["attn"] and not layout.sites


# --- compaction -----------------------------------------------------------------------------------


def _gated_self_attention(seed=0, head_dim=None):
    torch.manual_seed(seed)
    attention = _randomise(MultiheadSelfAttention(E, H, head_dim=head_dim), seed)
    _quiet_attach(attention, torch.randn(2, L, E))
    _set_gate(bmrs.gates(attention)["heads"], torch.rand(H) * -3.0, torch.rand(H) * 2.0 - 2.0)
    return attention


MASKS = {
    "random": [True, False, True, True],
    "one-kept": [False, False, True, False],
    "none-kept": [False, False, False, False],
    "all-kept": [True, True, True, True],
}


@pytest.mark.parametrize("which", sorted(MASKS))
@pytest.mark.parametrize("head_dim", [None, 3])
def test_compact_self_attention_equals_the_gated_module(which, head_dim):
    attention = _gated_self_attention(head_dim=head_dim)
    gate = bmrs.gates(attention)["heads"]
    gate.mask.copy_(torch.tensor(MASKS[which], dtype=torch.float32))
    attention.eval()
    x = torch.randn(N, L, E)
    want = attention(x)
    compact = compact_attention(attention, gate.mask > 0, gate.expected_gate().detach())
    assert isinstance(compact, MultiheadSelfAttention) and not bmrs.gates(compact)
    kept = max(sum(MASKS[which]), 1)
    d = head_dim or E // H
    assert compact.num_heads == kept and compact.q.weight.shape == (kept * d, E)
    got = compact.eval()(x)
    assert _relative(got, want) < 1e-5
    if which == "none-kept":  # exactly the output bias
        assert torch.equal(got, attention.out.bias.detach().expand(N, L, E))
    # scale for the kept heads only works the same
    kept_scale = gate.expected_gate().detach()[gate.mask > 0]
    if len(kept_scale):
        again = compact_attention(attention, gate.mask > 0, kept_scale)
        assert torch.equal(again.eval()(x), got)


def test_compact_after_bmrs_decision_equals_the_gated_module():
    attention = _gated_self_attention(seed=3)
    gate = bmrs.gates(attention)["heads"]
    _set_gate(gate, [0.0, -18.0, -1.0, -18.0], [-5.0, 1.0, -4.0, 1.0])  # heads 1 and 3 collapsed to ~0
    masks = decide(attention, BMRSNCode())
    assert masks["heads"].tolist() == [True, False, True, False]
    set_masks(attention, masks)
    attention.eval()
    x = torch.randn(N, L, E)
    compact = compact_attention(attention, gate.mask > 0, gate.expected_gate().detach()).eval()
    assert compact.num_heads == 2
    assert _relative(compact(x), attention(x)) < 1e-5


def test_compact_attention_checks_its_arguments():
    attention = MultiheadSelfAttention(E, H)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        compact_attention(attention, torch.ones(3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError, match="scale must have shape"):
        compact_attention(attention, torch.tensor([True, False, True, True]), torch.ones(2))
    with pytest.raises(TypeError, match="MultiheadSelfAttention"):
        compact_attention(nn.Linear(4, 4), torch.ones(4, dtype=torch.bool), torch.ones(4))


@pytest.mark.parametrize("which", sorted(MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_compacted_encoder_layer_equals_the_gated_one(which, batch_first):
    layer = _encoder_layer(batch_first=batch_first, seed=1)
    _randomise(layer, 1)
    example = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    _quiet_attach(layer, example)
    gate = bmrs.gates(layer)["self_attn.heads"]
    _set_gate(gate, torch.rand(4) * -3.0, torch.rand(4) - 2.0)
    gate.mask.copy_(torch.tensor(MASKS[which], dtype=torch.float32))
    layer.eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    compact = compact_attention(layer.self_attn, gate.mask > 0, gate.expected_gate().detach())
    assert isinstance(compact, CompactMultiheadAttention) and compact.batch_first == batch_first
    assert compact.in_proj_bias is None and not compact._qkv_same_embed_dim
    pruned = copy.deepcopy(layer)
    pruned.self_attn = compact  # the MLP keeps its gate
    assert set(bmrs.gates(pruned)) == {"linear1"}
    for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": causal, "is_causal": True}):
        want = layer(x, **kwargs)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got = pruned(x, **kwargs)
            assert _relative(got, want) < 1e-5
    # the attention module alone, with weights requested (over the kept heads)
    out, weights = compact(x, x, x, need_weights=True)
    assert weights.shape == (3, 5, 5) and torch.allclose(weights.sum(-1), torch.ones(3, 5))
    assert _relative(out, layer.self_attn(x, x, x, need_weights=False)[0]) < 1e-5


def test_compacting_twice_scales_and_removes_heads_as_asked():
    reference = expose_heads(_randomise(nn.MultiheadAttention(E, H)))
    first = compact_attention(reference, torch.tensor([True, True, False, True]), torch.tensor([0.5, 1.0, 9.0, 2.0]))
    second = compact_attention(first, torch.tensor([True, False, True]), torch.tensor([1.0, 3.0]))
    assert isinstance(second, CompactMultiheadAttention) and second.num_heads == 2 and not second.batch_first
    # the same as scaling the original's heads by [0.5, 0, 0, 6]
    scale = torch.tensor([0.5, 0.0, 0.0, 6.0]).view(1, H, 1, 1)
    reference.heads.register_forward_hook(lambda module, args, out: out * scale)
    for x in (torch.randn(L, N, E), torch.randn(L, E)):  # batched (sequence first) and unbatched
        want, _ = reference(x, x, x, need_weights=False)
        got, _ = second(x, x, x, need_weights=False)
        assert got.shape == want.shape and _relative(got, want) < 1e-5


def test_compact_attention_reads_widths_from_the_weights():
    # as after input channels were removed elsewhere: q, k, v read 14 features, out writes 16
    attention = _randomise(MultiheadSelfAttention(E, H))
    with torch.no_grad():
        for name in ("q", "k", "v"):
            old = getattr(attention, name)
            new = nn.Linear(14, old.out_features)
            new.weight.copy_(old.weight[:, :14])
            new.bias.copy_(old.bias)
            setattr(attention, name, new)
    assert attention.embed_dim == 14
    compact = compact_attention(attention, torch.tensor([False, True, True, True]), torch.tensor([1.0, 0.5, 1.0, 2.0]))
    x = torch.randn(N, L, 14)
    assert compact(x).shape == (N, L, E)
    attention.heads.register_forward_hook(lambda m, a, out: out * torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, H, 1, 1))
    assert _relative(compact(x), attention(x)) < 1e-5


# --- counting and criteria ------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_params_per_head_match_a_hand_count_and_real_removal(bias):
    ours = MultiheadSelfAttention(12, 3, head_dim=5, bias=bias)
    hand = 3 * (5 * 12 + (5 if bias else 0)) + 12 * 5  # q, k, v rows (+ biases), out columns
    assert params_per_head(ours) == hand
    torch_mha = nn.MultiheadAttention(12, 3, kdim=7, vdim=9, bias=bias)
    hand_torch = 4 * (12 + 7 + 9 + (3 if bias else 0)) + 12 * 4  # D = 4
    assert params_per_head(torch_mha) == hand_torch
    for module, per_head in ((ours, hand), (torch_mha, hand_torch)):
        smaller = compact_attention(module, torch.tensor([True, False, True]), torch.ones(3))
        assert count_trainable_parameters(module) - count_trainable_parameters(smaller) == per_head


def test_slot_params_of_head_families_and_parameter_compression():
    layer = _encoder_layer()
    layout = _quiet_attach(layer, torch.randn(2, 5, 16))
    family = next(f for f in layout.families if f.members[0][0] == "self_attn.heads")
    per_head = 3 * 4 * (16 + 1) + 16 * 4 + 2  # q, k, v rows and biases, out columns, the gate's 2
    assert family.members == [("self_attn.heads", [0, 1, 2, 3])] and family.slot_params == [per_head] * 4
    gate = bmrs.gates(layer)["self_attn.heads"]
    gate.mask[[1, 3]] = 0.0
    assert parameter_compression(layer) * count_trainable_parameters(layer) == pytest.approx(2 * per_head)


def test_l2_scores_heads_by_their_q_k_v_rows():
    attention = _gated_self_attention()
    d = E // H
    with torch.no_grad():
        attention.k.weight[2 * d: 3 * d].mul_(0.01)
        attention.q.weight[2 * d: 3 * d].mul_(0.01)
        attention.v.weight[2 * d: 3 * d].mul_(0.01)
    scores = L2().structure_scores(attention)["heads"]
    hand = torch.stack([
        torch.cat([m.weight[h * d:(h + 1) * d].flatten() for m in (attention.q, attention.k, attention.v)]).norm()
        for h in range(H)
    ]).double()
    assert torch.allclose(scores, hand)
    assert head_input_weights(attention).shape == (H, 3 * d * E)
    assert int(scores.argmin()) == 2


# --- the bundled ViT ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,patch", [((3, 32, 32), 4), ((1, 28, 28), 7), ((1, 28, 28), 4), ((3, 21, 14), 7)])
def test_vit_builds_runs_and_has_the_expected_gates(shape, patch):
    assert MODELS["vit"] is vit
    depth, heads, dim = 2, 4, 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled model's ungated residual stream does not warn
        model = build_model("vit", shape, 10, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    layout = bmrs.gate_layout(model)
    expected = {f"blocks.{i}.attn.heads": ("heads", heads) for i in range(depth)}
    expected.update({f"blocks.{i}.mlp.1": ("channels", 2 * dim) for i in range(depth)})
    assert {n: (s.kind, s.num_structures) for n, s in layout.sites.items()} == expected
    assert all(layout.sites[f"blocks.{i}.mlp.1"].producer == f"blocks.{i}.mlp.0" for i in range(depth))
    assert not any(".attn." in s.producer for s in layout.sites.values())
    tokens = (shape[1] // patch) * (shape[2] // patch)
    assert model.pos_embed.shape == (1, tokens + 1, dim)
    model.train()
    x = torch.randn(3, *shape)
    y = model(x)
    assert y.shape == (3, 10)
    y.logsumexp(1).sum().backward()
    for name, gate in bmrs.gates(model).items():
        assert gate.loc.grad is not None and torch.isfinite(gate.loc.grad).all(), name
    assert model.patch_embed.weight.grad.abs().sum() > 0
    # pruning one head per block changes the outputs, and compacting them keeps the change
    model.eval()
    with torch.no_grad():
        unpruned = model(x)
        for i in range(depth):
            bmrs.gates(model)[f"blocks.{i}.attn.heads"].mask[i % heads] = 0.0
        want = model(x)
        assert not torch.allclose(unpruned, want)
        for i, block in enumerate(model.blocks):
            gate = bmrs.gates(model)[f"blocks.{i}.attn.heads"]
            block.attn = compact_attention(block.attn, gate.mask > 0, gate.expected_gate())
        assert all(b.attn.num_heads == heads - 1 for b in model.blocks)
        assert _relative(model(x), want) < 1e-5


def test_vit_residual_stream_is_tied_and_ungated():
    model = vit((3, 16, 16), 5, embed_dim=16, depth=2, num_heads=2)
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, torch.zeros(2, 3, 16, 16))
    assert "tied to the parameter" in layout.skipped["patch_embed"]
    for i in range(2):
        assert "tied" in layout.skipped[f"blocks.{i}.mlp.2"]
    assert "final layer" in layout.skipped["head"]
    text = layout.describe()
    assert "not gated: patch_embed" in text and "2 heads of blocks.0.attn" in text


def test_vit_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by patch_size 7"):
        vit((3, 32, 32), 10, patch_size=7)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vit((3, 32, 32), 10, embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="channels, height, width"):
        vit((32, 32), 10)


def _trained_like_vit():
    torch.manual_seed(0)
    model = build_model("vit", (1, 8, 8), 3, patch_size=4, embed_dim=16, depth=2, num_heads=4)
    named = bmrs.gates(model)
    # some structures collapsed to theta ~ 0 (BMRS prunes them), the others confidently on
    for name, gate in named.items():
        loc = torch.zeros(gate.num_structures)
        loc[::3] = -18.0
        _set_gate(gate, loc, torch.where(loc < 0, torch.tensor(1.0), torch.tensor(-4.0)))
    return model


def test_decide_with_bmrs_and_l2_on_a_gated_vit():
    model = _trained_like_vit()
    masks = decide(model, BMRSNCode())
    for name, gate in bmrs.gates(model).items():
        expected = torch.ones(gate.num_structures, dtype=torch.bool)
        expected[::3] = False
        assert torch.equal(masks[name], expected), name
    assert masks["blocks.0.attn.heads"].tolist() == [False, True, True, False]

    # L2 at half of the structures: the heads with the smallest q/k/v rows go first
    with torch.no_grad():
        block = model.blocks[1].attn
        for m in (block.q, block.k, block.v):
            m.weight[4:8].mul_(1e-3)
    masks = decide(model, L2(), target=0.5)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == math.ceil(0.5 * total)
    assert not masks["blocks.1.attn.heads"][1]
    set_masks(model, masks)
    assert 0.0 < parameter_compression(model) < 1.0
    # the other criteria need nothing special for heads
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))]
    for criterion in (Random(seed=1), Taylor(data, batches=1)):
        scores = criterion.structure_scores(model)
        assert scores["blocks.0.attn.heads"].shape == (4,)
        assert torch.isfinite(scores["blocks.0.attn.heads"]).all()
