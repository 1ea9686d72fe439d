"""Parameter and FLOP counts of a network, gated or compacted."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..distributed import unwrap
from ..gates import NoiseGate
from ..structures.sites import call_example

__all__ = ["count_parameters", "count_flops"]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (shared tensors counted once).

    The gates' own parameters (``loc``, ``log_scale`` of every :class:`~bmrs.NoiseGate`)
    are not counted, so a gated model counts as the network it gates, and the count can be
    compared directly with that of its compacted copy. Unlike
    :func:`bmrs.pruning.count_trainable_parameters`, frozen parameters count too.
    """
    module = unwrap(module)
    gate_params = {id(p) for m in module.modules() if isinstance(m, NoiseGate) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in gate_params)


def count_flops(module: nn.Module, example_input) -> int:
    """Floating-point operations of one eval-mode forward pass on ``example_input``.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products,
    convolutions and attention, with one multiply-add counted as 2 FLOPs. Element-wise
    operations (activations, BatchNorm, biases, pooling, and the gates' multiplies) count
    0, so a gated model counts as the same network without gates, whatever its masks.
    The count is for the whole batch of ``example_input`` (a tensor, a tuple of positional
    inputs or a dict of keyword inputs).
    """
    module = unwrap(module)
    training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_example(module, example_input)
    finally:
        module.train(training)
    return int(counter.get_total_flops())
