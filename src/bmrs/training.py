"""A ready training loop for gated models: ELBO loss, evaluation, pruning, checkpoints.

The pieces work on their own inside a user's loop: :func:`elbo_loss` is the loss,
:meth:`Trainer.step` one optimisation step, :meth:`Trainer.evaluate` the evaluation.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import content_digest, read_tensors, write_atomic
from .errors import BMRSError
from .distributed import average, gather_rows, is_main, rank, unwrap, world_size
from .gates import DEFAULT_KL_REDUCTION, NoiseGate, attach_gates, check_kl_reduction, model_kl
from .pruning.masks import kept_per_layer, parameter_compression, structure_compression
from .pruning.schedules import ContinuousPruning

__all__ = [
    "elbo_loss", "seed_everything", "adam", "Trainer", "EpochRecord", "atomic_save", "TrainingDiverged",
    "TRAINED_GATE_INIT", "TRAINED_SCHEDULE", "TRAINED_GATE_LR", "load_trained", "gate_trained", "trained_adam",
]

# How often (in steps) training reads the device-side record of non-finite losses: one host
# synchronisation per this many steps, and one at the end of every epoch.
_DIVERGENCE_CHECK_EVERY = 64
#: Training has diverged when a parameter's magnitude exceeds this: networks trained on
#: standardised inputs have weights of order 1, and float32 products of weights beyond it
#: overflow within a few layers.
PARAMETER_BOUND = 1e6
#: ... or when a gate's posterior location or log scale is so large that its exponential
#: (theta, sigma) is not finite in float32 (log of float32's largest number, 88.7).
GATE_LOG_BOUND = math.log(torch.finfo(torch.float32).max)
#: ... or when an epoch's mean training loss rises above this many times the lowest epoch
#: mean so far and above :data:`LOSS_CEILING` nats (far beyond a classifier's chance level,
#: so pruning's loss of a few layers' structures never counts).
LOSS_RISE = 1e3
LOSS_CEILING = 100.0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a generator for data-loader shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam as the bundled runs use it: PyTorch's fused implementation (one kernel for all
    parameters, instead of about 25 small operations per parameter tensor, i.e. per gate 50)
    where PyTorch has one for the parameters' device (CPU, CUDA), else the default."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None)


#: The gates' initial posterior on a trained network: ``log theta ~ N(0, sigma^2)`` with
#: ``sigma = e^-12`` (6.1e-6), truncated to ``log theta <= 0``. Then ``E[theta] = 1 - 4.9e-6``
#: per gate (``1 - sigma sqrt(2 / pi)``), so even 55 gated layers in a row (ResNet-56)
#: change the outputs by less than 3e-4 relative, and the noise of a training step is as
#: small. The paper's initialisation (``init_log_scale = -5``) gives ``E[theta] = 1 - 0.0054``:
#: harmless when the weights are trained with the gates from the start, but it shrinks a
#: trained network's activations by 0.5 % per gated layer.
TRAINED_GATE_INIT = {"init_loc": 0.0, "init_log_scale": -12.0}

#: The schedule of ``bmrs train --from`` unless told otherwise (docs/pruning.md, "Starting
#: from a trained network"): 4 epochs of ELBO fine-tuning with a decision after every second
#: one (the posteriors need a few hundred steps to leave their near-point start before a
#: decision means anything), then 8 epochs of recovery with the masks fixed: at a fixed
#: budget of epochs, the head-to-head with Torch-Pruning (docs/results.md) found the epochs
#: of recovery worth more than more epochs of the ELBO.
TRAINED_SCHEDULE = {"epochs": 4, "prune_every": 2, "finetune_epochs": 8}

#: The Adam learning rate of the gates' posterior parameters on a trained network
#: (:func:`trained_adam`): they start at a near-point mass and must cross ``[-20, 0]`` (and
#: their log-scale rise by some 10 units) within the few hundred steps of a fine-tune. Adam
#: moves a parameter by about its learning rate per step, so at 1e-3 (the paper's, for
#: training from scratch) nothing moves far enough: measured on a trained ResNet-20, 94
#: steps at 1e-2 left every gate's log-scale at -11 and every delta F far below 0; 188
#: steps at 0.1 spread the log-scales over [-3, 4] and let the evidence prune.
TRAINED_GATE_LR = 0.1


def load_trained(source: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """A trained plain network read from ``source`` with ``weights_only=True`` (no code runs).

    ``source`` is either a compacted file (:func:`bmrs.compaction.save_compact`; rebuilt
    from its recorded architecture, or from ``model`` when it has none) or a plain state dict
    (``torch.save(net.state_dict(), path)``), loaded strictly into ``model``, which is
    returned. A gated model's state dict is refused: compact that model first (a bmrs run's
    ``compact.pt`` is such a file). Errors a user can cause raise :class:`bmrs.BMRSError`.
    """
    from .compaction import load_compact
    from .gates import gates

    path = Path(source)
    if not path.is_file():
        raise BMRSError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    data = read_tensors(path, "a state dict or a compacted model file")
    if isinstance(data, dict) and "metadata" in data and "state_dict" in data:
        if model is not None and gates(model):
            raise BMRSError("load_trained needs a plain model (no gates) to load into")
        return load_compact(path, model=model)
    if not (isinstance(data, dict) and data and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items())):
        raise BMRSError(f"{path} holds neither a state dict (names to tensors) nor a compacted model")
    if any(".bmrs_gate." in f".{k}" for k in data):
        raise BMRSError(f"{path} is the state dict of a gated model: compact it first "
                         "(a bmrs run directory's compact.pt is such a file)")
    if model is None:
        raise BMRSError(f"{path} is a plain state dict: pass the model it belongs to")
    if gates(model):
        raise BMRSError("load_trained needs a plain model (no gates) to load the state dict into")
    try:
        model.load_state_dict(data, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise BMRSError(f"{path} does not fit the model ({detail})") from None
    return model


def gate_trained(model: nn.Module, example_input, *, exclude=(), rtol: float = 1e-3, **options):
    """Attach gates to a trained ``model`` (in place) so that it computes what it computed.

    The gates start from :data:`TRAINED_GATE_INIT` (``options`` override it and pass on to
    :func:`bmrs.attach_gates`). The eval-mode outputs on ``example_input`` (a batch of real
    inputs) are compared before and after: a relative difference (largest absolute
    difference over the largest absolute output) above ``rtol`` raises :class:`bmrs.BMRSError`
    and leaves the model without gates. Returns the :class:`~bmrs.structure.GateLayout`.
    """
    from .gates import detach_gates

    settings = dict(TRAINED_GATE_INIT) | options
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                before = model(example_input)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                detail = " ".join(str(err).split())[:200]
                raise BMRSError(f"the trained network does not take the example input ({detail})") from None
        layout = attach_gates(model, example_input, exclude=exclude, **settings)
        model.eval()
        with torch.no_grad():
            after = model(example_input)
        error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
        if not error <= rtol:
            detach_gates(model)
            raise BMRSError(f"the gated network's outputs differ from the trained network's by {error:.2e} "
                             f"(relative), more than {rtol:g}: start the gates closer to 1 (init_log_scale)")
    finally:
        model.train(training)
    return layout


def trained_adam(model: nn.Module, lr: float, gate_lr: float | None = None) -> torch.optim.Adam:
    """:func:`adam` for a gated trained network: the weights at ``lr``, the gates' posterior
    parameters at ``gate_lr`` (default :data:`TRAINED_GATE_LR`)."""
    from .gates import gates

    gate_params = {id(p) for g in gates(model).values() for p in g.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_params]
    posterior = [p for p in model.parameters() if id(p) in gate_params]
    gate_lr = TRAINED_GATE_LR if gate_lr is None else gate_lr
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    groups = [g for g in ({"params": weights, "lr": lr}, {"params": posterior, "lr": gate_lr}) if g["params"]]
    return torch.optim.Adam(groups, lr=lr, fused=True if fused else None)


def elbo_loss(
    output: Tensor,
    target: Tensor,
    model: nn.Module,
    *,
    loss_fn: Callable = F.cross_entropy,
    kl_reduction: str = DEFAULT_KL_REDUCTION,
    dataset_size: int | None = None,
    kl_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Negative ELBO: ``loss_fn(output, target) + kl_weight * KL``; returns (total, data, kl).

    ``kl_reduction`` and ``dataset_size`` are those of :func:`bmrs.model_kl` (default
    ``"structures"``, the recommended one; the paper's: ``"mean"``, unscaled; a proper
    per-example ELBO: ``"elbo"`` with the training set size).
    """
    data = loss_fn(output, target)
    kl = model_kl(model, kl_reduction, dataset_size)
    if kl.device != data.device:
        kl = kl.to(data.device)
    return data + kl_weight * kl, data, kl


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or parameter, a parameter beyond its bound
    (:data:`PARAMETER_BOUND`, :data:`GATE_LOG_BOUND`) or a loss risen by orders of magnitude
    (:data:`LOSS_RISE`). Raised at the end of the epoch at the latest, before that epoch's
    checkpoint is written (the previous one is kept)."""


class _FiniteLosses:
    """Watches the losses of an epoch for NaN or infinity without a host synchronisation per
    step: the first bad step is kept on the device and read every ``_DIVERGENCE_CHECK_EVERY``
    steps and by :meth:`check`."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.steps, self.first_bad = epoch, 0, None

    def observe(self, loss: Tensor) -> None:
        self.steps += 1
        step = torch.where(torch.isfinite(loss.detach()), torch.iinfo(torch.int64).max, self.steps)
        self.first_bad = step if self.first_bad is None else torch.minimum(self.first_bad, step)
        if self.steps % _DIVERGENCE_CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        if self.first_bad is not None and int(self.first_bad) <= self.steps:
            raise TrainingDiverged(f"training diverged: the loss is not finite at epoch {self.epoch}, step {int(self.first_bad)}")


def _check_parameters(model: nn.Module, epoch: int) -> None:
    """Raise :class:`TrainingDiverged` naming the first parameter or buffer that is not
    finite, the first parameter beyond :data:`PARAMETER_BOUND`, or the first gate parameter
    beyond :data:`GATE_LOG_BOUND` (one host synchronisation for all of them)."""
    gate_params = {f"{m}.{p}" if m else p for m, module in model.named_modules() if isinstance(module, NoiseGate)
                   for p in ("loc", "log_scale")}
    params = dict(model.named_parameters())
    tensors = [(n, t) for n, t in (*params.items(), *model.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return

    def bound(name: str) -> float:
        return GATE_LOG_BOUND if name in gate_params else PARAMETER_BOUND if name in params else math.inf

    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    largest = torch.stack([t.detach().abs().max().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                           for _, t in tensors])
    limits = torch.tensor([bound(n) for n, _ in tensors], dtype=torch.float32, device=largest.device)
    bad = (~finite) | (largest > limits)
    if not bool(bad.any()):
        return
    i = int(torch.nonzero(bad)[0])
    name = tensors[i][0]
    if not bool(finite[i]):
        raise TrainingDiverged(f"training diverged: parameter {name} is not finite after epoch {epoch}")
    what = "its exponential overflows" if name in gate_params else "far beyond what a trained network holds"
    raise TrainingDiverged(f"training diverged: parameter {name} reaches {float(largest[i]):.3g} after epoch {epoch}, "
                           f"over the bound {limits[i]:.3g} ({what})")


def _check_loss_rise(loss: float, history: list, epoch: int) -> None:
    """Raise :class:`TrainingDiverged` when ``loss`` rose by orders of magnitude (:data:`LOSS_RISE`)."""
    lowest = min((r.train_loss for r in history), default=math.inf)
    if loss > LOSS_CEILING and loss > LOSS_RISE * lowest:
        raise TrainingDiverged(f"training diverged: the training loss rose to {loss:.3g} at epoch {epoch}, "
                               f"over {LOSS_RISE:g} times its lowest epoch mean so far ({lowest:.3g})")


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


@dataclass
class EpochRecord:
    """What one epoch did."""

    epoch: int
    phase: str  # "train" (pruning may happen) or "finetune" (masks fixed)
    train_loss: float
    train_kl: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    structure_compression: float
    parameter_compression: float
    kept: dict[str, int] = field(default_factory=dict)  # unmasked structures per layer (kept_per_layer)
    seconds: float = 0.0


def check_checkpoint(state, path) -> None:
    """Take the checksum out of a checkpoint ``state`` read from ``path`` (as :meth:`Trainer.fit`
    writes it) and check it against the rest of the contents: a ``BMRSError`` when they
    differ. A checkpoint written before checkpoints carried checksums has none to check."""
    recorded = state.pop("checksum", None) if isinstance(state, dict) else None
    if recorded is not None and content_digest(state) != recorded:
        raise BMRSError(f"{path} is damaged: its contents do not match the checksum written with them")


class Trainer:
    """Train a gated model with the ELBO, prune during training, keep the best checkpoint.

    Args:
        model: a model with gates (see :func:`bmrs.attach_gates`); may be wrapped in
            ``DistributedDataParallel`` (see below).
        optimizer: its optimizer.
        loss_fn: data loss on ``(model(inputs), targets)``, the mean over the batch; any
            callable of those two (default cross-entropy).
        kl_reduction, dataset_size, kl_weight: the KL term, see :func:`elbo_loss` (default
            ``"structures"``, the recommended one; the paper's: ``"mean"``); ``dataset_size``
            is the size of the whole training set, not of one rank's shard.
        device: where batches go (default: where the model's parameters are).
        progress: show a progress bar over epochs (rank 0 only).

    Under ``DistributedDataParallel`` (one Trainer per process, each with its shard of the
    training data, e.g. through a ``DistributedSampler``): training steps run through the
    wrapper, so gradients are averaged over ranks; evaluation runs the network inside on
    the whole validation loader in every rank; pruning decisions are rank 0's, broadcast;
    the training numbers of the history are averaged over ranks; the checkpoint holds
    every rank's random-number state and is written by rank 0 only, and can only be resumed
    by the same number of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable = F.cross_entropy,
        kl_reduction: str = DEFAULT_KL_REDUCTION,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        check_kl_reduction(kl_reduction, "kl_reduction")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.kl_reduction, self.dataset_size, self.kl_weight = kl_reduction, dataset_size, kl_weight
        if device is None:
            device = next(unwrap(model).parameters()).device
        self.device, self.progress = torch.device(device), progress
        self.history: list[EpochRecord] = []
        self.best_state: dict | None = None
        self.best_epoch: int | None = None
        self._best_val: float = -float("inf")
        self._losses: _FiniteLosses | None = None

    # --- the pieces ---------------------------------------------------------------------------
    def step(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns loss, data loss, KL and correct count."""
        out = self._step(inputs, targets)
        return {"loss": out[0].item(), "data": out[1].item(), "kl": out[2].item(), "correct": int(out[3].item()),
                "n": len(targets)}

    def _step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`step` with its numbers left on the device as 0-d tensors (no synchronisation)."""
        self.model.train()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        output = self.model(inputs)
        loss, data, kl = elbo_loss(
            output, targets, self.model, loss_fn=self.loss_fn, kl_reduction=self.kl_reduction,
            dataset_size=self.dataset_size, kl_weight=self.kl_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        try:
            self.optimizer.step()
        except RuntimeError as err:  # e.g. Adam with lr 1e300 on float32 parameters
            if "overflow" not in str(err):
                raise
            where = f" at epoch {self._losses.epoch}, step {self._losses.steps + 1}" if self._losses is not None else ""
            raise TrainingDiverged(f"training diverged: the optimizer step overflows{where} ({err})") from None
        if self._losses is not None:
            self._losses.observe(loss)
        with torch.no_grad():
            correct = (output.argmax(dim=1) == targets).sum() if output.dim() == 2 else torch.zeros((), device=output.device)
            return loss.detach(), data.detach(), kl.detach(), correct

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Mean data loss per example and accuracy with the gates in eval mode (E[theta] * mask).

        Each batch's loss (a mean over the batch) is weighted by its size, so batches of
        different sizes count per example."""
        net = unwrap(self.model)  # no collectives: every rank may evaluate alone
        training = net.training
        net.eval()
        total_loss, correct, n = 0.0, 0, 0
        try:
            for inputs, targets in loader:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                output = net(inputs)
                total_loss += self.loss_fn(output, targets).item() * len(targets)
                correct += (output.argmax(dim=1) == targets).sum().item()
                n += len(targets)
        finally:
            net.train(training)
        return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1)}

    def train_epoch(self, loader: Iterable, epoch: int = 0) -> dict[str, float]:
        """One pass over ``loader``; returns mean loss, mean KL and accuracy.

        Raises :class:`TrainingDiverged` (naming ``epoch`` and the step) if a loss or, at the
        end, a parameter is not finite, or a parameter is beyond its bound. The per-step numbers are summed on the device and
        read once, at the end of the epoch, so that the host does not wait for an
        accelerator at every step.
        """
        sums: Tensor | None = None
        batches, n = 0, 0
        self._losses = _FiniteLosses(epoch)
        try:
            for inputs, targets in loader:
                loss, _, kl, correct = self._step(inputs, targets)
                step = torch.stack([loss.to(torch.float64), kl.to(torch.float64), correct.to(torch.float64)])
                sums = step if sums is None else sums.add_(step)
                n += len(targets)
                batches += 1
            self._losses.check()
        finally:
            self._losses = None
        _check_parameters(unwrap(self.model), epoch)
        loss_sum, kl_sum, correct_sum = sums.tolist() if sums is not None else (0.0, 0.0, 0.0)
        return {
            "loss": loss_sum / max(batches, 1),
            "kl": kl_sum / max(batches, 1),
            "accuracy": correct_sum / max(n, 1),
        }

    # --- the loop ------------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable,
        epochs: int,
        *,
        finetune_epochs: int = 0,
        pruning: ContinuousPruning | None = None,
        checkpoint: str | os.PathLike | None = None,
        generator: torch.Generator | None = None,
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
        restore_best: bool = True,
    ) -> list[EpochRecord]:
        """Train ``epochs`` epochs (pruning after each if ``pruning`` says so), then
        fine-tune ``finetune_epochs`` with the masks fixed.

        With ``restore_best`` (default) the model ends in its best-validation state among
        the epochs whose masks are final: the fine-tuning epochs, or the last epoch if there
        is no fine-tuning but pruning; all epochs if there is no pruning at all. Otherwise
        it ends in its last state.

        ``checkpoint``: a file written atomically after every epoch (model, optimizer,
        history, best state, random-number states, and ``generator``'s state, the one that
        shuffles the training data). If it exists, training resumes from it and ends with
        the same result as an uninterrupted run. It holds tensors and plain containers only
        and is read with ``weights_only=True``.

        A non-finite loss, parameter or validation loss, a parameter beyond its bound or a
        training loss risen by orders of magnitude (see :class:`TrainingDiverged`) raises
        :class:`TrainingDiverged` before that epoch's checkpoint is written.
        """
        net = unwrap(self.model)
        if checkpoint is not None and Path(checkpoint).exists():
            self._load(read_tensors(checkpoint, "a checkpoint written by bmrs training"), generator, checkpoint)
        total = epochs + finetune_epochs
        start = len(self.history) + 1
        bar = tqdm(range(start, total + 1), desc="epochs", initial=start - 1, total=total, disable=not (self.progress and is_main()), leave=False)
        for epoch in bar:
            began = time.perf_counter()
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train = average(self.train_epoch(train_loader, epoch))
            _check_loss_rise(train["loss"], self.history, epoch)
            phase = "train" if epoch <= epochs else "finetune"
            if phase == "train" and pruning is not None:
                pruning(self.model, epoch)
            val = self.evaluate(val_loader)
            if not math.isfinite(val["loss"]):
                raise TrainingDiverged(f"training diverged: the validation loss is not finite after epoch {epoch}")
            record = EpochRecord(
                epoch=epoch, phase=phase, train_loss=train["loss"], train_kl=train["kl"],
                train_accuracy=train["accuracy"], val_loss=val["loss"], val_accuracy=val["accuracy"],
                structure_compression=structure_compression(self.model),
                parameter_compression=parameter_compression(self.model),
                kept=kept_per_layer(self.model), seconds=time.perf_counter() - began,
            )
            self.history.append(record)
            selectable = pruning is None or phase == "finetune" or (finetune_epochs == 0 and epoch == total)
            if selectable and val["accuracy"] > self._best_val:
                self._best_val, self.best_epoch = val["accuracy"], epoch
                self.best_state = copy.deepcopy(net.state_dict())
            bar.set_postfix(loss=f"{train['loss']:.3f}", val=f"{val['accuracy']:.4f}", comp=f"{record.parameter_compression:.1%}")
            if checkpoint is not None:
                state = self._state(generator)  # on every rank: it gathers their random states
                if is_main():
                    state["checksum"] = content_digest(state)  # of everything else in the file
                    atomic_save(state, checkpoint)
            if on_epoch_end is not None:
                on_epoch_end(record)
        bar.close()
        if restore_best and self.best_state is not None:
            net.load_state_dict(self.best_state)
        return self.history

    def _state(self, generator: torch.Generator | None) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [asdict(r) for r in self.history],
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_val": self._best_val,
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
                "torch": torch.get_rng_state(),
                "loader": generator.get_state() if generator is not None else None,
                # every rank's generators, in rank order (the gates' noise differs per rank)
                "ranks": gather_rows(torch.get_rng_state()),
                "ranks_cuda": gather_rows(torch.cuda.get_rng_state(self.device)) if self.device.type == "cuda" else None,
            },
        }

    def _load(self, state: dict, generator: torch.Generator | None, path="the checkpoint") -> None:
        check_checkpoint(state, path)
        ranks = state.get("rng", {}).get("ranks") if isinstance(state, dict) else None
        if ranks is not None and len(ranks) != world_size():
            raise BMRSError(f"{path} was written by {len(ranks)} training process(es); resume it with as many "
                             f"(this run has {world_size()})")
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.history = [EpochRecord(**r) for r in state["history"]]
            self.best_state, self.best_epoch, self._best_val = state["best_state"], state["best_epoch"], float(state["best_val"])
            rng = state["rng"]
            random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in rng["python"]))
            _set_numpy_rng_state(rng["numpy"])
            # a row of the stacked states is a view at an offset: set_rng_state needs a tensor of its own
            torch.set_rng_state((rng["torch"] if ranks is None else ranks[rank()]).cpu().clone())
            if rng.get("ranks_cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["ranks_cuda"][rank()].cpu().clone(), self.device)
            if generator is not None and rng["loader"] is not None:
                generator.set_state(rng["loader"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            detail = " ".join(str(err).split())[:200]
            raise BMRSError(f"{path} is not a checkpoint of this training ({type(err).__name__}: {detail})") from None
