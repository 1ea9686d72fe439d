"""Finding the result files of runs and sweeps, and reading them into records."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._io import read_json
from ..errors import BMRSError
from ..gates import layer_names
from ..models import build_model
from ..pruning.criteria import criterion_label

__all__ = ["RunResult", "SweepResult", "Collection", "collect", "method_label", "base_label", "natural_key"]


def method_label(config: dict) -> str:
    """The label a run is reported under: its criterion's label
    (:func:`~bmrs.pruning.criteria.criterion_label`, e.g. BMRS_U's precision appended), and
    the KL reduction when it is not the paper's.

    ``{"method": "bmrs-u", "bits": 8.0}`` gives ``"bmrs-u8"``, ``bits=2.5`` gives
    ``"bmrs-u2.5"``; every other method is its own label (``"none"``, ``"bmrs-n"``, ...);
    ``"kl_reduction": "structures"`` appends ``"+kl-structures"``.
    """
    method = config.get("method", "?")
    label = criterion_label(method, {"bits": 8.0, **config})
    reduction = config.get("kl_reduction", "mean")
    return label if reduction == "mean" else f"{label}+kl-{reduction}"


def base_label(label: str) -> str:
    """A method label without its KL-reduction suffix (``"bmrs-u8+kl-structures"`` -> ``"bmrs-u8"``)."""
    return label.split("+", 1)[0]


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers by value (``"2" < "10"``, ``"a.2" < "a.10"``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


@dataclass
class RunResult:
    """One complete training run: its directory, ``config.json`` and ``metrics.json``."""

    path: Path
    config: dict
    metrics: dict

    @property
    def dataset(self) -> str:
        return self.config.get("dataset", "?")

    @property
    def model(self) -> str:
        return self.config.get("model", "?")

    @property
    def label(self) -> str:
        return method_label(self.config)

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def key(self) -> tuple[str, str, str]:
        """The group a run is averaged in: (dataset, model, method label)."""
        return (self.dataset, self.model, self.label)


@dataclass
class SweepResult:
    """One post-training sweep (``sweep.json``): records per criterion and level."""

    path: Path
    data: dict

    @property
    def dataset(self) -> str:
        return self.data.get("run_config", {}).get("dataset", "?")

    @property
    def model(self) -> str:
        return self.data.get("run_config", {}).get("model", "?")

    @property
    def records(self) -> list[dict]:
        return self.data.get("records", [])


@dataclass
class Collection:
    """What :func:`collect` found: runs, sweeps, and notes on what it skipped."""

    runs: list[RunResult] = field(default_factory=list)
    sweeps: list[SweepResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _named_layers(config: dict, metrics: dict) -> dict:
    """``metrics`` with the per-layer counts of a run written while the bundled MLP and LeNet5
    numbered their layers (``"kept": {"2": 15}``, the gate's module number; also in every
    epoch of ``history``) keyed by the layer each gate prunes (``"fc1"``), as runs written now
    are, so that runs of both kinds line up."""
    arch = (metrics.get("compaction") or {}).get("architecture") or {}
    layers = {**metrics.get("kept", {}), **metrics.get("structures", {})}
    if config.get("model") not in ("mlp", "lenet5") or not layers or not all(k.isdigit() for k in layers) \
            or "input_shape" not in arch:
        return metrics
    names = _numbered_to_named(config["model"], json.dumps([arch["input_shape"], arch["num_classes"],
                                                            arch.get("options") or {}], sort_keys=True))
    if not all(k in names for k in layers):
        return metrics

    def renamed(counts: dict) -> dict:
        return {names.get(k, k): v for k, v in counts.items()}

    history = [{**h, "kept": renamed(h["kept"])} if isinstance(h, dict) and isinstance(h.get("kept"), dict) else h
               for h in metrics.get("history", [])]
    return {**metrics, "history": history,
            **{key: renamed(metrics[key]) for key in ("kept", "structures") if key in metrics}}


@functools.lru_cache(maxsize=None)
def _numbered_to_named(model: str, spec: str) -> dict[str, str]:
    """``{old layer number: layer name}`` of a bundled model's gated layers, built once per
    architecture (``spec``: input shape, classes and options as JSON)."""
    input_shape, num_classes, options = json.loads(spec)
    net = build_model(model, input_shape, num_classes, **options)
    named = layer_names(net)
    numbered = {str(i): net.layer_name(str(i)) for i in range(len(net))}  # the networks' own rule
    return {number: named[child] for number, child in numbered.items() if child in named}


def _classify(folder: Path, collection: Collection) -> bool:
    """Add ``folder`` to ``collection`` if it is a run or sweep directory; say whether it was."""
    found = False
    if (folder / "sweep.json").is_file():
        collection.sweeps.append(SweepResult(folder, read_json(folder / "sweep.json")))
        found = True
    if (folder / "config.json").is_file():
        if (folder / "metrics.json").is_file():
            from ..experiments.runs import RunConfig, check_metrics

            config = read_json(folder / "config.json")
            RunConfig.from_dict(config, folder / "config.json")  # the kinds of its values
            metrics = check_metrics(read_json(folder / "metrics.json"), folder / "metrics.json", complete=False)
            collection.runs.append(RunResult(folder, config, _named_layers(config, metrics)))
        else:
            collection.skipped.append(f"{folder}: unfinished run (no metrics.json), skipped")
        found = True
    return found


def collect(paths) -> Collection:
    """Read runs and sweeps from ``paths``.

    Each path may be a run directory (``config.json`` and ``metrics.json``), a sweep
    directory (``sweep.json``), or any directory holding such directories at any depth
    (e.g. the output of ``bmrs reproduce``). A directory found twice is read once.
    Unfinished runs (a ``config.json`` without ``metrics.json``) are skipped and noted in
    :attr:`Collection.skipped`.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a path holds no runs or sweeps, or a result file is not valid JSON.
    """
    collection = Collection()
    seen: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        if root.is_file():  # a metrics.json, config.json or sweep.json given directly
            root = root.parent
        before = len(collection.runs) + len(collection.sweeps) + len(collection.skipped)
        for folder, subdirs, _ in os.walk(root):
            subdirs.sort(key=natural_key)
            folder = Path(folder)
            resolved = folder.resolve()
            if resolved in seen:
                subdirs.clear()
                continue
            seen.add(resolved)
            if _classify(folder, collection):
                subdirs.clear()  # a run or sweep directory holds no further results
        if len(collection.runs) + len(collection.sweeps) + len(collection.skipped) == before:
            # nothing new: fine if an earlier path already contributed results from here
            inside = root.resolve()
            known = [r.path for r in collection.runs] + [s.path for s in collection.sweeps]
            if not any(inside == k.resolve() or inside in k.resolve().parents for k in known):
                raise BMRSError(f"{raw}: no runs (config.json + metrics.json) or sweeps (sweep.json) found")
    return collection
