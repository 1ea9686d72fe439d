"""The ``bmrs`` command: train, sweep, report, compact, inspect and reproduce.

A thin layer over :mod:`bmrs.experiments`, :mod:`bmrs.compaction` and
:mod:`bmrs.reporting`. Every error a user can cause (a :class:`~bmrs.BMRSError`: a bad
option, an unknown name, a file that is not what bmrs expects; an ``OSError``: a file or
directory that is missing or cannot be read or written; a download whose checksum is wrong)
ends the command with one line ``bmrs: error: ...`` on stderr and exit status 2; training
that diverges ends with one line and exit status 3. Anything else is a defect and shows its
traceback.
Result files are written to temporary names and renamed, so an interrupted command leaves
no half-written file, and no command replaces a file it did not write (``--force``). See
``docs/cli.md`` and ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__, distributed
from ._io import read_json, write_json, write_text
from .compaction import ARCHITECTURES, compact, count_flops, count_parameters, load_compact
from .datasets import ChecksumError, DATASETS
from .deploy import BENCH_FORMAT, FORMATS, RUNTIMES, benchmark, export, full_network
from .errors import BMRSError
from .experiments import suites
from .experiments.analysis import diagnose_runs
from .experiments.live import LOG_FORMATS, log_files
from .experiments.runs import (
    PAPER, RECOMMENDED, RunConfig, build_criterion, check_metrics, compact_to_file, layer_widths, load_metrics,
    load_run, load_state_file, methods, run_files, train_run, verify_checksum,
)
from .experiments.sweep import DEFAULT_LEVELS, default_criteria, parse_criteria, sweep_run
from .gates import gates, layer_names
from .models import MODELS
from .pruning import make_criterion, parse_budget, prune, round_widths, set_masks
from .pruning.criteria import CRITERIA, load_plugins
from .reporting import collect, write_report
from .reporting.collect import natural_key
from .reporting.diagnostics import diagnostic_methods, select_runs
from .reporting.paper import SUITE_PAPERS
from .training import TRAINED_SCHEDULE, TrainingDiverged

__all__ = ["main", "build_parser", "parse_criteria"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


# Model options of ``bmrs train`` per bundled model: CLI destination -> builder keyword (a
# model not listed takes none from the command line).
_MODEL_OPTIONS = {
    "mlp": {"width": "width", "hidden_layers": "hidden_layers"},
    "lenet5": {},
    "resnet": {"depth": "depth", "width": "width"},
    "resnet56": {"width": "width"},
    "vit": {"depth": "depth", "patch_size": "patch_size", "width": "embed_dim"},
}
# The schedule of a run from random weights (with --from: TRAINED_SCHEDULE).
_SCRATCH_SCHEDULE = {"epochs": 50, "prune_every": 1, "finetune_epochs": 10}
_FLAG = {"width": "--width", "hidden_layers": "--hidden-layers", "depth": "--depth", "patch_size": "--patch-size"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows the defaults that are values."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`~bmrs.BMRSError` (one line, exit 2)."""

    def error(self, message):
        raise BMRSError(f"{self.prog}: {message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# Small helpers


def _say(*parts) -> None:
    print(*parts, flush=True)


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    # "[Errno 22] Invalid argument" and the like: say which file
    name = getattr(err, "filename", None) if isinstance(err, OSError) else None
    if name is not None and str(name) not in text:
        text = f"{name}: {text}"
    return " ".join(text.split())


def _set_threads(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise BMRSError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise BMRSError(f"{name} must be >= {minimum}, got {value}")


def _dataset_name(text: str) -> str:
    return text.lower().replace("_", "-")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _out_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


# The files 'bmrs train' writes into a run directory.
_RUN_FILES = ("config.json", "checkpoint.pt", "model.pt", "compact.pt", "metrics.json")


def _percent(x: float) -> str:
    return f"{100 * x:.2f} %"


# --------------------------------------------------------------------------------------------
# bmrs train


def _recommended_defaults(args) -> str | None:
    """Fill in ``--method`` and ``--kl-reduction`` where not given (:data:`RECOMMENDED`);
    the line that says so, or None when both were given."""
    filled = []
    for dest, flag in (("method", "--method"), ("kl_reduction", "--kl-reduction")):
        if getattr(args, dest) is None:
            setattr(args, dest, RECOMMENDED[dest])
            filled.append(f"{flag} {RECOMMENDED[dest]}")
    if not filled:
        return None
    paper = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER.items())
    return f"recommended defaults: {', '.join(filled)} (docs/pruning.md; the paper's: {paper})"


def _config_from_args(args) -> RunConfig:
    """The run configuration of ``bmrs train``'s options, checked before anything is written."""
    schedule = TRAINED_SCHEDULE if args.start_from is not None else _SCRATCH_SCHEDULE
    for dest, value in schedule.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.method == "none":
        for flag, value in (("--bits", args.bits), ("--threshold", args.threshold), ("--target", args.target), ("--match", args.match)):
            if value is not None:
                raise BMRSError(f"{flag} applies to a pruning method, not --method none")
    if args.bits is not None and "bits" not in CRITERIA[args.method].needs:
        raise BMRSError(f"--bits applies to --method {_with('bits')} only (got --method {args.method})")
    if args.target is not None and not 0.0 <= args.target < 1.0:
        raise BMRSError(f"--target is a compression in [0, 1), got {args.target}")
    if args.target is not None and args.match is not None:
        raise BMRSError("give --target or --match, not both")
    _positive("--epochs", args.epochs)
    _positive("--finetune-epochs", args.finetune_epochs, 0)
    _positive("--prune-every", args.prune_every)
    _positive("--seed", args.seed, 0)
    _positive("--batch-size", args.batch_size)
    _positive("--image-size", args.image_size)
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise BMRSError(f"--lr must be a positive number, got {args.lr}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise BMRSError(f"--threshold must be a finite number, got {args.threshold}")
    options = {}
    allowed = _MODEL_OPTIONS.get(args.model, {})
    for dest, flag in _FLAG.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest not in allowed:
            takes = ", ".join(_FLAG[d] for d in allowed) or "no model options"
            raise BMRSError(f"{flag} does not apply to --model {args.model} (it takes {takes})")
        _positive(flag, value)
        options[allowed[dest]] = value
    match = None
    if args.match is not None:
        match = str(args.match)
        if not (Path(match) / "metrics.json").is_file():
            raise BMRSError(f"--match {match}: not a complete run directory (no metrics.json)")
    config = RunConfig(
        dataset=args.dataset, model=args.model, method=args.method,
        bits=8.0 if args.bits is None else float(args.bits), threshold=args.threshold, target=args.target,
        match=match, epochs=args.epochs, finetune_epochs=args.finetune_epochs, prune_every=args.prune_every,
        recompute_masks=args.recompute_masks, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
        kl_reduction=args.kl_reduction, image_size=args.image_size, model_options=options,
        data_dir=None if args.data_dir is None else str(args.data_dir),
        start_from=None if args.start_from is None else str(args.start_from),
    )
    if config.method != "none":
        build_criterion(config.resolved(), None)  # threshold / target rules, before any file is written
    return config


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _print_run_summary(out: Path, config: dict, metrics: dict) -> None:
    takes_bits = config["method"] in CRITERIA and "bits" in CRITERIA[config["method"]].needs
    label = config["method"] + (f" (bits {config['bits']:g})" if takes_bits else "")
    _say(f"run {out}: {config['model']} on {config['dataset']}, method {label}, seed {config['seed']}")
    _say(f"  test accuracy      {_percent(metrics['test_accuracy'])}   (validation {_percent(metrics['val_accuracy'])}, "
         f"best epoch {metrics['best_epoch']})")
    _say(f"  compression        {_percent(metrics['parameter_compression'])} of parameters, "
         f"{_percent(metrics['structure_compression'])} of structures")
    kept = ", ".join(
        f"{name}: {metrics['kept'][name]}/{metrics['structures'].get(name, '?')}"
        for name in sorted(metrics["kept"], key=natural_key)
    )
    _say(f"  kept per layer     {kept}")
    info = metrics.get("compaction") or {}
    if "parameters_after" in info:
        _say(f"  compacted          {info['parameters_before']:,} -> {info['parameters_after']:,} parameters, "
             f"{info['flops_before']:,} -> {info['flops_after']:,} FLOPs per example ({out / info['file']})")
    elif "error" in info:
        _say(f"  compacted          not possible: {info['error']}")
    processes = metrics.get("processes", 1)
    _say(f"  training time      {metrics['train_seconds']:.1f} s" + (f" ({processes} processes)" if processes > 1 else ""))
    _say(f"  results            {out / 'metrics.json'}")


def _under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (its variables are set)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch(nproc: int, argv: list[str]) -> None:
    """Run ``python -m bmrs ARGV`` in ``nproc`` local processes through torchrun (a free port)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    launch = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "bmrs"])
    launch.training_script_args = list(argv)  # not parsed by torchrun: '--nproc' would be ambiguous there
    try:
        run(launch)
    except ChildFailedError as err:
        codes = sorted({f.exitcode for f in err.failures.values()})
        raise BMRSError(f"{len(err.failures)} of {nproc} training processes failed "
                       f"(exit status {', '.join(map(str, codes))}; their messages are above)") from None


def cmd_train(args) -> int:
    _set_threads(args)
    _positive("--nproc", args.nproc)
    launched = _under_torchrun()
    if launched and args.nproc not in (1, int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))):
        raise BMRSError("--nproc starts the processes itself: leave it out when torchrun starts them")
    # under torchrun: every rank checks OUT as it is, and none writes before all have checked
    device = distributed.init_from_environment()
    main = distributed.is_main()
    defaults = _recommended_defaults(args)
    config = _config_from_args(args)
    if defaults is not None and main:
        _say(defaults)
    out = Path(args.out)
    complete = (out / "metrics.json").is_file()
    started = (out / "checkpoint.pt").is_file()
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    if args.force and args.resume:
        raise BMRSError("give --resume or --force, not both")
    if args.force:
        # start afresh: no file of the earlier run is left to be mistaken for the new one's
        for path in [out / name for name in _RUN_FILES] + log_files(out) if main else ():
            path.unlink(missing_ok=True)
        complete = started = False
    if complete and not args.resume:
        raise BMRSError(f"{out} already holds a complete run; pass --resume to report it, or choose another --out")
    if started and not complete and not args.resume:
        raise BMRSError(f"{out} holds an unfinished run (checkpoint.pt); pass --resume to continue it, or choose another --out")
    foreign = [name for name in _RUN_FILES if (out / name).exists()] + [str(p.relative_to(out)) for p in log_files(out)]
    foreign = foreign if not started else []
    if foreign and not args.force:
        raise BMRSError(f"{out} already holds {', '.join(foreign)} of no run in progress; choose another --out, "
                       "or pass --force to replace them")
    if complete or started:
        previous = read_json(out / "config.json") if (out / "config.json").is_file() else {}
        differing = _differences(previous, asdict(config.resolved()))
        if differing:
            raise BMRSError(f"{out} holds a run with other options ({', '.join(differing)} differ); "
                           "repeat the original options with --resume, or choose another --out")
    if complete:
        _say(f"{out} is complete; nothing to train.")
        _print_run_summary(out, read_json(out / "config.json"), load_metrics(out))
        return 0
    if args.nproc > 1 and not launched:
        _launch(args.nproc, args.argv)
        return 0
    created = not out.exists()
    had_config = (out / "config.json").exists()
    distributed.barrier()
    try:
        metrics = train_run(config, out, progress=not args.no_progress, resume=started, device=device, log=args.log)
    except TrainingDiverged as err:
        checkpoint = out / "checkpoint.pt"
        kept = (f"{checkpoint} keeps the last good epoch" if checkpoint.is_file() else "no epoch completed")
        raise TrainingDiverged(f"{err}; {kept}, no model written (a smaller --lr may help)") from None
    except BaseException:
        # A run that failed before its first epoch (missing data, a bad model option)
        # leaves nothing behind that would look like a run.
        if main and not (out / "checkpoint.pt").exists():
            if not had_config:
                (out / "config.json").unlink(missing_ok=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    if main:
        _print_run_summary(out, asdict(config.resolved()), metrics)
    return 0


# --------------------------------------------------------------------------------------------
# Loading a run's model


def _load_run_model(path: Path, data_dir=None, *, need_data: bool = False):
    """(config, model, architecture, example input, data or None) of a run (see load_run)."""
    loaded = load_run(path, data_dir, need_data=need_data)
    return loaded.config, loaded.model, loaded.architecture, loaded.example, loaded.data


# --------------------------------------------------------------------------------------------
# bmrs sweep


def _swept_epoch(config: dict) -> str:
    """Which epoch a sweep pruned, in words."""
    epoch, epochs = config.get("epoch"), config.get("epochs")
    last = Path(config["run"]).name == "checkpoint.pt"
    which = "the last epoch" if last else "the best validation epoch"
    other = "--epoch best: the best validation epoch" if last else "--epoch last: the last epoch"
    if epoch is None:
        return f"{which} ({other})"
    return f"epoch {epoch}{f' of {epochs}' if epochs else ''}, {which} ({other})"


def cmd_sweep(args) -> int:
    _set_threads(args)
    _positive("--finetune-epochs", args.finetune_epochs, 0)
    levels = list(DEFAULT_LEVELS) if args.levels is None else args.levels
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if bad:
        raise BMRSError(f"--levels must lie in [0, 1], got {', '.join(f'{v:g}' for v in bad)}")
    out = Path(args.out)
    existing = [name for name in ("sweep.json", "sweep.csv") if (out / name).exists()]
    if existing and not args.force:
        raise BMRSError(f"{out} already holds {' and '.join(existing)}; pass --force to replace them, or choose another --out")
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    if args.epoch is not None and not Path(args.run).is_dir():
        raise BMRSError("--epoch applies to a run directory (a state file is the epoch it holds)")
    result = sweep_run(
        args.run, out, criteria=args.criteria, levels=levels,
        finetune_epochs=args.finetune_epochs, split=args.split, target_kind=args.target_kind,
        data_dir=args.data_dir, epoch=args.epoch or "last", progress=not args.no_progress,
    )
    config, records = result["run_config"], result["records"]
    _say(f"sweep of {args.run} ({config['model']} on {config['dataset']}): {len(records)} points, "
         f"{len(result['config']['criteria'])} criteria x {len(result['config']['levels'])} levels")
    _say(f"swept model: {_swept_epoch(result['config'])}, {args.split} accuracy {_percent(result['model_accuracy'])}")
    stops = [r for r in records if r["kind"] == "stop"]
    if stops:
        _say("stopping points (BMRS: delta F >= the criterion's margin; baselines: their threshold):")
        for r in stops:
            _say(f"  {r['criterion']:<12} {_percent(r['parameter_compression']):>9} of parameters  "
                 f"accuracy {_percent(r['accuracy'])}")
    _say(f"wrote {out / 'sweep.json'} and {out / 'sweep.csv'}")
    return 0


# --------------------------------------------------------------------------------------------
# bmrs report and bmrs reproduce


# The files of the last report written into a report directory, one relative path per line:
# what a new report there may replace without --force.
_REPORT_MANIFEST = ".bmrs-report"


def _publish(staged: Path, out: Path, force: bool) -> None:
    """Move the files of ``staged`` into ``out``, refusing (before moving anything) to replace
    a file that no earlier report wrote there, unless ``force``."""
    manifest = out / _REPORT_MANIFEST
    ours = set(manifest.read_text().split("\n")) - {""} if manifest.is_file() else set()
    new = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    foreign = [name for name in new if (out / name).exists() and name not in ours]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BMRSError(f"{out} holds {shown}, which no bmrs report wrote; pass --force to replace them, "
                        "or choose another --out")
    for name in new:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, out / name)
    write_text(manifest, "\n".join(sorted(ours | set(new))) + "\n")


def _report(paths, out: Path, *, paper: str | None = None, analysis: bool = False, force: bool = False) -> None:
    """Write the report of ``paths`` into ``out``; with ``analysis``, also the knees of the
    sweeps and the gate diagnostics of the lowest-seed run of each diagnosed method. The
    report is written aside first and then moved in, so that it never replaces a file that
    no earlier report wrote there (unless ``force``)."""
    collection = collect(paths)
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp)
        report = write_report(collection, staged, paper=paper, analysis=analysis)
        if analysis:
            _, files, notes = diagnose_runs(select_runs(collection.runs), staged)
            report.files.update(files)
            report.notes.extend(notes)
        _publish(staged, out, force)
    report.files = {key: out / Path(path).relative_to(staged) for key, path in report.files.items()}
    for note in report.notes:
        print(f"bmrs: note: {note}", file=sys.stderr)
    _say(report.markdown.split("\n## ")[0].rstrip())
    _say("")
    _say(f"report of {report.runs} run(s) and {report.sweeps} sweep(s):")
    _say(f"  table       {report.files['markdown']}")
    _say(f"  json        {report.files['json']}")
    _say(f"  plot        {report.files['accuracy_plot']}")
    if "widths_plot" in report.files:
        _say(f"  widths      {report.files['widths_plot']}")
    for key, label in (("comparison", "paper"), ("paper_json", "paper json"), ("knees", "knees"),
                       ("diagnostics_md", "diagnostics")):
        if key in report.files:
            _say(f"  {label:<11} {report.files[key]}")
    figures = sum(1 for name in report.files if name.startswith(("posteriors_", "delta-f_")))
    if figures:
        _say(f"  {figures} diagnostic figure(s) in {out}")


def cmd_report(args) -> int:
    _report(args.paths, Path(args.out), paper=args.paper, analysis=args.analysis, force=args.force)
    return 0


def cmd_reproduce(args) -> int:
    _positive("--seeds", args.seeds)
    _positive("--jobs", args.jobs)
    out = Path(args.out)
    run_dirs = suites.run_suite(args.suite, out, seeds=args.seeds, jobs=args.jobs, progress=not args.no_progress)
    _say(f"suite {args.suite}: {len(run_dirs)} runs under {out}")
    # the suite's own report folder: bmrs made the suite directory, so its report is rewritten
    _report([out], out / "report", paper=SUITE_PAPERS.get(args.suite), analysis=True, force=True)
    return 0


# --------------------------------------------------------------------------------------------
# bmrs compact and bmrs info


def _width_lines(before: dict, after: dict) -> list[str]:
    return [f"  {name:<24} {before.get(name, '?'):>6} -> {after.get(name, '?')}" for name in sorted(set(before) | set(after), key=natural_key)]


def _order_criterion(config, args, flag: str):
    """The criterion (and its label) that orders the structures for --budget and --round-to."""
    text = args.criterion or (config.method if config.method != "none" else None)
    if text is None:
        raise BMRSError(f"this run has no pruning method (--method none): give --criterion with {flag}")
    if text == "bmrs-u" and args.criterion is None:
        text = f"bmrs-u{config.bits:g}"
    (_, name, options), = parse_criteria(text)
    return text, make_criterion(name, **options)


def _apply_budget(model, config, args, example) -> None:
    """Prune ``model`` further until ``--budget`` holds; print what the evidence and the budget prune."""
    budget = parse_budget(args.budget)
    text, criterion = _order_criterion(config, args, "--budget")
    result = prune(model, criterion, budget=budget, example_input=example[:1], keep_pruned=True)
    _say(f"budget with {text} (structures the run pruned stay pruned):")
    for line in result.summary().splitlines():
        _say(f"  {line}")


def _apply_rounding(model, config, args) -> None:
    """Round every kept width to a multiple of ``--round-to``; print what it cost in evidence."""
    text, criterion = _order_criterion(config, args, "--round-to")
    result = round_widths(model, criterion, args.round_to)
    set_masks(model, result.masks)
    _say(f"widths rounded to multiples of {args.round_to} in the order of {text}:")
    for line in result.summary().splitlines():
        _say(f"  {line}")


def cmd_compact(args) -> int:
    _set_threads(args)
    out = Path(args.out)
    if out.is_dir():
        raise BMRSError(f"--out {out} is a directory; give a file name such as {out / 'compact.pt'}")
    if args.criterion is not None and args.budget is None and args.round_to is None:
        raise BMRSError("--criterion applies with --budget or --round-to only")
    _positive("--round-to", args.round_to)
    run_dir, state_file = run_files(Path(args.checkpoint))
    inputs = [state_file, *(run_dir / name for name in _RUN_FILES if name != "compact.pt")]
    if out.exists() and any(p.exists() and os.path.samefile(out, p) for p in inputs):
        raise BMRSError(f"--out {out} is a file of the run being compacted; choose another --out")
    if out.exists() and not args.force:
        raise BMRSError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    config, model, architecture, example, _ = _load_run_model(Path(args.checkpoint), args.data_dir)
    if args.budget is not None:
        _apply_budget(model, config, args, example)
    if args.round_to is not None:
        _apply_rounding(model, config, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = compact_to_file(model, example, out, architecture)
    _say(f"compacted {args.checkpoint} ({architecture['name']}) into {out}")
    _say("layer widths (before -> after):")
    for line in _width_lines(info["widths_before"], info["widths_after"]):
        _say(line)
    _say(f"parameters  {info['parameters_before']:,} -> {info['parameters_after']:,}")
    _say(f"FLOPs       {info['flops_before']:,} -> {info['flops_after']:,} (input {tuple(info['input_shape'])})")
    return 0


def _describe_compact(path: Path) -> dict:

    data = load_state_file(path)
    if not (isinstance(data, dict) and "metadata" in data and "state_dict" in data):
        raise BMRSError(f"{path} is not a compacted model (written by 'bmrs compact' or save_compact)")
    metrics_file = path.parent / "metrics.json"
    if path.name == "compact.pt" and (path.parent / "config.json").is_file() and metrics_file.is_file():
        recorded = check_metrics(read_json(metrics_file), metrics_file).get("checksums", {}).get("compact.pt")
        verify_checksum(data["state_dict"], path, recorded)
    try:
        metadata = json.loads(data["metadata"])
        layers = metadata.get("layers", {})
    except (TypeError, ValueError, AttributeError):
        raise BMRSError(f"{path}: its metadata is not the JSON object save_compact writes") from None
    widths = {
        name: layer.get("out_features", layer.get("out_channels", layer.get("num_features")))
        for name, layer in layers.items()
        if layer.get("type") in ("Linear", "Conv1d", "Conv2d", "Conv3d")
    }
    architecture = metadata.get("architecture")
    info = {"file": str(path), "kind": "compacted", "architecture": architecture, "widths": widths, "layers": layers}
    if architecture is not None:
        net = load_compact(path)
        shape = [1, *architecture["input_shape"]]
        info.update(parameters=count_parameters(net), flops=count_flops(net, torch.zeros(shape)), input_shape=shape)
    else:
        info.update(parameters=sum(t.numel() for t in data["state_dict"].values()), flops=None, input_shape=None)
    return info


def _describe_gated(path: Path, data_dir) -> dict:
    _, model, architecture, _, _ = _load_run_model(path, data_dir)
    shape = [1, *architecture["input_shape"]]
    layer = layer_names(model)
    return {
        "file": str(path), "kind": "gated (not compacted)", "architecture": architecture,
        "widths": layer_widths(model),
        "kept": {layer[name]: f"{int(g.mask.sum())}/{g.num_structures}" for name, g in gates(model).items()},
        "parameters": count_parameters(model), "flops": count_flops(model, torch.zeros(shape)), "input_shape": shape,
    }


def cmd_info(args) -> int:
    _set_threads(args)
    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        info = _describe_compact(path / "compact.pt") if (path / "compact.pt").is_file() else _describe_gated(path, args.data_dir)
    elif path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file():
        info = _describe_gated(path, args.data_dir)
    else:
        info = _describe_compact(path)
    bench = _read_bench(_bench_file(path))
    if bench is not None:
        info["bench"] = bench
    if args.json:
        _say(json.dumps(info, indent=2, sort_keys=True))
        return 0
    arch = info["architecture"]
    _say(f"{info['file']}: {info['kind']} model")
    if arch is not None:
        _say(f"architecture  {arch['name']}, {arch['num_classes']} classes, options {arch['options'] or '{}'}")
    _say("layer widths:")
    for name in sorted(info["widths"], key=natural_key):
        _say(f"  {name:<24} {info['widths'][name]}")
    if info.get("kept"):
        _say("kept structures per layer: " + ", ".join(f"{n}: {k}" for n, k in sorted(info["kept"].items(), key=lambda kv: natural_key(kv[0]))))
    _say(f"parameters    {info['parameters']:,}")
    if info["flops"] is not None:
        _say(f"FLOPs         {info['flops']:,} (one forward pass, input shape {tuple(info['input_shape'])})")
    else:
        _say("FLOPs         unknown (saved without an architecture description)")
    if bench is not None:
        _say(f"last measured latency ('bmrs bench', {_bench_file(path)}):")
        _print_bench(bench, indent="  ")
    return 0


# --------------------------------------------------------------------------------------------
# bmrs export and bmrs bench


def _networks(path: Path, data_dir, *, need_full: bool):
    """(compacted network, full network or None, architecture, example batch, source) of a
    run (directory, model.pt, checkpoint.pt) or a compacted model file.

    A run's full network is its gated model with E[theta] folded in and nothing removed. A
    compacted file holds no full network: the architecture is built at full width with
    random weights (the same shapes, so the same work), and ``source`` says so.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() or (path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file()):
        _, model, architecture, example, _ = _load_run_model(path, data_dir)
        small = compact(model, example)
        full = full_network(model, example) if need_full else None
        return small, full, architecture, example[:4], "the run's gated model, E[theta] folded in, nothing removed"
    info = _describe_compact(path)
    architecture = info["architecture"]
    if architecture is None:
        raise BMRSError(f"{path} was saved without an architecture description; it cannot be rebuilt here")
    small = load_compact(path)
    example = torch.randn(4, *architecture["input_shape"], generator=torch.Generator().manual_seed(0))
    full = None
    if need_full:
        torch.manual_seed(0)
        full = ARCHITECTURES[architecture["name"]](architecture["input_shape"], architecture["num_classes"],
                                                  **architecture["options"]).eval()
    return small, full, architecture, example, f"{architecture['name']} at full width with random weights"


def _bench_file(path: Path) -> Path:
    """Where the figures of 'bmrs bench PATH' are recorded: RUN/bench.json, or FILE.bench.json."""
    if path.is_dir():
        return path / "bench.json"
    if path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file():
        return path.parent / "bench.json"
    return path.with_name(path.stem + ".bench.json")


def _read_bench(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = read_json(file)
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) and data.get("format") == BENCH_FORMAT else None


def cmd_export(args) -> int:
    _set_threads(args)
    out = Path(args.out)
    if out.is_dir():
        raise BMRSError(f"--out {out} is a directory; give a file name")
    source = Path(args.source)
    run_dir = source if source.is_dir() else source.parent if source.name in ("model.pt", "checkpoint.pt") else None
    own = [source, *((run_dir / name for name in _RUN_FILES) if run_dir is not None else ())]
    if out.exists() and any(p.is_file() and os.path.samefile(out, p) for p in own):
        raise BMRSError(f"--out {out} is a file of the run or model being exported; choose another --out")
    if out.exists() and not args.force:
        raise BMRSError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    small, _, architecture, example, _ = _networks(Path(args.source), args.data_dir, need_full=False)
    result = export(small, example, out, args.format)
    _say(f"exported the compacted {architecture['name']} of {args.source} to {out} ({args.format}, dynamic batch axis)")
    _say(f"checked: {result['checked_with']} gives PyTorch's outputs at batch sizes "
         f"{' and '.join(map(str, result['batches']))} (largest relative error {result['max_relative_error']:.2g}, "
         f"tolerance 1e-05)")
    return 0


def _print_bench(data: dict, indent: str = "") -> None:
    nets = data["networks"]
    _say(f"{indent}full     {nets['full']['parameters']:,} parameters, {nets['full']['flops']:,} FLOPs per example")
    _say(f"{indent}compact  {nets['compact']['parameters']:,} parameters, {nets['compact']['flops']:,} FLOPs per example "
         f"(FLOPs {data['flop_ratio']:.2f}x fewer, parameters {data['parameter_ratio']:.2f}x)")
    settings = data["settings"]
    _say(f"{indent}measured {data['measured_at']}, {settings['threads']} thread(s), fastest of {settings['repeats']} "
         f"interleaved repetitions, load average {data['machine']['load_average_before']} before, "
         f"{data['machine']['load_average_after']} after")
    _say(f"{indent}| runtime | batch | full ms | compact ms | full/compact | FLOP ratio | settings (full; compact) |")
    _say(f"{indent}|---|---|---|---|---|---|---|")
    for r in data["results"]:
        _say(f"{indent}| {r['runtime']} | {r['batch']} | {r['full_ms']:.4f} | {r['compact_ms']:.4f} | "
             f"{r['ratio']:.2f} | {data['flop_ratio']:.2f} | {r['full_setting']}; {r['compact_setting']} |")
    for g in data["deployment_gain"]:
        _say(f"{indent}deployment gain at batch {g['batch']}: eager full {g['eager_full_ms']:.4f} ms / compact in "
             f"{g['runtime']} {g['compact_ms']:.4f} ms = {g['gain']:.2f}x")


def cmd_bench(args) -> int:
    _positive("--threads", args.threads)
    _positive("--repeats", args.repeats)
    _positive("--warmup", args.warmup, 0)
    for b in args.batch:
        _positive("--batch", b)
    path = Path(args.source)
    record = _bench_file(path)
    if record.exists() and _read_bench(record) is None:
        raise BMRSError(f"{record} exists and was not written by 'bmrs bench'; it is left alone: move it away first")
    small, full, architecture, _, source = _networks(path, args.data_dir, need_full=True)
    data = benchmark(full, small, architecture["input_shape"], batches=args.batch, runtimes=args.runtime,
                     threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    data["source"] = str(path)
    data["full_network"] = source
    _say(f"bmrs bench {path}: {architecture['name']}; full network: {source}")
    _print_bench(data)
    write_json(data, record)
    _say(f"wrote {record}")
    return 0


# --------------------------------------------------------------------------------------------
# The parser


def _suites_epilog() -> str:
    lines = ["suites:"]
    for name, (description, seeds, _) in suites.SUITES.items():
        lines.append(f"  {name:<14} {description} (default {seeds} seeds)")
    return "\n".join(lines)


def _with(need: str) -> str:
    """The criteria that take ``need`` from a run, e.g. ``bmrs-u`` for ``bits``."""
    return ", ".join(name for name, c in CRITERIA.items() if need in c.needs)


def _methods_help() -> str:
    evidence = "; ".join(f"{name}: {c.summary}" for name, c in CRITERIA.items() if c.evidence_based)
    baselines = "; ".join(f"{name}: {c.summary}" for name, c in CRITERIA.items() if not c.evidence_based)
    return (f"pruning criterion: none (train with gates, no pruning); the evidence criteria prune where delta F "
            f"reaches their margin ({evidence}); the baselines ({baselines}) prune at their threshold, or need "
            "--target or --match when they have none")


def _wrap(text: str, width: int, indent: int) -> str:
    """``text`` broken at spaces into lines of at most ``width``, continued at ``indent``."""
    return ("\n" + " " * indent).join(textwrap.wrap(text, width))


def _add_train(commands, threads: argparse.ArgumentParser, progress: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs train``."""
    p = commands.add_parser(
        "train", parents=[threads, progress], formatter_class=_Formatter,
        help="train a gated model, pruning continuously (or not: --method none)",
        description="Train a model with noise gates (the ELBO) and, unless --method none, prune it\n"
        "every --prune-every epochs of the training phase; then fine-tune --finetune-epochs with\n"
        "the masks fixed. Writes OUT/config.json, OUT/checkpoint.pt (after every epoch),\n"
        "OUT/model.pt (gated state dict of the best validation epoch), OUT/compact.pt (the compacted network) and\n"
        "OUT/metrics.json (written last: accuracy, compression, kept structures, sizes).\n\n"
        "An OUT holding a complete run is never overwritten: with --resume it is only reported.\n"
        "An OUT holding any of these files (or the --log files of another run) without a run to resume\n"
        "is refused unless --force, which deletes them first.\n"
        "An interrupted run continues from its checkpoint with --resume (same options) and ends\n"
        "with the same results as an uninterrupted one.\n\n"
        "--nproc N trains in N processes on this machine (DistributedDataParallel through\n"
        "torchrun: gloo on the CPU, nccl on GPUs); --batch-size is per process, so a step sees\n"
        "N x batch-size examples. 'torchrun --nproc-per-node N -m bmrs train ...' does the same\n"
        "(also on several machines). One run directory, written by rank 0; see docs/distributed.md.\n\n"
        f"Without --method and --kl-reduction it uses the recommended {RECOMMENDED['method']} and\n"
        f"{RECOMMENDED['kl_reduction']} (see docs/pruning.md) and says so; the paper's are --method "
        f"{PAPER['method']}\nand --kl-reduction {PAPER['kl_reduction']}.",
        epilog="example: bmrs train --dataset digits --model mlp --out runs/digits\n"
        "the paper's settings: bmrs train --dataset fashion-mnist --model lenet5 --method bmrs-n-code \\\n"
        "           --kl-reduction mean --recompute-masks --out runs/lenet5-paper",
    )
    p.add_argument("--dataset", type=_dataset_name, choices=DATASETS, required=True, help="data set")
    p.add_argument("--model", choices=tuple(MODELS), required=True, help="bundled model")
    p.add_argument("--method", choices=methods(), default=None,
                   help=f"default {RECOMMENDED['method']} (recommended; the paper's BMRS_N: {PAPER['method']}). "
                   + _methods_help())
    p.add_argument("--bits", type=float, default=None, help=f"precision of {_with('bits')} in bits (default 8; fewer prune more)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"threshold of a baseline ({', '.join(n for n, c in CRITERIA.items() if not c.evidence_based)})")
    p.add_argument("--target", type=float, default=None, help="target parameter compression in [0, 1) instead of a threshold")
    p.add_argument("--match", metavar="RUN_DIR", default=None,
                   help="follow another run's per-epoch parameter compression (e.g. l2 matched to a BMRS run)")
    p.add_argument("--from", dest="start_from", metavar="CHECKPOINT", default=None,
                   help="start from a trained network: a bmrs run directory, a compacted file, or a plain state dict "
                   "of the bundled model (read weights-only); changes the schedule's defaults (docs/pruning.md)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (pruning happens in these; default "
                   f"{_SCRATCH_SCHEDULE['epochs']}, with --from {TRAINED_SCHEDULE['epochs']})")
    p.add_argument("--finetune-epochs", type=int, default=None, help="epochs of fine-tuning with the masks fixed "
                   f"(default {_SCRATCH_SCHEDULE['finetune_epochs']}, with --from {TRAINED_SCHEDULE['finetune_epochs']})")
    p.add_argument("--prune-every", type=int, default=None, help="prune after every K-th training epoch "
                   f"(default {_SCRATCH_SCHEDULE['prune_every']}, with --from {TRAINED_SCHEDULE['prune_every']})")
    p.add_argument("--recompute-masks", action="store_true",
                   help="recompute masks from scratch at each pruning step (pruned structures may return)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation, order and noise")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the paper's for the model)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per process (default: the paper's for the model)")
    p.add_argument("--kl-reduction", choices=("mean", "structures", "sum", "elbo"), default=None,
                   help=f"KL term (default {RECOMMENDED['kl_reduction']}, recommended): mean per layer then over layers (the paper's), structures (sum / number of "
                        "structures: equal weight per structure), sum, or elbo (sum / training set size)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to SxS (default 32 for (fashion-)mnist)")
    g = p.add_argument_group("model options (passed to the model builder)")
    g.add_argument("--width", type=int, default=None, help="mlp: hidden units; resnet: base channels; vit: embedding size")
    g.add_argument("--hidden-layers", type=int, default=None, help="mlp: hidden blocks after the input layer")
    g.add_argument("--depth", type=int, default=None, help="resnet: layers (6n+2); vit: transformer blocks")
    g.add_argument("--patch-size", type=int, default=None, help="vit: patch size")
    p.add_argument("--data-dir", default=None, help="directory searched first for the data files")
    p.add_argument("--log", choices=LOG_FORMATS, default=None,
                   help="live metrics after every epoch: csv (OUT/log.csv: losses, KL, accuracies, compression, "
                   "kept structures per layer; OUT/delta_f.csv: delta F of every structure) or tensorboard "
                   "(OUT/tensorboard/: the same, delta F as histograms; needs pip install 'bmrs[tensorboard]')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT, or report a complete one")
    p.add_argument("--force", action="store_true",
                   help="start a new run in OUT even if it holds another run's files (config.json, checkpoint.pt, "
                   "model.pt, compact.pt, metrics.json): they are deleted first")
    p.add_argument("--nproc", type=int, default=1,
                   help="training processes on this machine (data parallel; --batch-size is per process)")
    p.add_argument("--out", metavar="RUN_DIR", type=_out_path, required=True, help="run directory to write")
    p.set_defaults(func=cmd_train)


def _add_sweep(commands, threads: argparse.ArgumentParser, progress: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs sweep``."""
    p = commands.add_parser(
        "sweep", parents=[threads, progress], formatter_class=_Formatter,
        help="post-training pruning of a trained run at many compression levels",
        description="Prune a trained run's last epoch (typically a --method none run: gated, unpruned)\n"
        "with each criterion to each compression level, optionally fine-tune, and measure the\n"
        "accuracy. Criteria with a stopping rule (BMRS: delta F >= 0; snr, etheta: threshold)\n"
        "also get that point (kind 'stop'). Writes OUT/sweep.json (settings, the run's\n"
        "configuration, records) and OUT/sweep.csv (the records).",
        epilog="example: bmrs sweep --run runs/none --criteria bmrs-n-code,bmrs-u8,l2 --out runs/none-sweep",
    )
    p.add_argument("--run", metavar="RUN_DIR", required=True,
                   help="a run directory (see --epoch), or one of its state files: checkpoint.pt (the last "
                   "epoch) or model.pt (the best validation epoch)")
    p.add_argument("--epoch", choices=("last", "best"), default=None,
                   help="which model of a run directory to prune: last (default: the network training ended "
                   "with, its gates settled; its checkpoint.pt) or best (the best validation epoch, its "
                   "model.pt, often an early one whose gates have not settled)")
    p.add_argument("--criteria", default=",".join(default_criteria()),
                   help="comma-separated criteria: " + ", ".join(c.label_syntax or n for n, c in CRITERIA.items()))
    p.add_argument("--levels", type=_float_list, default=None,
                   help=f"comma-separated compression levels in [0, 1] (default: {','.join(f'{v:g}' for v in DEFAULT_LEVELS)})")
    p.add_argument("--target-kind", choices=("params", "structures"), default="params", help="what the levels count")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after each pruning (masks fixed)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split the accuracy is measured on")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing sweep.json and sweep.csv in OUT")
    p.add_argument("--out", metavar="DIR", type=_out_path, required=True, help="directory to write sweep.json and sweep.csv into")
    p.set_defaults(func=cmd_sweep)


def _add_report(commands) -> None:
    """The parser of ``bmrs report``."""
    p = commands.add_parser(
        "report", formatter_class=_Formatter,
        help="tables and plots from runs and sweeps",
        description="Collect complete runs (config.json + metrics.json) and sweeps (sweep.json) from the\n"
        "given directories, at any depth, and write into OUT:\n"
        "  results.md                   the table (rows: methods; per model and data set: parameter\n"
        "                               compression and test accuracy in %, mean ± std over seeds, n),\n"
        "                               kept structures per layer, compacted sizes, each run's training time\n"
        "                               and processor, sweep stop points\n"
        "  results.json                 {model: {method: {param_compression: [mean, std],\n"
        "                               accuracy: [mean, std], seeds: n}}} (keys 'dataset/model'\n"
        "                               when several data sets are reported)\n"
        "  accuracy_vs_compression.png  from the sweeps if any, else one point per run\n"
        "  widths.png                   kept structures per layer, mean over seeds, per method\n"
        "Runs are grouped by data set, model and method (bmrs-u as bmrs-u<bits>, e.g. bmrs-u8;\n"
        "a KL reduction other than the paper's mean appended, e.g. bmrs-n-code+kl-structures).",
        epilog="example: bmrs report runs/quick --out runs/quick/report",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="run, sweep or suite directories")
    p.add_argument("--out", metavar="DIR", type=_out_path, required=True,
                   help="report directory; files that no earlier bmrs report wrote there are never replaced")
    p.add_argument("--force", action="store_true", help="replace files in OUT that no earlier bmrs report wrote")
    p.add_argument("--analysis", action="store_true",
                   help="also the analyses 'bmrs reproduce' writes: knees.md/json (the sweeps' stopping points against "
                   "the knees of their curves) and the gate diagnostics of the lowest-seed run of each method")
    p.add_argument("--paper", metavar="DATASET", default=None,
                   help="also compare with the paper's published numbers for DATASET (fashion-mnist or mnist): "
                   "comparison.md, comparison.json and paper-fmnist.json (paper-mnist.json)")
    p.set_defaults(func=cmd_report)


def _add_compact(commands, threads: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs compact``."""
    p = commands.add_parser(
        "compact", parents=[threads], formatter_class=_Formatter,
        help="turn a run's pruned model into a smaller plain network",
        description="Rebuild a run's gated model, fold every gate's E[theta] * mask into the weights,\n"
        "delete the pruned structures and save the plain network (tensors + JSON metadata,\n"
        "loadable with bmrs.compaction.load_compact). Prints widths, parameters and FLOPs\n"
        "before and after. CHECKPOINT is a run directory, its model.pt or its checkpoint.pt\n"
        "(an unfinished run's last epoch); config.json must lie beside it.",
        epilog="example: bmrs compact runs/demo --out runs/demo-small.pt",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, model.pt or checkpoint.pt")
    p.add_argument("--budget", metavar="KIND=FRACTION", default=None,
                   help="prune further, in the order of the criterion's evidence, until at most FRACTION of the "
                   "full network's KIND remains (flops, params or latency; e.g. flops=0.2, or flops=0.2,params=0.3); "
                   "prints what delta F >= 0 prunes and what the budget needs")
    p.add_argument("--round-to", metavar="N", type=int, default=None,
                   help="then move every kept width to the nearest multiple of N (e.g. 8 or 16, the channel blocks of "
                   "CPU kernels; never to 0, at most the full width), in the order of the criterion; prints what "
                   "it cost in delta F")
    p.add_argument("--criterion", default=None,
                   help="criterion that orders the structures for --budget and --round-to (default: the run's method)")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.add_argument("--out", metavar="FILE", type=_out_path, required=True, help="file to write")
    p.add_argument("--force", action="store_true", help="replace an existing FILE (never one of the run's own files)")
    p.set_defaults(func=cmd_compact)


def _add_info(commands, threads: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs info``."""
    p = commands.add_parser(
        "info", parents=[threads], formatter_class=_Formatter,
        help="layer widths, parameters and FLOPs of a compacted model or a run",
        description="Describe a compacted model file, or a run directory (its compact.pt if there is\n"
        "one, else its gated model): layer widths, parameter count and FLOPs of one forward\n"
        "pass of one example, with the input shape used.",
        epilog="example: bmrs info runs/demo/compact.pt",
    )
    p.add_argument("file", metavar="FILE", help="compacted model file or run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=cmd_info)


def _add_export(commands, threads: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs export``."""
    p = commands.add_parser(
        "export", parents=[threads], formatter_class=_Formatter,
        help="export the compacted network to ONNX, TorchScript or torch.export",
        description="Export the compacted network of a run (compacted afresh from its gated model) or of a\n"
        "compacted model file, with a dynamic batch axis and BatchNorm folded into the convolutions:\n"
        "  onnx         ONNX (input 'input', output 'output'); needs the extra bmrs[onnx]\n"
        "  torchscript  torch.jit.trace, for torch.jit.load\n"
        "  exported     torch.export (a .pt2 archive), for torch.export.load\n"
        "The written file is loaded again (ONNX: run with onnxruntime) and its outputs are compared\n"
        "with PyTorch's at two batch sizes; they must agree to 1e-5 of the largest output, or\n"
        "nothing is written.",
        epilog="example: bmrs export runs/demo --format onnx --out runs/demo.onnx",
    )
    p.add_argument("source", metavar="RUN_OR_COMPACT", help="run directory, its model.pt / checkpoint.pt, or a compacted model file")
    p.add_argument("--format", choices=FORMATS, required=True, help="export format")
    p.add_argument("--out", metavar="FILE", required=True, help="file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (never the source or a file of its run)")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=cmd_export)


def _add_bench(commands) -> None:
    """The parser of ``bmrs bench``."""
    p = commands.add_parser(
        "bench", formatter_class=_Formatter,
        help="latency of the full and the compacted network, side by side, per runtime",
        description="Time the full network (a run's gated model with E[theta] folded in and nothing removed;\n"
        "for a compacted file, its architecture at full width with random weights) and the compacted\n"
        "one, in each runtime, at each batch size, interleaved (a new random order every repetition;\n"
        "the fastest repetition counts), with BatchNorm folded into the convolutions of both:\n"
        "  eager        PyTorch, no_grad\n"
        "  compile      torch.compile (needs a C++ compiler)\n"
        "  onnxruntime  the ONNX export, all graph optimisations (needs the extra bmrs[onnx])\n"
        "Prints parameters, FLOPs and the table of latencies and full/compact ratios, and the\n"
        "deployment gain (eager full vs compact in its fastest runtime). The figures are written\n"
        "to RUN/bench.json (FILE.bench.json beside a file); 'bmrs info' shows them.",
        epilog="example: bmrs bench runs/demo --batch 1 256 --runtime eager compile onnxruntime",
    )
    p.add_argument("source", metavar="RUN_OR_FILE", help="run directory, its model.pt / checkpoint.pt, or a compacted model file")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="runtimes")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every runtime")
    p.add_argument("--repeats", type=int, default=50, help="timed repetitions per network, runtime and batch")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--data-dir", default=None, help="data directory, if the data set must be read (default: the run's)")
    p.set_defaults(func=cmd_bench)


def _add_reproduce(commands, progress: argparse.ArgumentParser) -> None:
    """The parser of ``bmrs reproduce``."""
    p = commands.add_parser(
        "reproduce", parents=[progress], formatter_class=_Formatter,
        help="run an experiment suite, then report it",
        description="Run every run of SUITE under OUT (complete runs are skipped, interrupted ones\n"
        "resume), then write the report of OUT into OUT/report as 'bmrs report OUT --out\n"
        "OUT/report' does, and in addition:\n"
        "  comparison.md, comparison.json  ours beside the paper's Table 1, and our summary as\n"
        "  paper-fmnist.json               in the paper (paper-fmnist only)\n"
        "  knees.md, knees.json            BMRS stopping points of the sweeps against the knees\n"
        "                                  of the accuracy-vs-compression curves\n"
        "  diagnostics.md, diagnostics.csv the gates of the lowest-seed runs of each of\n"
        "  posteriors_*.png, delta-f_*.png " + _wrap(", ".join(diagnostic_methods()) + ", per model", 54, 34),
        epilog=_suites_epilog() + "\n\nexample: bmrs reproduce quick --out runs/quick --jobs 2",
    )
    p.add_argument("suite", choices=tuple(suites.SUITES), metavar="SUITE", help=f"one of {', '.join(suites.SUITES)}")
    p.add_argument("--out", metavar="DIR", type=_out_path, required=True, help="suite directory")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bmrs`` command."""
    parser = _Parser(
        prog="bmrs",
        description="Structured pruning of neural networks with Bayesian model reduction (BMRS).\n\n"
        "Train with noise gates and prune continuously (train), prune a trained model at many\n"
        "compression levels (sweep), tabulate and plot results (report), turn a pruned model\n"
        "into a smaller plain network (compact, info), export and time it (export, bench), or run a\n"
        "whole experiment suite (reproduce).",
        formatter_class=_Formatter,
        epilog="Run 'bmrs COMMAND --help' for the options of a command. Exit status: 0 success, 2 a usage error or a\n"
        "bad input file (one line on stderr), 3 training diverged. Documentation: docs/cli.md, docs/reliability.md",
    )
    parser.add_argument("--version", action="version", version=f"bmrs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=int, default=None,
                         help="PyTorch CPU threads (default: PyTorch's choice; 1 is fastest for small models on a busy machine)")
    progress = _Parser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_train(commands, threads, progress)
    _add_sweep(commands, threads, progress)
    _add_report(commands)
    _add_compact(commands, threads)
    _add_info(commands, threads)
    _add_export(commands, threads)
    _add_bench(commands)
    _add_reproduce(commands, progress)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``bmrs`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Criteria that installed packages declare in the ``bmrs.criteria`` entry point group are
    registered first, so every command sees them."""
    load_plugins()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for 'train --nproc' to start its processes
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except BrokenPipeError:  # e.g. 'bmrs info --json FILE | head': stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        print("bmrs: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"bmrs: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (BMRSError, OSError, ChecksumError) as err:  # what a user can fix; anything else is a defect
        print(f"bmrs: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
