"""Depthwise convolutions: a depthwise convolution's channels are its input channels, so its
gate and the gate of the layer producing its input form one family, removed together
(depthwise-separable blocks, inverted residuals with ReLU6 or Hardswish); compaction equal to
the gated model; grouped convolutions other than depthwise stay ungated."""

import warnings

import pytest
import torch
from torch import nn

import bmrs
from bmrs.compaction import count_parameters
from bmrs.pruning import count_trainable_parameters, parameter_compression, set_masks

from nets import randomize


def _separable(cin, cout, act, stride=1):
    """Depthwise 3x3 + BN + activation, pointwise 1x1 + BN + activation."""
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), act(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act()]


def separable_net(act=nn.ReLU, classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), act(),
        *_separable(8, 12, act), *_separable(12, 16, act, stride=2), *_separable(16, 16, act),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1, residual addition."""

    def __init__(self, channels, expand, act):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=True), act())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class MobileLike(nn.Module):
    """MobileNetV2's layout: a stem, a block without residual (depthwise, project), then
    inverted residual blocks on the projected channels."""

    def __init__(self, act=nn.ReLU6, channels=8, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), act(),
                                  nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False), nn.BatchNorm2d(6), act(),
                                  nn.Conv2d(6, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.blocks = nn.Sequential(InvertedResidual(channels, 3, act), InvertedResidual(channels, 2, act))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _attach(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left ungated but the classifier
        return bmrs.attach_gates(model, x)


def _random_masks(model, seed=1, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(gate.num_structures, generator=g) < keep for n, gate in bmrs.gates(model).items()}
    set_masks(model, masks)


def _family_masks(model, layout, seed=2, keep=0.5):
    """Masks that remove whole family slots (what a criterion decides)."""
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.ones(gate.num_structures, dtype=torch.bool) for n, gate in bmrs.gates(model).items()}
    for family in layout.families:
        slots = torch.rand(family.size, generator=g) < keep
        for name, idx in family.members:
            masks[name][torch.as_tensor(idx)] = slots
    set_masks(model, masks)


def _check(model, compacted, x):
    model.eval()
    for inputs in (x, torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(9))):
        with torch.no_grad():
            ref, out = model(inputs), compacted(inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Hardswish])
def test_depthwise_separable_net_gated_but_for_the_classifier_and_compacted_exactly(act):
    torch.manual_seed(0)
    model, x = separable_net(act), torch.randn(2, 3, 16, 16)
    layout = _attach(model, x)
    assert list(layout.skipped) == ["23"] and layout.skipped["23"].startswith("final layer")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(s.producer for s in layout.sites.values()) == sorted(convs)
    # each depthwise convolution (3, 9, 15) with the layer producing its input: one family
    pairs = {tuple(sorted((layout.sites[n].producer for n, _ in f.members), key=int)) for f in layout.families}
    assert pairs == {("0", "3"), ("6", "9"), ("12", "15"), ("18",)}
    randomize(model, bmrs.gates(model))
    _random_masks(model)
    compacted = bmrs.compact(model, x)
    _check(model, compacted, x)
    assert count_parameters(compacted) < count_parameters(model)
    for m in compacted.modules():  # a depthwise convolution stays depthwise
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels != 3 and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def test_a_family_slot_goes_from_the_producer_the_depthwise_convolution_and_its_reader():
    torch.manual_seed(0)
    model, x = separable_net(), torch.randn(2, 3, 16, 16)
    layout = _attach(model, x)
    randomize(model, bmrs.gates(model))
    _family_masks(model, layout)
    kept = {layout.sites[n].producer: int(g.mask.sum()) for n, g in bmrs.gates(model).items()}
    compacted = bmrs.compact(model, x)
    _check(model, compacted, x)
    for producer, depthwise, reader in (("0", "3", "6"), ("6", "9", "12"), ("12", "15", "18")):
        assert kept[producer] == kept[depthwise]
        width = max(kept[producer], 1)
        assert compacted.get_submodule(producer).out_channels == width
        dw = compacted.get_submodule(depthwise)
        assert dw.in_channels == dw.out_channels == dw.groups == width
        assert compacted.get_submodule(reader).in_channels == width
    # what parameter_compression counts is what compaction deletes, and the gates' parameters
    deleted = count_parameters(model) - count_parameters(compacted)
    gates_removed = 0
    for family in layout.families:
        gone = torch.stack([bmrs.gates(model)[n].mask[torch.as_tensor(i)] == 0 for n, i in family.members]).all(0)
        assert int(gone.sum()) < family.size  # no placeholders in these masks
        gates_removed += 2 * len(family.members) * int(gone.sum())
    assert round(parameter_compression(model) * count_trainable_parameters(model)) == deleted + gates_removed


@pytest.mark.parametrize("act", [nn.ReLU6, nn.Hardswish])
def test_inverted_residual_blocks_fold_forward_into_the_depthwise_filters(act):
    torch.manual_seed(0)
    model, x = MobileLike(act), torch.randn(2, 3, 16, 16)
    layout = _attach(model, x)
    assert list(layout.skipped) == ["head"]
    pairs = {tuple(sorted(layout.sites[n].producer for n, _ in f.members)) for f in layout.families}
    assert ("blocks.0.depthwise.0", "blocks.0.expand.0") in pairs and ("blocks.1.depthwise.0", "blocks.1.expand.0") in pairs
    assert ("stem.0", "stem.3") in pairs
    assert ("blocks.0.project.0", "blocks.1.project.0", "stem.6") in pairs  # the residual stream
    randomize(model, bmrs.gates(model))
    _random_masks(model, keep=0.6)
    compacted = bmrs.compact(model, x)
    _check(model, compacted, x)
    assert count_parameters(compacted) < count_parameters(model)


def test_every_channel_of_a_depthwise_family_masked_keeps_one_silent_channel():
    torch.manual_seed(0)
    model, x = separable_net(nn.ReLU6), torch.randn(2, 3, 16, 16)
    layout = _attach(model, x)
    randomize(model, bmrs.gates(model))
    family = next(f for f in layout.families if len(f.members) > 1)
    for name, _ in family.members:
        bmrs.gates(model)[name].mask.zero_()
    compacted = bmrs.compact(model, x)
    _check(model, compacted, x)
    assert compacted.get_submodule("3").out_channels == compacted.get_submodule("0").out_channels == 1


def test_grouped_and_input_reading_depthwise_convolutions_are_left_ungated():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),  # depthwise on the network's input
        nn.Conv2d(4, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped, not depthwise
        nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
    )
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, torch.randn(2, 4, 4, 4))
    assert set(layout.skipped) == {"0", "2", "4", "7"}
    assert "no gated layer produces" in layout.skipped["0"]
    assert layout.skipped["4"] == "grouped convolution (other than depthwise)"
    assert "read by the grouped convolution 4" in layout.skipped["2"]
    assert not layout.sites


class SqueezeExcite(nn.Module):
    def __init__(self, channels, act):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.act, self.expand = nn.Conv2d(channels, 4, 1), act(), nn.Conv2d(4, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet's block: expand, depthwise, squeeze-and-excitation, project."""

    def __init__(self, act):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 12, 1, bias=False), nn.BatchNorm2d(12), act())
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, 1, 1, groups=12, bias=False), nn.BatchNorm2d(12), act())
        self.se = SqueezeExcite(12, act)
        self.project = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.project(self.se(self.depthwise(self.expand(x)))).mean(dim=(2, 3)))


def test_a_depthwise_convolution_before_squeeze_and_excitation():
    x = torch.randn(2, 3, 8, 8)
    # after SiLU its gate can fold neither backward nor into one reader: left ungated, with why
    torch.manual_seed(0)
    model = MBConv(nn.SiLU)
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, x)
    assert "can be folded neither" in layout.skipped["depthwise.0"]
    assert "tied to those of depthwise.0" in layout.skipped["expand.0"]
    randomize(model, bmrs.gates(model))
    _random_masks(model)
    _check(model, bmrs.compact(model, x), x)
    # after ReLU it could fold into its BatchNorm, but the excitation's multiplication ties its
    # channels to the sigmoid's layer, which is not gated
    torch.manual_seed(0)
    model = MBConv(nn.ReLU)
    with pytest.warns(UserWarning, match="left these layers ungated"):
        layout = bmrs.attach_gates(model, x)
    assert "tied to those of se.expand" in layout.skipped["depthwise.0"]
    randomize(model, bmrs.gates(model))
    _random_masks(model)
    _check(model, bmrs.compact(model, x), x)
