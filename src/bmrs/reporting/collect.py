"""Finding the result files of runs and sweeps, and reading them into records."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._io import read_json
from ..errors import BMRSError
from ..pruning.criteria import criterion_label
from ..rundir import REPORTED_SWEEP, read_run

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


def _classify(folder: Path, collection: Collection) -> bool:
    """Add ``folder`` to ``collection`` if it is a run or sweep directory; say whether it was."""
    found = False
    if (folder / "sweep.json").is_file():
        collection.sweeps.append(SweepResult(folder, read_json(folder / "sweep.json", REPORTED_SWEEP)))
        found = True
    if (folder / "config.json").is_file():
        run = read_run(folder)
        if run is not None:
            collection.runs.append(RunResult(folder, *run))
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
