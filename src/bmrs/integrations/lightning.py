"""BMRS pruning in PyTorch Lightning: the :class:`BMRSPruning` callback.

Needs Lightning (``pip install "bmrs[lightning]"``); the rest of bmrs never imports it.

::

    import lightning as L
    from bmrs.integrations.lightning import BMRSPruning

    pruning = BMRSPruning("bmrs-n-kr", kl_reduction="elbo")
    L.Trainer(max_epochs=30, callbacks=[pruning], strategy="ddp").fit(module, loader)
    small = pruning.compacted          # the plain, smaller network

See docs/distributed.md for what happens at each step and under DDP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from .. import distributed
from ..compaction import compact
from ..errors import BMRSError
from ..calibration import calibration, predict
from ..gates import attach_gates, check_kl_reduction, gates, model_kl
from ..pruning.criteria import RECOMMENDED, Criterion, resolve_criterion
from ..pruning.evidence import explain
from ..pruning.masks import kept_per_layer, parameter_compression, structure_compression
from ..pruning.schedules import ContinuousPruning

__all__ = ["BMRSPruning"]


class BMRSPruning(Callback):
    """Gates, the KL term, continuous pruning and compaction for a ``LightningModule``.

    * ``setup``: attaches noise gates to the network (the LightningModule, or its submodule
      named ``module``) unless it already has gates, tracing it with ``example_input`` (or
      the module's ``example_input_array``). This happens before Lightning builds the
      optimizers and the DDP wrapper, so both see the gates' parameters.
    * Every training step: adds ``kl_weight * bmrs.model_kl(network, kl_reduction,
      dataset_size)`` to the loss that ``training_step`` returns (a tensor, or the
      ``"loss"`` of a dict), before Lightning's backward pass, and logs it as ``bmrs/kl``.
      With ``add_to_loss=False`` (required for manual optimisation) nothing is added and
      ``training_step`` adds :meth:`kl_term` itself.
    * At the end of training epochs ``every, 2 * every, ...`` (up to ``prune_until``, if
      given): prunes with ``criterion`` (decided identically on every rank: rank 0's masks
      are broadcast), and logs ``bmrs/structure_compression``,
      ``bmrs/parameter_compression``, ``bmrs/kept/<gate>`` and, for the BMRS criteria,
      ``bmrs/delta_f_min|median|max``: the delta F of the kept structures (the criterion
      prunes where delta F reaches its margin: 0 for ``bmrs-n``, -1 for ``bmrs-n-kr``, ...)
      and the evidence summary of :func:`bmrs.pruning.explain`: ``bmrs/ambiguous`` (decisions
      within 1 nat of the margin), ``bmrs/evidence_removes``, ``bmrs/removed_against``,
      ``bmrs/kept_beyond``, ``bmrs/evidence_spent`` and ``bmrs/ambiguous/<layer>``.
    * At the end of every validation epoch (``calibration=True``): the calibration of the
      gated model on the (first) validation dataloader, whose batches must be
      ``(inputs, targets)``: ``bmrs/val_nll`` and ``bmrs/val_ece`` (:mod:`bmrs.calibration`;
      under DDP each rank measures its shard and the logged values are their means), and with
      ``predictive_draws=N`` also the gates' Monte Carlo predictive, ``bmrs/val_predictive_nll``
      and ``bmrs/val_predictive_ece``.
    * ``on_fit_end``: :attr:`compacted` holds the compacted network (see
      :func:`bmrs.compact`), on every rank.

    Args:
        criterion: a criterion name or label (see :func:`bmrs.pruning.resolve_criterion`) or a
            :class:`~bmrs.pruning.criteria.Criterion` (default ``"bmrs-n-kr"``, the
            recommended one, :data:`bmrs.pruning.RECOMMENDED`; the paper's: ``"bmrs-n-code"``).
        every: prune after every ``every``-th training epoch.
        kl_reduction, dataset_size, kl_weight: the KL term (see :func:`bmrs.model_kl`;
            default ``"structures"``, the recommended one; the paper's: ``"mean"``). For
            ``"elbo"``, ``dataset_size`` defaults to the length of the training
            dataloader's dataset: the whole training set, also under DDP.
        module: name of the LightningModule's attribute holding the network to gate and
            compact (default: the LightningModule itself).
        example_input: inputs to trace the network with, for attaching gates and compacting.
        exclude: passed to :func:`bmrs.attach_gates`.
        recompute, target, target_kind: passed to :class:`bmrs.ContinuousPruning`.
        prune_until: last epoch that prunes (later epochs fine-tune with fixed masks).
        add_to_loss: add the KL term to ``training_step``'s loss (see above).
        seed: under DDP, each rank's noise is seeded from this and the rank at the start
            of training (default: the seed of ``lightning.seed_everything``, else 0).
        calibration: log the calibration of the gated model after each validation epoch.
        predictive_draws: draws of the Monte Carlo predictive logged beside it (0: none; each
            draw is one more pass over the validation data).
    """

    def __init__(
        self,
        criterion: str | Criterion = RECOMMENDED["method"],
        every: int = 1,
        *,
        kl_reduction: str = RECOMMENDED["kl_reduction"],
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        module: str | None = None,
        example_input=None,
        exclude: Sequence = (),
        recompute: bool = False,
        target: float | None = None,
        target_kind: str = "structures",
        prune_until: int | None = None,
        add_to_loss: bool = True,
        seed: int | None = None,
        calibration: bool = True,
        predictive_draws: int = 0,
    ) -> None:
        check_kl_reduction(kl_reduction, "kl_reduction")
        self.criterion = resolve_criterion(criterion)
        self.pruning = ContinuousPruning(self.criterion, every, recompute=recompute, target=target, target_kind=target_kind)
        self.kl_reduction, self.dataset_size, self.kl_weight = kl_reduction, dataset_size, kl_weight
        self.module, self.example_input, self.exclude = module, example_input, exclude
        self.prune_until, self.add_to_loss, self.seed = prune_until, add_to_loss, seed
        if predictive_draws < 0:
            raise BMRSError(f"predictive_draws must be >= 0, got {predictive_draws}")
        self.calibration, self.predictive_draws = calibration, predictive_draws
        self.compacted: nn.Module | None = None
        self._patched = None

    # --- the network -----------------------------------------------------------------------
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The gated network: ``pl_module`` or its submodule named ``module``."""
        return pl_module if self.module is None else getattr(pl_module, self.module)

    def _example(self, pl_module) -> object:
        example = self.example_input if self.example_input is not None else getattr(pl_module, "example_input_array", None)
        if example is None:
            raise BMRSError("BMRSPruning needs example inputs to trace the network: pass example_input=..., "
                             "or set the LightningModule's example_input_array")
        return example

    def kl_term(self, pl_module: nn.Module) -> Tensor:
        """``kl_weight * bmrs.model_kl(network, kl_reduction, dataset_size)``, to add to the loss."""
        return self.kl_weight * model_kl(self.network(pl_module), self.kl_reduction, self.dataset_size)

    # --- Lightning's hooks -------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        net = self.network(pl_module)
        if not gates(net):
            attach_gates(net, self._example(pl_module), exclude=self.exclude)
        if stage == "fit" and self.add_to_loss:
            if not pl_module.automatic_optimization:
                raise BMRSError("with manual optimisation, pass add_to_loss=False and add "
                                 "callback.kl_term(self) to the loss in training_step")
            self._patch(pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._patched is not None:
            del pl_module.training_step  # the instance attribute: the class's method shows again
            self._patched = None

    def _patch(self, pl_module) -> None:
        original = pl_module.training_step

        def training_step(*args, **kwargs):
            output = original(*args, **kwargs)
            if output is None:  # the step was skipped
                return output
            kl = self.kl_term(pl_module)
            pl_module.log("bmrs/kl", kl.detach(), on_step=False, on_epoch=True, sync_dist=True)
            if isinstance(output, Tensor):
                return output + kl.to(output.device)
            if isinstance(output, dict) and "loss" in output:
                return {**output, "loss": output["loss"] + kl.to(output["loss"].device)}
            raise TypeError("BMRSPruning adds the KL term to a training_step that returns the loss or a dict "
                            f"with 'loss', not {type(output).__name__}; pass add_to_loss=False and add "
                            "callback.kl_term(self) yourself")

        pl_module.training_step = training_step
        self._patched = training_step

    def on_train_start(self, trainer, pl_module) -> None:
        if self.kl_reduction == "elbo" and self.dataset_size is None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is None:
                raise BMRSError("kl_reduction='elbo' needs dataset_size=... (the training set has no length)")
            self.dataset_size = len(dataset)
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))
        distributed.seed_noise(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.example_input is None and getattr(pl_module, "example_input_array", None) is None:
            if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
                self.example_input = batch[0][:8].detach()  # for compaction, when nothing else was given

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        net = self.network(pl_module)
        epoch = trainer.current_epoch + 1
        if self.prune_until is None or epoch <= self.prune_until:
            self.pruning(net, epoch)
        summary = {
            "bmrs/structure_compression": structure_compression(net),
            "bmrs/parameter_compression": parameter_compression(net),
            **{f"bmrs/kept/{name}": float(k) for name, k in kept_per_layer(net).items()},
        }
        if self.criterion.evidence_based:
            with torch.no_grad():
                kept = [self.criterion.delta_f(g).cpu()[g.mask.cpu() > 0] for g in gates(net).values()]
            delta_f = torch.cat(kept) if kept else torch.zeros(0)
            if delta_f.numel():
                summary.update({
                    "bmrs/delta_f_min": float(delta_f.min()), "bmrs/delta_f_median": float(delta_f.median()),
                    "bmrs/delta_f_max": float(delta_f.max()),
                })
            evidence = explain(net, self.criterion).summary()
            summary.update({f"bmrs/{key}": float(evidence[key]) for key in
                            ("ambiguous", "evidence_removes", "removed_against", "kept_beyond", "evidence_spent")})
            summary.update({f"bmrs/ambiguous/{layer}": float(e["ambiguous"]) for layer, e in evidence["layers"].items()})
        for name, value in summary.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)  # equal on every rank

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.calibration or trainer.sanity_checking:
            return
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return
        net = self.network(pl_module)
        device = next(net.parameters()).device
        batches = ((inputs, targets) for inputs, targets in loader)  # (inputs, targets) batches only
        found = {"val": calibration(*predict(net, batches, device=device))}
        if self.predictive_draws:
            batches = ((inputs, targets) for inputs, targets in loader)
            found["val_predictive"] = calibration(*predict(net, batches, draws=self.predictive_draws, device=device))
        for prefix, c in found.items():
            for key in ("nll", "ece"):
                pl_module.log(f"bmrs/{prefix}_{key}", c[key], on_step=False, on_epoch=True, sync_dist=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        net = self.network(pl_module)
        example = self._example(pl_module)
        device = next(net.parameters()).device
        example = example.to(device) if isinstance(example, Tensor) else tuple(e.to(device) for e in example)
        self.compacted = compact(net, example)
