"""Compression counts against hand counts."""

import torch

import bmrs
from bmrs.pruning import count_trainable_parameters
from nets import TinyResNet, lenet_like, small_mlp


def test_mlp_hand_count():
    model = small_mlp()  # 12 -> 7 -> 7 -> 3, tanh
    bmrs.attach_gates(model, torch.randn(2, 12))
    # 12*7+7 + 7*7+7 + 7*3+3 + two gates of 7 structures with 2 parameters each
    assert count_trainable_parameters(model) == 91 + 56 + 24 + 28 == 199
    g = bmrs.gates(model)
    g["1"].mask[0] = 0  # first hidden unit: its row and bias (13), its column in layer 2 (7), its gate (2)
    assert round(bmrs.parameter_compression(model) * 199) == 22
    g["3"].mask[0] = 0  # second layer's unit: row + bias (8) less the weight already gone, column in layer 3 (3), gate (2)
    assert round(bmrs.parameter_compression(model) * 199) == 22 + 7 + 3 + 2
    assert bmrs.structure_compression(model) == 2 / 14
    assert bmrs.kept_structures(model) == {"1": 6, "3": 6}


def test_conv_net_hand_count():
    model = lenet_like()
    bmrs.attach_gates(model, torch.randn(2, 1, 32, 32))
    total = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10) + 2 * (6 + 16 + 120 + 84)
    assert count_trainable_parameters(model) == total == 62158
    g = bmrs.gates(model)
    g["1"].mask[0] = 0  # a conv1 filter (25 + 1), its input channel in conv2 (16 * 25), its gate
    assert round(bmrs.parameter_compression(model) * total) == 26 + 400 + 2
    g["4"].mask[3] = 0  # a conv2 filter (now 5 * 25 + 1), its 25 flattened columns in fc1 (25 * 120), its gate
    assert round(bmrs.parameter_compression(model) * total) == 26 + 400 + 2 + 126 + 3000 + 2


def test_everything_pruned_removes_all_but_the_classifier_bias():
    model = small_mlp()
    bmrs.attach_gates(model, torch.randn(2, 12))
    for g in bmrs.gates(model).values():
        g.mask.zero_()
    # all that remains is the bias of the final layer
    assert round(bmrs.parameter_compression(model) * 199) == 199 - 3
    assert bmrs.structure_compression(model) == 1.0


def test_coupled_family_counts_each_member_and_batchnorm():
    model = TinyResNet(channels=8, classes=5)
    bmrs.attach_gates(model, torch.randn(2, 3, 8, 8))
    total = count_trainable_parameters(model)
    family = next(f for f in bmrs.gate_layout(model).families if len(f.members) > 1)
    for name, idx in family.members:
        bmrs.gates(model)[name].mask[idx[2]] = 0
    # stem filter (3*9 + bias) and bn (2); in each block conv2's filter (8*9), bn2 (2), conv1's
    # input channel (8*9); the classifier's column (5); three gates (3 * 2)
    expected = (27 + 1 + 2) + 2 * (72 + 2 + 72) + 5 + 6
    assert round(bmrs.parameter_compression(model) * total) == expected
    # masking only some members of a family removes nothing
    model2 = TinyResNet(channels=8, classes=5)
    bmrs.attach_gates(model2, torch.randn(2, 3, 8, 8))
    bmrs.gates(model2)["stem_bn"].mask[2] = 0
    assert bmrs.parameter_compression(model2) == 0.0
