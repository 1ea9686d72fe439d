"""Packed-qkv attention in the shape of timm's ``Attention`` (``qkv`` = Linear(E, 3E),
``proj``, ``num_heads``, ``head_dim``), written here since timm is not a dependency: heads
gated at the input of ``proj``, removed from the three parts of ``qkv``, compaction equal to
the gated model, save/load, and modules whose forward cannot lose heads left ungated."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bmrs
from bmrs.compaction import count_parameters, load_compact, save_compact
from bmrs.pruning import count_trainable_parameters, parameter_compression

DIM, HEADS, TOKENS, IN = 32, 4, 6, 12
D = DIM // HEADS


class Attention(nn.Module):
    """timm's layout: one packed qkv layer, heads split and merged by num_heads and head_dim."""

    def __init__(self, dim, num_heads, qk_norm=True, scale_norm=False, merge_by_input_width=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.merge_by_input_width = merge_by_input_width
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(self.attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        # older timm merged the heads back to the input width c
        x = x.transpose(1, 2).reshape(b, n, c if self.merge_by_input_width else self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, **attention):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, **attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, depth=2, classes=5, **attention):
        super().__init__()
        self.embed = nn.Linear(IN, DIM)
        self.blocks = nn.Sequential(*[Block(DIM, HEADS, **attention) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


def _inputs(batch=2, seed=0):
    return torch.randn(batch, TOKENS, IN, generator=torch.Generator().manual_seed(seed))


def _gated(seed=0, **attention):
    torch.manual_seed(seed)
    model = TinyViT(**attention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream is tied to LayerNorm
        layout = bmrs.attach_gates(model, _inputs())
    return model, layout


def _randomise(model, seed=0, keep=0.6, only_heads=False):
    g = torch.Generator().manual_seed(seed)
    for gate in bmrs.gates(model).values():
        with torch.no_grad():
            gate.loc.copy_(torch.empty(gate.num_structures).uniform_(-2, 0, generator=g))
            gate.log_scale.copy_(torch.empty(gate.num_structures).uniform_(-3, 0, generator=g))
        if not only_heads or gate.num_structures == HEADS:
            gate.mask.copy_((torch.rand(gate.num_structures, generator=g) < keep).float())


def _close(model, compacted):
    model.eval()
    for seed, batch in ((1, 2), (2, 3)):
        x = _inputs(batch, seed)
        with torch.no_grad():
            ref, out = model(x), compacted(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _head_sites(layout):
    return [s for s in layout.sites.values() if s.kind == "packed-heads"]


def test_heads_are_gated_at_the_input_of_proj_and_qkv_is_no_channel_structure():
    model, layout = _gated()
    heads = _head_sites(layout)
    assert [(s.producer, s.site, s.num_structures) for s in heads] == [
        (f"blocks.{i}.attn", f"blocks.{i}.attn.proj.bmrs_input", HEADS) for i in range(2)
    ]
    assert sorted(s.producer for s in layout.sites.values() if s.kind == "channels") == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert not any(".attn." in s.producer for s in layout.sites.values())
    assert not any(".attn" in name for name in layout.skipped)
    # training: one theta per example and head, the same over tokens and the head's features
    gate = bmrs.gates(model)[heads[0].site]
    seen = {}
    gate.register_forward_hook(lambda g, args, out: seen.update(x=args[0], out=out))
    model.train()
    model(_inputs(3)).sum().backward()
    x, out = seen["x"], seen["out"]
    assert x.shape == (3, TOKENS, HEADS, D)
    theta = (out * x).sum((1, 3)) / (x * x).sum((1, 3))
    torch.testing.assert_close(out, x * theta[:, None, :, None])
    assert gate.loc.grad is not None and gate.loc.grad.abs().sum() > 0


def test_compact_removes_heads_from_packed_qkv_and_equals_the_gated_model():
    model, layout = _gated()
    _randomise(model)
    compacted = bmrs.compact(model, _inputs())
    _close(model, compacted)
    assert count_parameters(compacted) < count_parameters(model)
    for site in _head_sites(layout):
        kept = int(bmrs.gates(model)[site.site].mask.sum())
        attention = compacted.get_submodule(site.producer)
        assert type(attention) is Attention
        assert attention.num_heads == max(kept, 1) and attention.head_dim == D
        assert attention.attn_dim == attention.num_heads * D
        assert attention.qkv.out_features == 3 * attention.num_heads * D == 3 * attention.proj.in_features
        assert attention.q_norm.normalized_shape == (D,)
    assert not bmrs.gates(compacted) and not any(m._forward_pre_hooks for m in compacted.modules())


def test_kept_heads_keep_their_q_k_and_v_rows():
    model, layout = _gated()
    site = _head_sites(layout)[0]
    bmrs.gates(model)[site.site].mask.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    compacted = bmrs.compact(model, _inputs())
    _close(model, compacted)
    full, small = model.get_submodule(site.producer).qkv.weight, compacted.get_submodule(site.producer).qkv.weight
    for part in range(3):
        for new, old in enumerate((1, 3)):
            start = part * DIM + old * D
            torch.testing.assert_close(small[part * 2 * D + new * D: part * 2 * D + (new + 1) * D], full[start:start + D])


def test_every_head_masked_keeps_one_silent_head():
    model, layout = _gated()
    site = _head_sites(layout)[1]
    bmrs.gates(model)[site.site].mask.zero_()
    compacted = bmrs.compact(model, _inputs())
    attention = compacted.get_submodule(site.producer)
    assert attention.num_heads == 1 and torch.all(attention.proj.weight == 0)
    _close(model, compacted)


def test_parameter_compression_counts_what_compaction_deletes():
    model, layout = _gated()
    _randomise(model, seed=3, keep=0.5, only_heads=True)
    masked = [int((bmrs.gates(model)[s.site].mask == 0).sum()) for s in _head_sites(layout)]
    assert 0 < sum(masked) and max(masked) < HEADS  # no placeholder head
    compacted = bmrs.compact(model, _inputs())
    deleted = count_parameters(model) - count_parameters(compacted)
    assert round(parameter_compression(model) * count_trainable_parameters(model)) == deleted + 2 * sum(masked)


def test_save_and_load_round_trip(tmp_path):
    model, _ = _gated(seed=1)
    _randomise(model, seed=1)
    compacted = bmrs.compact(model, _inputs())
    path = tmp_path / "vit.pt"
    save_compact(compacted, path)
    torch.manual_seed(5)
    loaded = load_compact(path, model=TinyViT())
    for a, b in zip(loaded.blocks, compacted.blocks):
        assert (a.attn.num_heads, a.attn.attn_dim) == (b.attn.num_heads, b.attn.attn_dim)
    x = _inputs(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), compacted(x))


@pytest.mark.parametrize("options, reason", [
    ({"merge_by_input_width": True}, "does not run with fewer heads"),
    ({"scale_norm": True}, "normalised together"),
])
def test_attention_whose_heads_cannot_be_removed_is_left_ungated(options, reason):
    model, layout = _gated(**options)
    assert not _head_sites(layout)
    assert reason in layout.skipped["blocks.0.attn"] and reason in layout.skipped["blocks.1.attn"]
    assert not any(isinstance(m, bmrs.structures.adapters.InputGroups) for m in model.modules())


def test_l2_scores_a_head_by_its_packed_rows():
    model, layout = _gated()
    scores = bmrs.make_criterion("l2").structure_scores(model)
    site = _head_sites(layout)[0]
    w = model.get_submodule(site.producer).qkv.weight.detach().double()
    expected = torch.stack([
        torch.cat([w[part * DIM + h * D: part * DIM + (h + 1) * D].flatten() for part in range(3)]).norm()
        for h in range(HEADS)
    ])
    torch.testing.assert_close(scores[site.site], expected)
