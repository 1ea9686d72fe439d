"""Whole residual blocks as structures (attach_gates(..., blocks=True)): a gate on the branch
of each ``y = x + f(x)`` block, one theta per example; BMRS prunes a block by its evidence,
and compaction deletes it from the module tree, equal to the gated model."""

import copy
import warnings

import pytest
import torch
from torch import nn

import bmrs
from bmrs.compaction import count_parameters, load_compact, save_compact
from bmrs.pruning import count_trainable_parameters, kept_structures, parameter_compression, prune

WIDTH, HIDDEN, IN, CLASSES, DEPTH = 16, 24, 10, 4, 3


class Block(nn.Module):
    def __init__(self, end="linear"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, WIDTH)
        self.end = nn.LayerNorm(WIDTH) if end == "norm" else nn.GELU() if end == "gelu" else None

    def forward(self, x):
        branch = self.fc2(self.act(self.fc1(x)))
        return x + (branch if self.end is None else self.end(branch))


class ResidualMLP(nn.Module):
    def __init__(self, ends=("linear", "norm", "linear")):
        super().__init__()
        self.embed = nn.Linear(IN, WIDTH)
        self.blocks = nn.Sequential(*[Block(end) for end in ends])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.blocks(self.embed(x))))


def _inputs(batch=4, seed=0):
    return torch.randn(batch, IN, generator=torch.Generator().manual_seed(seed))


def _gated(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = ResidualMLP(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = bmrs.attach_gates(model, _inputs(), blocks=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):  # something to fold
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return model, layout


def _block_gates(model, layout):
    return {s.producer: bmrs.gates(model)[n] for n, s in layout.sites.items() if s.kind == "blocks"}


def _close(model, compacted):
    model.eval()
    for seed in (1, 2):
        x = _inputs(5, seed)
        with torch.no_grad():
            ref, out = model(x), compacted(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_every_residual_block_gets_one_gate_on_its_branch():
    model, layout = _gated()
    blocks = {s.producer: s for s in layout.sites.values() if s.kind == "blocks"}
    assert sorted(blocks) == [f"blocks.{i}" for i in range(DEPTH)]
    assert all(s.num_structures == 1 for s in blocks.values())
    assert blocks["blocks.1"].site == "blocks.1.end.bmrs_branch"  # the branch's last layer
    assert "1 blocks of blocks.0 (on its branch" in layout.describe()
    # the other structures are gated as without blocks
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = bmrs.attach_gates(ResidualMLP(), _inputs())
    assert {n: s for n, s in layout.sites.items() if s.kind != "blocks"} == plain.sites
    # training: y = x + theta f(x), one theta per example
    gate = _block_gates(model, layout)["blocks.0"]
    seen = {}
    gate.register_forward_hook(lambda g, args, out: seen.update(x=args[0], out=out))
    model.train()
    model(_inputs(3)).sum().backward()
    x, out = seen["x"], seen["out"]
    assert x.shape == (3, 1, WIDTH)
    theta = (out * x).sum(-1) / (x * x).sum(-1)
    torch.testing.assert_close(out, x * theta[:, :, None])
    assert theta[0] != theta[1] and gate.loc.grad is not None


def test_a_masked_block_is_deleted_and_the_kept_ones_fold_their_factor():
    model, layout = _gated()
    g = torch.Generator().manual_seed(0)
    for gate in bmrs.gates(model).values():
        with torch.no_grad():
            gate.loc.uniform_(-2, 0, generator=g)
        gate.mask.copy_((torch.rand(gate.num_structures, generator=g) < 0.7).float())
    blocks = _block_gates(model, layout)
    for name, gate in blocks.items():
        gate.mask.fill_(0.0 if name == "blocks.1" else 1.0)
    compacted = bmrs.compact(model, _inputs())
    _close(model, compacted)
    assert isinstance(compacted.blocks[1], nn.Identity)
    assert not any(name.startswith("blocks.1.") for name, _ in compacted.named_modules())
    assert isinstance(compacted.blocks[0], Block) and isinstance(compacted.blocks[2], Block)
    assert not bmrs.gates(compacted) and not any(m._forward_hooks for m in compacted.modules())


def test_bmrs_removes_a_block_by_its_evidence_and_counts_what_goes():
    model, layout = _gated()
    gate = _block_gates(model, layout)["blocks.2"]
    with torch.no_grad():  # the posterior of a branch the data did not need: theta near 0
        gate.loc.fill_(-20.0)
        gate.log_scale.fill_(0.0)
    kept = prune(model, bmrs.make_criterion("bmrs-n"))
    names = {s.site: s for s in layout.sites.values()}
    assert [n for n, k in kept.items() if k < names[n].num_structures] == [names_of(layout, "blocks.2")]
    compacted = bmrs.compact(model, _inputs())
    _close(model, compacted)
    assert isinstance(compacted.blocks[2], nn.Identity)
    deleted = count_parameters(model) - count_parameters(compacted)
    assert deleted == sum(p.numel() for n, p in model.blocks[2].named_parameters() if "bmrs_" not in n)
    gates_inside = sum(2 * g.num_structures for g in bmrs.gates(model.blocks[2]).values())
    assert round(parameter_compression(model) * count_trainable_parameters(model)) == deleted + gates_inside
    assert sum(kept_structures(model).values()) == sum(g.num_structures for g in bmrs.gates(model).values()) - 1


def names_of(layout, producer):
    return next(n for n, s in layout.sites.items() if s.producer == producer and s.kind == "blocks")


def test_blocks_that_are_not_x_plus_a_foldable_branch_are_not_gated_as_blocks():
    model, layout = _gated(ends=("gelu", "linear"))
    assert "GELU" in layout.skipped["blocks.0"] and "not gated as a block" in layout.skipped["blocks.0"]
    assert [s.producer for s in layout.sites.values() if s.kind == "blocks"] == ["blocks.1"]
    # without blocks=True nothing changes
    torch.manual_seed(0)
    plain = ResidualMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not any(s.kind == "blocks" for s in bmrs.attach_gates(plain, _inputs()).sites.values())


def test_detach_and_deepcopy_with_block_gates():
    model, layout = _gated()
    twin = copy.deepcopy(model)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(_inputs()), model(_inputs()))
    for gate in bmrs.gates(twin).values():
        gate.mask.zero_()
    with torch.no_grad():  # the copy's gates act on the copy
        assert not torch.equal(twin(_inputs()), model(_inputs()))
    bmrs.detach_gates(model)
    assert not any(isinstance(m, bmrs.structures.adapters.BranchSite) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_blocks_is_refused_for_models_an_adapter_handles():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=8)
    with pytest.raises(bmrs.BMRSError, match="blocks=True"):
        bmrs.attach_gates(transformers.BertModel(config), {"input_ids": torch.ones(1, 4, dtype=torch.long)}, blocks=True)


def test_a_model_with_a_deleted_block_saves_and_loads(tmp_path):
    model, layout = _gated()
    _block_gates(model, layout)["blocks.0"].mask.zero_()
    compacted = bmrs.compact(model, _inputs())
    path = tmp_path / "model.pt"
    save_compact(compacted, path)
    torch.manual_seed(3)
    loaded = load_compact(path, model=ResidualMLP())
    assert isinstance(loaded.blocks[0], nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(_inputs(seed=6)), compacted(_inputs(seed=6)))


def test_a_deleted_block_leaves_the_residual_family_to_the_layers_outside_it():
    model, layout = _gated(ends=("linear", "linear", "linear"))
    stream = next(f for f in layout.families if len(f.members) > 1)  # embed and every block's fc2
    assert sorted(layout.sites[n].producer for n, _ in stream.members) == ["blocks.0.fc2", "blocks.1.fc2",
                                                                           "blocks.2.fc2", "embed"]
    g = torch.Generator().manual_seed(2)
    for gate in bmrs.gates(model).values():
        with torch.no_grad():
            gate.loc.uniform_(-2, 0, generator=g)
    # slot 3 of the stream: masked everywhere but in block 1, which is deleted -> slot 3 goes
    for name, idx in stream.members:
        if layout.sites[name].producer != "blocks.1.fc2":
            bmrs.gates(model)[name].mask[idx[3]] = 0
    _block_gates(model, layout)["blocks.1"].mask.zero_()
    compacted = bmrs.compact(model, _inputs())
    _close(model, compacted)
    assert isinstance(compacted.blocks[1], nn.Identity)
    assert compacted.embed.out_features == WIDTH - 1 == compacted.blocks[0].fc2.out_features
