"""Live metrics of a training run, written after every epoch (``bmrs train --log``).

* ``csv``: ``OUT/log.csv``, one row per epoch (phase, training loss and KL, training and
  validation accuracy, validation loss, parameter and structure compression, kept structures
  per gated layer), and ``OUT/delta_f.csv``, one row per epoch and structure (layer, index,
  delta F, kept): the data of the delta F histograms.
* ``tensorboard``: ``OUT/tensorboard/``, the same scalars and a histogram of delta F per
  gated layer, through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: the
  ``bmrs[tensorboard]`` extra; it is imported only here, only when asked for).

delta F is the run's own criterion's for a BMRS method (which prunes where it reaches the
criterion's margin, e.g. -1 for ``bmrs-n-kr``), and the exact BMRS_N's (``bmrs-n``) for
``none`` and the baselines, whose decisions do not use it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import BMRSError
from ..gates import gates, layer_names
from ..pruning.criteria import Criterion, make_criterion
from ..training import EpochRecord

__all__ = ["LOG_FORMATS", "EpochLogger", "log_files"]

LOG_FORMATS = ("csv", "tensorboard")


def log_files(out: str | os.PathLike) -> list[Path]:
    """The live-log files in run directory ``out``: ``log.csv``, ``delta_f.csv`` and the
    TensorBoard event files under ``tensorboard/`` (nothing else of that folder)."""
    out = Path(out)
    found = [out / name for name in ("log.csv", "delta_f.csv") if (out / name).is_file()]
    if (out / "tensorboard").is_dir():
        found += sorted(p for p in (out / "tensorboard").glob("events.out.tfevents.*") if p.is_file())
    return found

_SCALARS = ("train_loss", "train_kl", "train_accuracy", "val_loss", "val_accuracy", "parameter_compression",
            "structure_compression")


class EpochLogger:
    """An ``on_epoch_end`` callback of :meth:`bmrs.Trainer.fit` that writes ``record`` and the
    gates' delta F of ``model`` in ``fmt`` (``"csv"`` or ``"tensorboard"``) into ``out``.

    On a resumed run the files are continued: rows of epochs that a killed run had logged
    after its last checkpoint are written again, so read the last row of an epoch.
    """

    def __init__(self, fmt: str, out: str | os.PathLike, model: nn.Module, criterion: Criterion | None) -> None:
        if fmt not in LOG_FORMATS:
            raise BMRSError(f"unknown log format {fmt!r}; choose from {', '.join(LOG_FORMATS)}")
        self.fmt, self.out, self.model = fmt, Path(out), model
        evidence = criterion is not None and criterion.evidence_based
        self.criterion = criterion if evidence else make_criterion("bmrs-n")
        self.names = layer_names(model)  # gate -> the layer it prunes, as printed
        self.layers = list(self.names.values())
        self.writer = None
        if fmt == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise BMRSError("--log tensorboard needs the tensorboard package: "
                                 "pip install 'bmrs[tensorboard]' (or pip install tensorboard)") from None
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def delta_f(self) -> dict[str, torch.Tensor]:
        """delta F of every structure of every gated layer (see the module docstring)."""
        with torch.no_grad():
            return {self.names[name]: self.criterion.delta_f(gate).detach().double().cpu() for name, gate in gates(self.model).items()}

    def __call__(self, record: EpochRecord) -> None:
        delta = self.delta_f()
        if self.writer is not None:
            self._tensorboard(record, delta)
        else:
            self._csv(record, delta)

    def _csv(self, record: EpochRecord, delta: dict[str, torch.Tensor]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.csv"
        header = ["epoch", "phase", *_SCALARS, *(f"kept:{name}" for name in self.layers)]
        row = [record.epoch, record.phase, *(getattr(record, k) for k in _SCALARS),
               *(record.kept.get(name, "") for name in self.layers)]
        self._append(path, header, [row])
        masks = {self.names[name]: gate.mask.bool().tolist() for name, gate in gates(self.model).items()}
        rows = [[record.epoch, name, i, float(v), int(masks[name][i])]
                for name, values in delta.items() for i, v in enumerate(values.tolist())]
        self._append(self.out / "delta_f.csv", ["epoch", "layer", "structure", "delta_f", "kept"], rows)

    @staticmethod
    def _append(path: Path, header: list, rows: list[list]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            if new:
                writer.writerow(header)
            writer.writerows(rows)

    def _tensorboard(self, record: EpochRecord, delta: dict[str, torch.Tensor]) -> None:
        w, step = self.writer, record.epoch
        w.add_scalar("loss/train", record.train_loss, step)
        w.add_scalar("loss/val", record.val_loss, step)
        w.add_scalar("kl/train", record.train_kl, step)
        w.add_scalar("accuracy/train", record.train_accuracy, step)
        w.add_scalar("accuracy/val", record.val_accuracy, step)
        w.add_scalar("compression/parameters", record.parameter_compression, step)
        w.add_scalar("compression/structures", record.structure_compression, step)
        for name, kept in record.kept.items():
            w.add_scalar(f"kept/{name}", kept, step)
        for name, values in delta.items():
            finite = values[torch.isfinite(values)]
            if finite.numel():
                w.add_histogram(f"delta_f/{name}", finite, step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
