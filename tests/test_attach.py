"""attach_gates on networks it has never seen."""

import warnings

import pytest
import torch
from torch import nn

import bmrs
from nets import TinyResNet, lenet_like, small_mlp


def test_lenet_like_gates_after_activations_not_the_classifier():
    model = lenet_like()
    layout = bmrs.attach_gates(model, torch.randn(2, 1, 32, 32))
    assert {(s.producer, s.site, s.num_structures) for s in layout.sites.values()} == {
        ("0", "1", 6), ("3", "4", 16), ("7", "8", 120), ("9", "10", 84)}
    assert "final layer" in layout.skipped["11"]
    assert set(bmrs.gates(model)) == {"1", "4", "8", "10"}
    out = model(torch.randn(3, 1, 32, 32))
    out.sum().backward()
    assert out.shape == (3, 10)
    assert all(g.loc.grad is not None and torch.isfinite(g.loc.grad).all() for g in bmrs.gates(model).values())


def test_state_dict_keys_of_the_model_are_unchanged_and_gates_added():
    model = small_mlp()
    before = set(model.state_dict())
    bmrs.attach_gates(model, torch.randn(2, 12))
    after = set(model.state_dict())
    assert before < after
    assert after - before == {f"{i}.bmrs_gate.{k}" for i in (1, 3) for k in ("loc", "log_scale", "mask")}


def test_residual_network_gates_and_couples_tied_channels():
    model = TinyResNet()
    layout = bmrs.attach_gates(model, torch.randn(2, 3, 8, 8))
    assert set(layout.sites) == {"stem_bn", "block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2"}
    coupled = [f for f in layout.families if len(f.members) > 1]
    assert len(coupled) == 1
    assert {name for name, _ in coupled[0].members} == {"stem_bn", "block1.bn2", "block2.bn2"}
    assert all(idx == list(range(8)) for _, idx in coupled[0].members)
    model.train()
    y = model(torch.randn(4, 3, 8, 8))
    y.sum().backward()
    assert y.shape == (4, 5)


def test_transformer_encoder_block_gates_mlp_hidden_units():
    block = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    layout = bmrs.attach_gates(block, torch.randn(2, 5, 16))
    mlp = [s for s in layout.sites.values() if s.producer == "linear1"]
    assert len(mlp) == 1 and mlp[0].num_structures == 32 and mlp[0].dim == -1
    block.train()
    y = block(torch.randn(3, 5, 16))
    y.sum().backward()
    assert bmrs.gates(block)["linear1"].loc.grad is not None


def test_exclude_by_name_instance_and_type():
    model = lenet_like()
    layout = bmrs.attach_gates(model, torch.randn(2, 1, 32, 32), exclude=["0", model[7], ])
    assert layout.skipped["0"] == "excluded" and layout.skipped["7"] == "excluded"
    bmrs.detach_gates(model)
    layout = bmrs.attach_gates(model, torch.randn(2, 1, 32, 32), exclude=[nn.Conv2d])
    assert set(layout.sites) == {"8", "10"}


def test_reports_what_it_cannot_gate():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)
            self.b = nn.Linear(6, 6)
            self.sig = nn.Sigmoid()
            self.shared = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            x = self.sig(self.b(self.norm(self.a(x))))
            return self.out(self.shared(self.shared(x)))

    model = Odd()
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, torch.randn(2, 4))
    assert "LayerNorm" in layout.skipped["a"]
    assert "not 0 at 0" in layout.skipped["b"]
    assert "more than once" in layout.skipped["shared"]
    assert "not gated: a" in layout.describe()


def test_residual_tied_to_an_ungated_layer_is_not_gated():
    model = TinyResNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = bmrs.attach_gates(model, torch.randn(2, 3, 8, 8), exclude=["stem"])
    assert "block1.conv2" in layout.skipped and "tied" in layout.skipped["block1.conv2"]
    assert set(layout.sites) == {"block1.bn1", "block2.bn1"}


def test_masked_structures_contribute_exactly_nothing_in_eval():
    model = small_mlp()
    bmrs.attach_gates(model, torch.randn(2, 12))
    gate = bmrs.gates(model)["1"]
    gate.mask[[0, 3]] = 0.0
    captured = {}
    gate.register_forward_hook(lambda m, a, out: captured.update(out=out))
    model.eval()
    model(torch.randn(5, 12))
    assert torch.equal(captured["out"][:, [0, 3]], torch.zeros(5, 2))


def test_detach_restores_the_plain_model():
    model = small_mlp()
    x = torch.randn(4, 12)
    reference = model(x)
    bmrs.attach_gates(model, torch.randn(2, 12))
    assert not torch.equal(model.eval()(x), reference)
    bmrs.detach_gates(model)
    assert torch.equal(model(x), reference) and not bmrs.gates(model)
    with pytest.raises(ValueError, match="no gates"):
        bmrs.gate_layout(model)


def test_attach_twice_is_an_error_and_model_mode_is_restored():
    model = small_mlp().train()
    bmrs.attach_gates(model, torch.randn(2, 12))
    assert model.training
    with pytest.raises(ValueError, match="already has gates"):
        bmrs.attach_gates(model, torch.randn(2, 12))


@pytest.mark.parametrize("net,shape", [(small_mlp, (12,)), (lenet_like, (1, 32, 32))])  # hooks on pooling too
def test_deepcopy_keeps_working_gates(net, shape):
    import copy

    model = net()
    bmrs.attach_gates(model, torch.randn(2, *shape))
    clone = copy.deepcopy(model)
    bmrs.gates(clone)["1"].mask.zero_()
    clone.eval(), model.eval()
    x = torch.randn(3, *shape)
    assert not torch.equal(clone(x), model(x))  # the clone's hooks use the clone's gates
    bmrs.detach_gates(clone)
    assert bmrs.gates(model)  # the original keeps its gates
    # the clone's hooks are gone (removed by their handles), the original's are not
    assert all(not m._forward_hooks for m in clone.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(bmrs.gates(model))


class _SharedReluBlock(nn.Module):
    """As torchvision's BasicBlock: one ReLU module called after bn1 and after the addition."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y.mean((2, 3)))


def test_a_module_called_twice_never_hosts_a_gate():
    model = _SharedReluBlock()
    x = torch.randn(2, 4, 5, 5)
    layout = bmrs.attach_gates(model, x)
    assert layout.sites["bn1"].producer == "conv1"  # not on the shared relu, which also sees the block's output
    assert "relu" not in layout.sites
    bmrs.gates(model)["bn1"].mask[::2] = 0
    small = bmrs.compact(model, x)
    model.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    assert small.conv1.out_channels == 3


class _BatchNormSiLU(nn.BatchNorm2d):
    """A batch norm with its activation in its own forward (as timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


class _BatchNormWithChild(nn.BatchNorm2d):
    """The same with the activation as a child module: the batch norm itself is then a
    functional call inside the module's forward."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.SiLU()

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, self.momentum, self.eps)
        return self.act(x)


@pytest.mark.parametrize("norm", [_BatchNormSiLU, _BatchNormWithChild])
def test_a_batch_norm_with_its_own_forward_is_never_folded_as_a_plain_one(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(4, 3, 9, 9)
    model(x)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
        model[1].running_mean.uniform_(-1, 1)
    layout = bmrs.attach_gates(model, x)
    if norm is _BatchNormWithChild:  # the walk cannot see past the functional batch norm: not gated
        assert "0" not in {s.producer for s in layout.sites.values()}
        assert "batch norm the gate cannot be placed after" in layout.skipped["0"]
    else:  # the gate sits after the norm and folds forward into the next convolution
        assert layout.sites["1"].producer == "0"
    for gate in bmrs.gates(model).values():
        gate.mask[::2] = 0
    model.eval()
    small = bmrs.compact(model, x)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def _gated_before_the_pool(model: nn.Module) -> None:
    """Re-hook every gate on the module that holds it, as if pooling were not passed (in place)."""
    for gate in bmrs.gates(model).values():
        gate.hook_handle.remove()
    modules = dict(model.named_modules())
    for name, gate in bmrs.gates(model).items():
        gate.hook_handle = modules[name].register_forward_hook(gate._hook)


def _conv_net(activation: type, pool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), activation(), pool(), nn.Conv2d(6, 8, 3), activation(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, 10), activation(), nn.Linear(10, 3),
    )


def test_gates_followed_by_pooling_multiply_the_pooled_output():
    model = lenet_like()
    layout = bmrs.attach_gates(model, torch.randn(2, 1, 32, 32))
    assert {(s.site, s.applied_at, s.hook_module) for s in layout.sites.values()} == {
        ("1", "2", "2"), ("4", "5", "5"), ("8", "", "8"), ("10", "", "10")}
    assert set(bmrs.gates(model)) == {"1", "4", "8", "10"}  # keys and state-dict entries stay with the activation
    assert "gate 1: 6 channels of 0 (after 1, applied after 2)" in layout.describe()
    reference = lenet_like()
    bmrs.attach_gates(reference, torch.randn(2, 1, 32, 32))
    with torch.no_grad():
        for gate in bmrs.gates(model).values():
            gate.loc.uniform_(-2.0, 0.0)
            gate.mask.bernoulli_(0.7)
    reference.load_state_dict(model.state_dict())
    _gated_before_the_pool(reference)
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(model.eval()(x), reference.eval()(x))  # a maximum commutes with scaling bitwise
    bmrs.detach_gates(model)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.GELU])
@pytest.mark.parametrize("pool", [lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2, ceil_mode=True),
                                  lambda: nn.MaxPool2d(3, 2, padding=1)], ids=["max", "avg", "max-padded"])
def test_gating_after_pooling_is_the_same_network(activation, pool):
    torch.manual_seed(0)
    model = _conv_net(activation, pool)
    layout = bmrs.attach_gates(model, torch.randn(2, 1, 16, 16))
    assert {s.applied_at for s in layout.sites.values()} == {"2", "5", ""}
    gates = bmrs.gates(model)
    with torch.no_grad():
        for gate in gates.values():
            gate.loc.uniform_(-2.0, 0.0)
            gate.log_scale.uniform_(-3.0, 0.0)
            gate.mask.bernoulli_(0.7)
    reference = _conv_net(activation, pool)
    bmrs.attach_gates(reference, torch.randn(2, 1, 16, 16))
    reference.load_state_dict(model.state_dict())
    _gated_before_the_pool(reference)
    x = torch.randn(5, 1, 16, 16)
    def check(a, b):  # the mean after scaling rounds differently from the scaled mean
        return torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    assert check(model.eval()(x), reference.eval()(x))
    outputs, grads = [], []
    for net in (model, reference):
        net.train()
        torch.manual_seed(1)  # the same draw of theta for both
        out = net(x)
        (out.square().sum() + bmrs.model_kl(net)).backward()
        outputs.append(out)
        grads.append(torch.cat([torch.cat([g.loc.grad, g.log_scale.grad]) for g in bmrs.gates(net).values()]))
    assert check(outputs[0], outputs[1])
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not torch.equal(grads[0], torch.zeros_like(grads[0]))


def test_a_pool_module_called_twice_is_not_passed():
    class SharedPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.act1 = nn.Conv2d(1, 4, 3), nn.ReLU()
            self.conv2, self.act2 = nn.Conv2d(4, 4, 3), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            x = self.pool(self.act1(self.conv1(x)))
            x = self.pool(self.act2(self.conv2(x)))
            return self.out(x.mean((2, 3)))

    layout = bmrs.attach_gates(SharedPool(), torch.randn(2, 1, 16, 16))
    assert {(s.site, s.applied_at) for s in layout.sites.values()} == {("act1", ""), ("act2", "")}


@pytest.mark.parametrize("net,example", [
    (nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(3, 2)), torch.randn(2, 4, 8)),
    (nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(3, 2)), torch.randn(2, 8)),
], ids=["tokens", "features"])
def test_pooling_across_the_channels_is_not_passed(net, example):
    # a Linear's channels are its last axis, which MaxPool1d pools: that mixes channels
    layout = bmrs.attach_gates(net, example)
    assert [s.applied_at for s in layout.sites.values()] == [""]
