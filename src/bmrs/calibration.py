"""How well a classifier knows what it does not know, before and after pruning.

* :func:`predict` gives the predictive probabilities of a model over a data set: in eval mode
  (a gated model multiplies each structure by E[θ]·mask), or, with ``draws=N``, as the
  Monte Carlo predictive of the gated model: θ drawn from every gate's posterior (one draw
  per example and structure, as in training) ``N`` times and the softmax averaged, the rest
  of the network in eval mode (batch norm on its running statistics, no dropout). That is
  the Bayesian prediction of the variational posterior the gates learned.
* :func:`model_calibration` does both for a pruned gated model: unpruned (masks cleared),
  gated, compacted, and its Monte Carlo predictive.
* :func:`calibration` summarises probabilities against the labels: accuracy, the negative
  log-likelihood per example (nats), the expected calibration error over equal-width bins of
  confidence (the top probability): ``ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b|``,
  and the bins themselves, for a reliability diagram.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .distributed import unwrap
from .errors import BMRSError
from .gates import gates

__all__ = ["DEFAULT_DRAWS", "ECE_BINS", "calibration", "expected_calibration_error", "model_calibration", "predict"]

#: Bins of the expected calibration error (equal width in confidence, over [0, 1]).
ECE_BINS = 15
#: Draws of the gates' Monte Carlo predictive unless told otherwise.
DEFAULT_DRAWS = 20


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, draws: int = 0, device="cpu",
            generator_seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """(probabilities ``(n, classes)`` in float64, labels ``(n,)``) of ``model`` over ``loader``.

    ``draws=0``: one eval-mode pass. ``draws=N``: the gates' Monte Carlo predictive, the
    softmax averaged over ``N`` passes with θ sampled (the model must have gates); the draws
    are seeded with ``generator_seed`` (None: the global generator as it is), and the global
    random streams are left as they were, so that measuring does not change a run.
    """
    net = unwrap(model)
    if draws < 0:
        raise BMRSError(f"draws must be >= 0, got {draws}")
    named = gates(net)
    if draws and not named:
        raise BMRSError("the Monte Carlo predictive needs a gated model (bmrs.attach_gates)")
    training = net.training
    device = torch.device(device)
    net.eval()
    # the draws use the generators of the devices they run on: those are forked, so that
    # measuring leaves a run's random streams where they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if draws and generator_seed is not None:
            torch.manual_seed(generator_seed)
        probs, labels = [], []
        try:
            for inputs, targets in loader:
                inputs = inputs.to(device)
                if draws:
                    for gate in named.values():
                        gate.train()
                    p = sum(torch.softmax(net(inputs).double(), dim=1) for _ in range(draws)) / draws
                    for gate in named.values():
                        gate.eval()
                else:
                    p = torch.softmax(net(inputs).double(), dim=1)
                probs.append(p.cpu())
                labels.append(targets.cpu())
        finally:
            net.train(training)
    if not probs:
        raise BMRSError("the data set is empty: nothing to measure calibration on")
    return torch.cat(probs), torch.cat(labels)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """The ECE of ``probs`` against ``labels`` over ``bins`` equal-width confidence bins, and
    the bins (``lower``, ``upper``, ``count``, ``confidence``, ``accuracy``; the last two
    None for an empty bin). A confidence of exactly 1 falls into the last bin."""
    if bins < 1:
        raise BMRSError(f"bins must be >= 1, got {bins}")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    n = len(labels)
    ece, table = 0.0, []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count, "confidence": None, "accuracy": None}
        if count:
            conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
            row.update(confidence=conf, accuracy=acc)
            ece += count / n * abs(acc - conf)
        table.append(row)
    return ece, table


def calibration(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict:
    """Accuracy, NLL (nats per example), ECE and its reliability bins of ``probs`` (rows sum to 1)."""
    if len(probs) != len(labels) or len(labels) == 0:
        raise BMRSError(f"expected as many probability rows as labels (> 0), got {len(probs)} and {len(labels)}")
    picked = probs[torch.arange(len(labels)), labels].clamp_min(torch.finfo(probs.dtype).tiny)
    ece, table = expected_calibration_error(probs, labels, bins)
    return {
        "accuracy": float((probs.argmax(dim=1) == labels).double().mean()),
        "nll": float(-picked.log().mean()),
        "ece": ece,
        "bins": table,
        "examples": len(labels),
    }


def model_calibration(model: nn.Module, loader, compacted: nn.Module | None = None, *, draws: int = DEFAULT_DRAWS,
                      bins: int = ECE_BINS) -> dict:
    """Calibration (:func:`calibration`) on ``loader`` of a gated, pruned ``model``:
    ``unpruned`` (a copy with every mask cleared), ``gated`` (as it is), ``compacted`` (the
    network ``compacted``, :func:`bmrs.compact` of ``model``, when given) and, when ``draws``,
    ``predictive`` (the gates' Monte Carlo predictive of ``draws`` draws)."""
    unpruned = copy.deepcopy(model)
    for gate in gates(unpruned).values():
        gate.mask.fill_(1.0)
    nets = {"unpruned": unpruned, "gated": model, **({"compacted": compacted} if compacted is not None else {})}
    result = {name: calibration(*predict(net, loader), bins) for name, net in nets.items()}
    if draws:
        result["predictive"] = {**calibration(*predict(model, loader, draws=draws), bins), "draws": draws}
    return result
