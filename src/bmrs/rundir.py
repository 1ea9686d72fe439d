"""What a run directory is: its files, its configuration, the checks of what it holds, and
the rules for writing into one.

A run directory (written by ``bmrs train``, :func:`bmrs.experiments.runs.train_run`) holds
``config.json`` (a :class:`RunConfig`), ``checkpoint.pt`` (resumable trainer state),
``model.pt`` (the final gated model's state dict), ``compact.pt`` (the compacted network)
and ``metrics.json`` (written last: its presence marks the run complete), beside the live
logs a run may write and, under ``bmrs train --nproc``, the training processes' output in
``logs/`` (:data:`PROCESS_LOGS`). Both the application that writes runs (:mod:`bmrs.experiments`) and the
reports that read them (:mod:`bmrs.reporting`) take these rules from here, so they cannot
drift apart; files written by earlier versions are read through :func:`read_run`, which
upgrades them.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._io import Mapping, Nullable, Number, OptionalKey, read_json, read_tensors, state_checksum
from .errors import BMRSError
from .gates import layer_names
from .models import build_model
from .pruning.criteria import CRITERIA, PAPER, RECOMMENDED

__all__ = [
    "RUN_FILES", "PROCESS_LOGS", "RECOMMENDED", "PAPER", "CONFIG", "METRICS", "REPORTED_METRICS", "REPORTED_SWEEP", "SWEEP", "RunConfig", "is_run_file", "read_config", "load_metrics", "verify_checksum",
    "load_state_file", "run_files", "check_same_options", "check_output_dir", "read_run",
]

#: The files ``bmrs train`` writes into a run directory (the live logs aside).
RUN_FILES = ("config.json", "checkpoint.pt", "model.pt", "compact.pt", "metrics.json")

#: The folder of a run directory where ``bmrs train --nproc`` keeps its processes' output, a
#: folder per start (``logs/<start time>_<suffix>/attempt_0/<rank>/stderr.log``, as torchrun
#: lays it out). It is no file of a run: :func:`check_output_dir` does not count it, so a run
#: that failed before its first epoch can be started again in the same directory, and
#: ``--force`` and ``--resume`` leave it (an earlier start's output stays in its own folder).
PROCESS_LOGS = "logs"

# The paper's optimiser settings (docs/math.md, "The paper's reported numbers"); other
# models get the LeNet5 ones.
_PAPER_SETTINGS = {"mlp": {"batch_size": 128, "lr": 1.5e-3}, "lenet5": {"batch_size": 32, "lr": 1.4e-3}}
_DEFAULT_SETTINGS = {"batch_size": 64, "lr": 1e-3}


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# Checks of the JSON values of RunConfig's field types.
_TYPES = {
    "str": lambda v: isinstance(v, str), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _real, "bool": lambda v: isinstance(v, bool), "dict": lambda v: isinstance(v, dict),
    "None": lambda v: v is None,
}

_FRACTION = Number(0.0, 1.0)
_COUNT = Number(0, integer=True)
_COUNTS = Mapping(_COUNT)
_ARCHITECTURE = {"name": str, "input_shape": [Number(1, integer=True)], "num_classes": _COUNT,
                 "options": dict}

#: The shape of a run's ``config.json`` (the types of its keys are :meth:`RunConfig.from_dict`'s).
CONFIG = {
    "epochs": OptionalKey(_COUNT), "finetune_epochs": OptionalKey(_COUNT), "prune_every": OptionalKey(Number(1, integer=True)),
    "lr": OptionalKey(Nullable(Number(0.0))), "batch_size": OptionalKey(Nullable(Number(1, integer=True))),
    "bits": OptionalKey(Number(0.0)), "target": OptionalKey(Nullable(Number(0.0, 1.0))),
    "image_size": OptionalKey(Nullable(Number(1, integer=True))), "model_options": OptionalKey(dict),
}

#: The shape of a run's ``metrics.json``: what bmrs reads from it, and its ranges.
METRICS = {
    "test_accuracy": _FRACTION, "test_loss": Number(0.0), "val_accuracy": _FRACTION, "structure_compression": _FRACTION,
    "parameter_compression": _FRACTION, "train_seconds": Number(0.0), "kept": _COUNTS, "structures": _COUNTS,
    "best_epoch": Nullable(_COUNT),
    "history": [{"epoch": _COUNT, "kept": OptionalKey(_COUNTS), "parameter_compression": OptionalKey(_FRACTION),
                 "structure_compression": OptionalKey(_FRACTION)}],
    "compaction": OptionalKey({"architecture": OptionalKey(Nullable(_ARCHITECTURE)), "file": OptionalKey(str),
                            **{key: OptionalKey(_COUNT) for key in ("parameters_before", "parameters_after",
                                                                   "flops_before", "flops_after")}}),
    "checksums": OptionalKey(Mapping(str)), "processes": OptionalKey(Number(1, integer=True)),
    "provenance": OptionalKey(dict),
    "evidence": OptionalKey({"criterion": str, "layers": Mapping(dict), **{key: _COUNT for key in (
        "ambiguous", "evidence_removes", "removed_against", "kept_beyond")}, "evidence_spent": Number(0.0),
        "most_overparameterised": str}),
    "calibration": OptionalKey(dict),
}


#: The shape of a sweep's ``sweep.json`` (written by :func:`bmrs.experiments.sweep.sweep_run`,
#: read by reports): a sweep directory is a result directory as a run's is.
SWEEP = {
    "config": {"run": str, "criteria": OptionalKey([str]), "levels": OptionalKey([_FRACTION]),
               "epoch": OptionalKey(Nullable(_COUNT)), "epochs": OptionalKey(Nullable(_COUNT)),
               "target_kind": OptionalKey(str), "split": OptionalKey(str)},
    "run_config": OptionalKey({**CONFIG, "dataset": OptionalKey(str), "model": OptionalKey(str)}),
    "model_accuracy": _FRACTION,
    "records": [{"criterion": str, "kind": str, "target": Nullable(_FRACTION), "structure_compression": _FRACTION,
                 "parameter_compression": _FRACTION, "accuracy": _FRACTION}],
}


def _reported(spec: dict, needed: tuple[str, ...]) -> dict:
    """``spec`` with every key but ``needed`` optional."""
    return {key: field if isinstance(field, OptionalKey) or key in needed else OptionalKey(field)
            for key, field in spec.items()}


#: What a report reads of ``metrics.json``: the two numbers of its table, and whichever of
#: the rest a run written by an earlier version holds, checked as :data:`METRICS` checks them.
REPORTED_METRICS = _reported(METRICS, ("test_accuracy", "parameter_compression"))
#: What a report reads of ``sweep.json``: its records, and whichever of the rest it holds.
REPORTED_SWEEP = {**_reported(SWEEP, ("records",)), "config": OptionalKey(_reported(SWEEP["config"], ()))}


def read_config(path: Path) -> dict:
    """A run's ``config.json``, checked (:data:`CONFIG`, then the types of :class:`RunConfig`)."""
    data = read_json(path, CONFIG)
    RunConfig.from_dict(data, path)
    return data


def verify_checksum(state: dict, path: Path, recorded: str | None) -> None:
    """``ValueError`` when ``state`` (read from ``path``) differs from what bmrs wrote."""
    if recorded is not None and state_checksum(state) != recorded:
        raise BMRSError(f"{path} is damaged: its contents do not match the checksum recorded in "
                         f"{path.parent / 'metrics.json'} when bmrs wrote it")


@dataclass
class RunConfig:
    """Everything that defines a training run (``bmrs train`` options).

    ``lr`` and ``batch_size`` default to the paper's for the model. ``image_size`` defaults
    to 32 for the 28x28 sets, as in the paper. Baselines without a natural threshold
    (``l2``, ``taylor``, ``random``) need ``target`` (a compression) or ``match`` (a run
    directory whose per-epoch parameter compression they follow). ``method`` and
    ``kl_reduction`` default to :data:`RECOMMENDED`, not to the paper's (:data:`PAPER`).
    ``start_from``: a trained network to start from instead of random weights (see
    :func:`bmrs.experiments.runs.trained_network`); its gates start near 1
    (:data:`bmrs.training.TRAINED_GATE_INIT`) and learn at :data:`bmrs.training.TRAINED_GATE_LR`.
    """

    dataset: str = "digits"
    model: str = "mlp"
    method: str = RECOMMENDED["method"]
    bits: float = 8.0
    threshold: float | None = None
    target: float | None = None
    match: str | None = None
    epochs: int = 50
    finetune_epochs: int = 10
    prune_every: int = 1
    recompute_masks: bool = False
    seed: int = 0
    lr: float | None = None
    batch_size: int | None = None
    kl_reduction: str = RECOMMENDED["kl_reduction"]
    image_size: int | None = None
    model_options: dict = field(default_factory=dict)
    data_dir: str | None = None
    start_from: str | None = None

    def check(self) -> "RunConfig":
        """``self``, once its options go together (a ``BMRSError`` saying which do not): a
        known method; for ``none``, no threshold, target or match; a threshold only for a
        ranking baseline; a target compression in [0, 1), not with ``match``; and a method
        without a natural threshold given a target or a run to match. Both ``bmrs train`` and
        :func:`~bmrs.experiments.runs.train_run` check a configuration here, before anything
        is written."""
        if self.method == "none":
            for flag, value in (("--threshold", self.threshold), ("--target", self.target), ("--match", self.match)):
                if value is not None:
                    raise BMRSError(f"{flag} applies to a pruning method, not --method none")
        if self.target is not None and not 0.0 <= self.target < 1.0:
            raise BMRSError(f"--target is a compression in [0, 1), got {self.target}")
        if self.target is not None and self.match is not None:
            raise BMRSError("give --target or --match, not both")
        if self.method == "none":
            return self
        if self.method not in CRITERIA:
            raise BMRSError(f"unknown method {self.method!r}; choose from none, {', '.join(CRITERIA)}")
        cls = CRITERIA[self.method]
        if self.threshold is not None and cls.evidence_based:
            raise BMRSError(f"{self.method} takes no threshold: it prunes where delta F >= its margin")
        if self.threshold is None and cls.threshold is None and self.target is None and self.match is None:
            raise BMRSError(f"method {self.method!r} has no threshold: give --target or --match")
        return self

    def resolved(self) -> "RunConfig":
        """A copy with the defaults that depend on the model and data set filled in."""
        settings = _PAPER_SETTINGS.get(self.model, _DEFAULT_SETTINGS)
        out = RunConfig(**asdict(self))
        out.lr = settings["lr"] if self.lr is None else self.lr
        out.batch_size = settings["batch_size"] if self.batch_size is None else self.batch_size
        if out.image_size is None and self.dataset in ("fashion-mnist", "mnist"):
            out.image_size = 32
        return out

    @classmethod
    def from_dict(cls, data: dict, source="the configuration") -> "RunConfig":
        """A configuration from its ``asdict`` form (``config.json``); ``ValueError`` naming
        ``source`` for unknown keys or values of the wrong type."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise BMRSError(f"{source}: unknown configuration keys: {', '.join(sorted(unknown))}")
        for key, value in data.items():
            allowed = [_TYPES[t.strip()] for t in str(known[key]).split("|")]
            if not any(ok(value) for ok in allowed):
                raise BMRSError(f"{source}: {key} must be {known[key].replace('|', 'or')}, got {value!r}")
        return cls(**data)


def load_metrics(run_dir: str | os.PathLike) -> dict:
    """The ``metrics.json`` of a complete run."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a complete run (no metrics.json)")
    return read_json(path, METRICS)


def load_state_file(path: Path):
    """A model or checkpoint file bmrs wrote, read with ``weights_only=True`` (no code runs);
    a one-line ``ValueError`` naming the file for anything else."""
    return read_tensors(path, "a model file written by bmrs")


def run_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(run directory, state file) of a run directory, its model.pt or its checkpoint.pt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        run_dir, state = path, path / "model.pt"
        if not state.is_file():
            hint = " (the run is unfinished: pass its checkpoint.pt to use the last epoch)" if (path / "checkpoint.pt").is_file() else ""
            raise BMRSError(f"{path} has no model.pt{hint}")
    else:
        run_dir, state = path.parent, path
    if not (run_dir / "config.json").is_file():
        raise BMRSError(f"{run_dir} has no config.json: expected a run directory written by 'bmrs train', "
                         "or its model.pt or checkpoint.pt")
    return run_dir, state


def is_run_file(path: Path, inputs=()) -> bool:
    """Whether ``path`` is (or, written, would be) one of the files of a run directory (a name
    of :data:`RUN_FILES` beside a ``config.json``, through any symbolic link) or the same file
    as one of ``inputs``: what no command writes, ``--force`` or not."""
    target = Path(path).resolve()
    if target.name in RUN_FILES and (target.parent / "config.json").is_file():
        return True
    return target.exists() and any(Path(p).exists() and os.path.samefile(target, p) for p in inputs)


def check_same_options(out: Path, config: RunConfig) -> None:
    """A ``BMRSError`` when ``out`` holds a run (its ``config.json``) of other options than
    ``config`` (both resolved), naming the options that differ."""
    if not (out / "config.json").is_file():
        return
    previous = read_config(out / "config.json")
    new = asdict(config.resolved())
    differing = sorted(k for k in set(previous) | set(new) if previous.get(k) != new.get(k))
    if differing:
        raise BMRSError(f"{out} holds a run with other options ({', '.join(differing)} differ); "
                        "repeat the original options with --resume, or choose another --out")


def check_output_dir(out: Path, config: RunConfig, *, resume: bool, force: bool, logs: list[Path]) -> str:
    """Whether a run of ``config`` may be written into ``out``, and in what state it is found:
    ``"new"``, ``"started"`` (a checkpoint to continue with ``resume``) or ``"complete"``.

    A complete run is never overwritten (with ``resume`` it is only reported); an unfinished
    one is continued only with ``resume``, and only with the same options; files of a run
    (``logs``: the live logs found in ``out``) with no run in progress are refused unless
    ``force``, whose caller deletes them first (and then finds ``out`` new).
    """
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    if force and resume:
        raise BMRSError("give --resume or --force, not both")
    if force:
        return "new"
    complete = (out / "metrics.json").is_file()
    started = (out / "checkpoint.pt").is_file()
    if complete and not resume:
        raise BMRSError(f"{out} already holds a complete run; pass --resume to report it, or choose another --out")
    if started and not complete and not resume:
        raise BMRSError(f"{out} holds an unfinished run (checkpoint.pt); pass --resume to continue it, or choose another --out")
    if not started:
        foreign = [name for name in RUN_FILES if (out / name).exists()] + [str(p.relative_to(out)) for p in logs]
        if foreign:
            raise BMRSError(f"{out} already holds {', '.join(foreign)} of no run in progress; choose another --out, "
                            "or pass --force to replace them")
    if (complete or started) and not (out / "config.json").is_file():
        raise BMRSError(f"{out} holds a run without its config.json; choose another --out")
    if complete or started:
        check_same_options(out, config)
    return "complete" if complete else "started" if started else "new"


def read_run(folder: Path) -> tuple[dict, dict] | None:
    """(config, metrics) of a complete run directory, both checked, with the per-layer counts
    of runs written by earlier versions upgraded (:func:`_named_layers`); None for a folder
    that holds no complete run."""
    if not ((folder / "config.json").is_file() and (folder / "metrics.json").is_file()):
        return None
    config = read_config(folder / "config.json")
    metrics = read_json(folder / "metrics.json", REPORTED_METRICS)
    return config, _named_layers(config, metrics)


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
