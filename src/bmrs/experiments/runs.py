"""One training run, from a configuration to a run directory of result files.

A run directory holds ``config.json`` (what ran), ``checkpoint.pt`` (resumable trainer
state, rewritten after every epoch), ``model.pt`` (the final gated model's state dict),
``compact.pt`` (the final model compacted into a plain, smaller network, see
:mod:`bmrs.compaction`) and ``metrics.json`` (written last: its presence marks the run
complete). Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from .._io import read_json, read_tensors, state_checksum, write_json
from ..calibration import model_calibration
from ..compaction import compact, count_flops, count_parameters, load_compact, save_compact
from ..errors import BMRSError
from ..gates import gates, layer_names
from ..pruning import explain
from ..pruning.criteria import CRITERIA, Criterion, criterion_class
from ..pruning.masks import kept_per_layer, parameter_compression, structure_compression
from ..pruning.schedules import ContinuousPruning
from ..datasets import load_dataset
from ..models import MODELS, _ungated_by_design, build_model
from ..rundir import (
    METRICS, RunConfig, check_same_options, load_metrics, load_state_file, run_files,
    read_config, verify_checksum,
)
from ..training import (
    Trainer, adam, atomic_save, check_checkpoint, gate_trained, load_trained, seed_everything, trained_adam,
)
from .live import EpochLogger
from .provenance import provenance

__all__ = [
    "methods", "train_run", "build_criterion", "load_run", "LoadedRun", "model_architecture", "layer_widths",
    "compact_to_file", "trained_network",
]


def methods() -> tuple[str, ...]:
    """Methods of ``bmrs train --method``: ``none`` (no pruning), then every registered criterion."""
    return ("none", *CRITERIA)


class _MatchedTarget:
    """Continuous pruning whose target follows another run's per-epoch parameter compression."""

    def __init__(self, criterion: Criterion, history: list[dict], every: int, recompute: bool):
        self.targets = {r["epoch"]: r["parameter_compression"] for r in history if r["phase"] == "train"}
        self.criterion, self.every, self.recompute = criterion, every, recompute

    def __call__(self, model, epoch):
        if epoch % self.every or epoch not in self.targets:
            return None
        return ContinuousPruning(
            self.criterion, 1, recompute=self.recompute, target=self.targets[epoch], target_kind="params",
        )(model, epoch)


def build_criterion(config: RunConfig, train_loader) -> Criterion:
    """The criterion of ``config.method`` (not ``none``; ``config`` checked, see
    :meth:`RunConfig.check`), given what it :attr:`~bmrs.pruning.Criterion.needs` from the run
    (its training batches, seed, bits), with its threshold override."""
    cls = criterion_class(config.check().method)
    context = {"data": train_loader, "seed": config.seed, "bits": config.bits}
    options = {key: context[key] for key in cls.needs}
    if config.threshold is not None:
        options["threshold"] = config.threshold
    return cls(**options)


def model_architecture(config: RunConfig, input_shape, num_classes: int) -> dict:
    """The ``architecture`` description that :func:`bmrs.compaction.load_compact` rebuilds from."""
    return {
        "name": config.model,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "options": dict(config.model_options),
    }


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear and Conv layer by module name (features or channels)."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            widths[name] = int(module.out_features)
        elif isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = int(module.out_channels)
    return widths


def compact_to_file(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, architecture: dict) -> dict:
    """Compact a gated model, save it with :func:`~bmrs.compaction.save_compact`, return sizes.

    ``example_input`` is a batch used to trace the model and to check that the compacted
    network gives the gated model's eval-mode outputs; FLOPs are counted for one example of
    ``architecture["input_shape"]``. Returns parameter counts, FLOPs and layer widths before
    and after, the input shape of the FLOP count, the architecture and the file name.
    """
    single = torch.zeros(1, *architecture["input_shape"], dtype=example_input.dtype, device=example_input.device)
    small = compact(model, example_input)
    save_compact(small, path, architecture=architecture)
    return {
        "file": Path(path).name,
        "architecture": architecture,
        "input_shape": [1, *architecture["input_shape"]],
        "parameters_before": count_parameters(model),
        "parameters_after": count_parameters(small),
        "flops_before": count_flops(model, single),
        "flops_after": count_flops(small, single),
        "widths_before": layer_widths(model),
        "widths_after": layer_widths(small),
    }


def _compaction(model: nn.Module, config: RunConfig, data, out: Path) -> dict:
    """``compact_to_file`` for the end of a run; a model that cannot be compacted exactly (a
    gate that cannot be folded into the weights, see docs/compaction.md) gets
    ``{"error": ...}`` instead of failing the run."""
    architecture = model_architecture(config, data.input_shape, data.num_classes)
    try:
        return compact_to_file(model, data.test.tensors[0][:64], out / "compact.pt", architecture)
    except (ValueError, RuntimeError) as err:
        (out / "compact.pt").unlink(missing_ok=True)
        return {"error": f"{type(err).__name__}: {err}", "architecture": architecture}


def _evidence_and_calibration(model: nn.Module, criterion, loader, compacted: nn.Module | None) -> dict:
    """What ``metrics.json`` records beside the accuracy: the evidence summary of the final
    masks (:func:`bmrs.pruning.explain`; for an evidence criterion only) and the calibration
    of the unpruned and gated models, of ``compacted`` (the network the run saved, None when
    it could not be compacted) and of the gates' predictive, without the bins (``bmrs explain``
    has those)."""
    found = {}
    if criterion is not None and criterion.evidence_based:
        found["evidence"] = explain(model, criterion).summary()
    calibrated = model_calibration(model, loader, compacted)
    found["calibration"] = {name: {k: v for k, v in c.items() if k != "bins"} for name, c in calibrated.items()}
    return found


def trained_network(source: str | os.PathLike, config: RunConfig, input_shape, num_classes: int) -> nn.Module:
    """The trained plain network ``config.start_from`` names, for ``config``'s bundled model.

    ``source`` is a bmrs run directory (its ``compact.pt``, the final network with the gates
    folded in; or its gated ``model.pt`` / ``checkpoint.pt``, compacted here), a compacted
    file, or a plain state dict of the bundled model (``torch.save(net.state_dict())``). Every
    file is read with ``weights_only=True``. A network of another architecture or other
    model options than ``config``'s raises :class:`bmrs.BMRSError`.
    """
    path = Path(source)
    if not path.exists():
        raise BMRSError(f"--from {path}: no such file or directory")
    expected = model_architecture(config, input_shape, num_classes)
    run_dir = path if path.is_dir() else path.parent
    is_run = (run_dir / "config.json").is_file() and (path.is_dir() or path.name in ("model.pt", "checkpoint.pt"))
    if path.is_dir() and (path / "compact.pt").is_file():
        path, is_run = path / "compact.pt", False
    if is_run:
        loaded = load_run(path)
        net = compact(loaded.model, loaded.example)
        found = loaded.architecture
    else:
        if path.is_dir():
            raise BMRSError(f"--from {path}: a directory without a run's compact.pt or model.pt")
        builder = MODELS[config.model]
        net = load_trained(path, builder(list(input_shape), num_classes, **config.model_options))
        data = read_tensors(path)  # (load_trained has read it once already, so this succeeds)
        metadata = data.get("metadata") if isinstance(data, dict) else None
        found = json.loads(metadata).get("architecture") if isinstance(metadata, str) else None
    if found is not None and {k: found.get(k) for k in expected} != expected:
        raise BMRSError(f"--from {source} holds a {found.get('name')} with options {found.get('options')} for inputs "
                        f"{found.get('input_shape')} and {found.get('num_classes')} classes; this run is a "
                        f"{expected['name']} with {expected['options']} for {expected['input_shape']} and "
                        f"{expected['num_classes']} classes")
    return net.train()


def train_run(
    config: RunConfig, out_dir: str | os.PathLike, *, progress: bool = True, resume: bool = True,
    device: str | torch.device = "cpu", log: str | None = None,
) -> dict:
    """Train (and prune) one model as ``config`` says; write the run directory; return metrics.

    With ``resume`` (default), an existing ``checkpoint.pt`` in ``out_dir`` is continued and
    the run ends with the same metrics as an uninterrupted one. A complete run (with
    ``metrics.json``) is returned as it is.

    The final model is also compacted into ``compact.pt``; ``metrics["compaction"]`` holds
    the parameters, FLOPs (one example) and layer widths before and after (or ``"error"``
    if the model cannot be compacted).

    Inside a ``torch.distributed`` process group of N processes (``bmrs train --nproc N``
    or torchrun), every process calls this: each trains on its shard of the training set
    with ``config.batch_size`` examples per step (a global batch of N times that), through
    ``DistributedDataParallel`` on ``device``; only rank 0 writes files. The result is
    reproducible for a given seed and N; ``metrics["processes"]`` records N.

    ``log`` (``"csv"`` or ``"tensorboard"``) writes live metrics after every epoch, see
    :mod:`bmrs.experiments.live`.
    """
    out = Path(out_dir)
    config = config.check().resolved()
    if (out / "metrics.json").exists() and resume:
        return load_metrics(out)
    if resume:
        check_same_options(out, config)
    main = distributed.is_main()
    if main and not resume:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    if main:
        write_json(asdict(config), out / "config.json")

    device = torch.device(device)
    generator = seed_everything(config.seed)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed, image_size=config.image_size)
    if config.start_from is None:
        model = build_model(config.model, data.input_shape, data.num_classes, **config.model_options).to(device)
    else:  # a trained network, gated so that it computes what it computed
        model = trained_network(config.start_from, config, data.input_shape, data.num_classes)
        gate_trained(model, data.val.tensors[0][:64], exclude=_ungated_by_design(model))
        model = model.to(device)
    distributed.seed_noise(config.seed)
    if distributed.world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(data.train, shuffle=True, seed=config.seed)
        train_loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, sampler=sampler, generator=generator)
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        train_loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
        trained = model
    val_loader = torch.utils.data.DataLoader(data.val, batch_size=1000)
    test_loader = torch.utils.data.DataLoader(data.test, batch_size=1000)

    pruning, criterion = None, None
    if config.method != "none":
        criterion = build_criterion(config, train_loader)
        if config.match is not None:
            history = load_metrics(config.match)["history"]
            pruning = _MatchedTarget(criterion, history, config.prune_every, config.recompute_masks)
        else:
            pruning = ContinuousPruning(
                criterion, config.prune_every, recompute=config.recompute_masks, target=config.target,
                target_kind="params",
            )
    optimizer = adam(model.parameters(), config.lr) if config.start_from is None else trained_adam(model, config.lr)
    trainer = Trainer(
        trained, optimizer, kl_reduction=config.kl_reduction, dataset_size=len(data.train), device=device,
        progress=progress,
    )
    logger = None
    if log is not None and main:  # live metrics are files: rank 0 writes them
        logger = EpochLogger(log, out, model, criterion)
    try:
        trainer.fit(
            train_loader, val_loader, config.epochs, finetune_epochs=config.finetune_epochs, pruning=pruning,
            checkpoint=out / "checkpoint.pt", generator=generator, on_epoch_end=logger,
        )
    finally:
        if logger is not None:
            logger.close()
    test = trainer.evaluate(test_loader)
    val = trainer.evaluate(val_loader)
    model = model.cpu()  # the files hold CPU tensors, whatever the device of training
    named, layer = gates(model), layer_names(model)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val["accuracy"],
        "structure_compression": structure_compression(model),
        "parameter_compression": parameter_compression(model),
        "kept": kept_per_layer(model),
        "structures": {layer[name]: g.num_structures for name, g in named.items()},
        "best_epoch": trainer.best_epoch,
        "train_seconds": sum(r.seconds for r in trainer.history),
        "processes": distributed.world_size(),
        "history": [asdict(r) for r in trainer.history],
    }
    if main:
        state = model.state_dict()
        atomic_save(state, out / "model.pt")
        metrics["checksums"] = {"model.pt": state_checksum(state)}
        metrics["compaction"] = _compaction(model, config, data, out)
        compacted = load_compact(out / "compact.pt") if (out / "compact.pt").is_file() else None
        metrics.update(_evidence_and_calibration(model, criterion, test_loader, compacted))
        metrics["provenance"] = provenance(config, out)
        if (out / "compact.pt").is_file():
            metrics["checksums"]["compact.pt"] = state_checksum(read_tensors(out / "compact.pt")["state_dict"])
        write_json(metrics, out / "metrics.json")
    distributed.barrier()  # every rank returns once the run directory is complete
    if not main:
        metrics = load_metrics(out)
    return metrics


@dataclass
class LoadedRun:
    """A run's gated model with its final (or checkpointed) state, and what goes with it."""

    config: RunConfig
    model: nn.Module
    architecture: dict
    example: torch.Tensor
    data: object | None
    epoch: int | None = None  # the epoch whose state was loaded, where the run records it


def load_run(path: str | os.PathLike, data_dir=None, *, need_data: bool = False) -> LoadedRun:
    """Rebuild the gated model of a run directory (or of its model.pt / checkpoint.pt).

    The data set is loaded when ``need_data`` or when the run's metrics do not record the
    architecture; ``example`` is a batch of 64 inputs (test images, or seeded noise);
    ``epoch`` the epoch of the state loaded (a checkpoint's last epoch, or model.pt's best
    validation epoch), None where the run does not record it.
    """
    run_dir, state_file = run_files(path)
    config = RunConfig.from_dict(read_config(run_dir / "config.json")).resolved()
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if state_file.name == "checkpoint.pt":
        checkpoint = load_state_file(state_file)
        if not (isinstance(checkpoint, dict) and "model" in checkpoint):
            raise BMRSError(f"{state_file} is not a checkpoint written by 'bmrs train'")
        check_checkpoint(checkpoint, state_file)
        state = checkpoint["model"]
        epoch = len(checkpoint.get("history", [])) or None
    else:
        state = load_state_file(state_file)
        epoch = None
    if isinstance(state, dict) and "metadata" in state and "state_dict" in state:
        raise BMRSError(f"{state_file} is already a compacted model (see 'bmrs info {state_file}')")
    if not isinstance(state, dict):
        raise BMRSError(f"{state_file} does not hold a model state dict")
    architecture, data = None, None
    metrics_file = run_dir / "metrics.json"
    metrics = read_json(metrics_file, METRICS) if metrics_file.is_file() else {}
    if state_file.name == "model.pt":
        epoch = metrics.get("best_epoch")
    if metrics and not need_data:
        architecture = (metrics.get("compaction") or {}).get("architecture")
        if architecture is not None:  # the shapes from the metrics, the network from the configuration
            architecture = model_architecture(config, architecture["input_shape"], architecture["num_classes"])
    if architecture is None:
        data = load_dataset(config.dataset, config.data_dir, seed=config.seed, image_size=config.image_size)
        architecture = model_architecture(config, data.input_shape, data.num_classes)
    try:
        model = build_model(config.model, architecture["input_shape"], architecture["num_classes"], **config.model_options)
    except BMRSError as err:
        raise BMRSError(f"{run_dir / 'config.json'}: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise BMRSError(f"{state_file} does not fit the model of {run_dir / 'config.json'} ({detail})") from None
    if state_file.name == "model.pt":
        verify_checksum(state, state_file, metrics.get("checksums", {}).get("model.pt"))
    model.eval()
    if data is not None:
        example = data.test.tensors[0][:64]
    else:
        example = torch.randn(64, *architecture["input_shape"], generator=torch.Generator().manual_seed(0))
    return LoadedRun(config, model, architecture, example, data, epoch)
