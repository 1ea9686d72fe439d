"""``bmrs train``: train a gated model, pruning as it trains."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .. import distributed
from ..datasets import DATASETS
from ..errors import BMRSError
from ..experiments.live import LOG_FORMATS, log_files
from ..gates import KL_REDUCTIONS
from ..experiments.runs import methods, train_run
from ..models import MODEL_OPTIONS, MODELS
from ..pruning.criteria import CRITERIA
from ..reporting.collect import natural_key
from ..rundir import PAPER, RECOMMENDED, RUN_FILES, RunConfig, check_output_dir, load_metrics, read_config
from ..training import TRAINED_SCHEDULE, TrainingDiverged
from . import _launch as _launcher
from ._common import Formatter, criteria_with, dataset_name, out_path, percent, positive, say, set_threads

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


# The schedule of a run from random weights (with --from: bmrs.training.TRAINED_SCHEDULE).
_SCRATCH_SCHEDULE = {"epochs": 50, "prune_every": 1, "finetune_epochs": 10}


def _model_flags() -> dict[str, list[tuple[str, str]]]:
    """Every bundled model's command-line option (:data:`bmrs.models.MODEL_OPTIONS`), with
    the models that take it and what it means for each."""
    flags: dict[str, list[tuple[str, str]]] = {}
    for model, options in MODEL_OPTIONS.items():
        for flag, option in options.items():
            flags.setdefault(flag, []).append((model, option.help))
    return flags


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _config_from_args(args) -> RunConfig:
    """The run configuration of ``bmrs train``'s options, checked before anything is written."""
    schedule = TRAINED_SCHEDULE if args.start_from is not None else _SCRATCH_SCHEDULE
    for dest, value in schedule.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.method == "none" and args.bits is not None:
        raise BMRSError("--bits applies to a pruning method, not --method none")
    if args.bits is not None and "bits" not in CRITERIA[args.method].needs:
        raise BMRSError(f"--bits applies to --method {criteria_with('bits')} only (got --method {args.method})")
    positive("--epochs", args.epochs)
    positive("--finetune-epochs", args.finetune_epochs, 0)
    positive("--prune-every", args.prune_every)
    positive("--seed", args.seed, 0)
    positive("--batch-size", args.batch_size)
    positive("--image-size", args.image_size)
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise BMRSError(f"--lr must be a positive number, got {args.lr}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise BMRSError(f"--threshold must be a finite number, got {args.threshold}")
    options = {}
    allowed = MODEL_OPTIONS.get(args.model, {})
    for flag in _model_flags():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        if flag not in allowed:
            takes = ", ".join(allowed) or "no model options"
            raise BMRSError(f"{flag} does not apply to --model {args.model} (it takes {takes})")
        positive(flag, value)
        options[allowed[flag].keyword] = value
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
    return config.check()  # the rules of options that go together, before any file is written


def _print_run_summary(out: Path, config: dict, metrics: dict) -> None:
    takes_bits = config["method"] in CRITERIA and "bits" in CRITERIA[config["method"]].needs
    label = config["method"] + (f" (bits {config['bits']:g})" if takes_bits else "")
    say(f"run {out}: {config['model']} on {config['dataset']}, method {label}, seed {config['seed']}")
    say(f"  test accuracy      {percent(metrics['test_accuracy'])}   (validation {percent(metrics['val_accuracy'])}, "
         f"best epoch {metrics['best_epoch']})")
    say(f"  compression        {percent(metrics['parameter_compression'])} of parameters, "
         f"{percent(metrics['structure_compression'])} of structures")
    kept = ", ".join(
        f"{name}: {metrics['kept'][name]}/{metrics['structures'].get(name, '?')}"
        for name in sorted(metrics["kept"], key=natural_key)
    )
    say(f"  kept per layer     {kept}")
    info = metrics.get("compaction") or {}
    if "parameters_after" in info:
        say(f"  compacted          {info['parameters_before']:,} -> {info['parameters_after']:,} parameters, "
             f"{info['flops_before']:,} -> {info['flops_after']:,} FLOPs per example ({out / info['file']})")
    elif "error" in info:
        say(f"  compacted          not possible: {info['error']}")
    evidence, calibrated = metrics.get("evidence"), metrics.get("calibration") or {}
    if evidence:
        say(f"  evidence           {evidence['ambiguous']} of {sum(e['total'] for e in evidence['layers'].values())} "
            f"decisions within {evidence['ambiguity_nats']:g} nat of the margin; most over-parameterised: "
            f"{evidence['most_overparameterised']} (bmrs explain {out})")
    if "gated" in calibrated:
        parts = [f"{label} {percent(calibrated[key]['ece'])}" for key, label in
                 (("unpruned", "unpruned"), ("gated", "pruned"), ("predictive", "predictive")) if key in calibrated]
        say(f"  calibration (ECE)  {', '.join(parts)}")
    processes = metrics.get("processes", 1)
    say(f"  training time      {metrics['train_seconds']:.1f} s" + (f" ({processes} processes)" if processes > 1 else ""))
    say(f"  results            {out / 'metrics.json'}")


def _under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (its variables are set)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _warn_oversubscription(nproc: int, threads: int | None) -> None:
    """One warning on stderr when ``nproc`` processes of ``threads`` threads each (1 unless
    --threads says otherwise) ask for more than the machine's cores."""
    cores = _cores()
    if nproc * (threads or 1) <= cores:
        return
    if nproc > cores:
        text = (f"--nproc {nproc} is more than the {cores} CPU core(s) here: the processes take turns on them and "
                f"the run is slower than with --nproc {cores} or fewer")
    else:
        text = f"--nproc {nproc} x --threads {threads} is more than the {cores} CPU core(s) here: the threads take turns"
    print(f"bmrs: warning: {text}", file=sys.stderr, flush=True)


def _methods_help() -> str:
    evidence = "; ".join(f"{name}: {c.summary}" for name, c in CRITERIA.items() if c.evidence_based)
    baselines = "; ".join(f"{name}: {c.summary}" for name, c in CRITERIA.items() if not c.evidence_based)
    return (f"pruning criterion: none (train with gates, no pruning); the evidence criteria prune where delta F "
            f"reaches their margin ({evidence}); the baselines ({baselines}) prune at their threshold, or need "
            "--target or --match when they have none")


def run(args) -> int:
    set_threads(args)
    positive("--nproc", args.nproc)
    launched = _under_torchrun()
    if launched and args.nproc not in (1, int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))):
        raise BMRSError("--nproc starts the processes itself: leave it out when torchrun starts them")
    # under torchrun: every rank checks OUT as it is, and none writes before all have checked
    device = distributed.init_from_environment()
    main = distributed.is_main()
    defaults = _recommended_defaults(args)
    config = _config_from_args(args)
    if defaults is not None and main and not (launched and _launcher.LAUNCHED in os.environ):  # said by the launcher
        say(defaults)
    out = Path(args.out)
    if args.force and not args.resume and main:
        # start afresh: no file of an earlier run is left to be mistaken for the new one's
        for path in [out / name for name in RUN_FILES] + log_files(out) if out.is_dir() else ():
            path.unlink(missing_ok=True)
    state = check_output_dir(out, config, resume=args.resume, force=args.force, logs=log_files(out) if out.is_dir() else [])
    complete, started = state == "complete", state == "started"
    if complete:
        say(f"{out} is complete; nothing to train.")
        _print_run_summary(out, read_config(out / "config.json"), load_metrics(out))
        return 0
    if args.nproc > 1 and not launched:
        _warn_oversubscription(args.nproc, args.threads)
        _launcher.launch(args.nproc, args.argv, out)  # their output kept in OUT/logs/
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


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs train``."""
    p = commands.add_parser(
        "train", parents=[parents["threads"], parents["progress"]], formatter_class=Formatter,
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
        "(also on several machines). One run directory, written by rank 0. The processes' output goes\n"
        "to OUT/logs/ (a folder per start; rank 0's stdout and progress bar are shown here): a process\n"
        "that dies, or a signal to this command, stops them all with one line naming the cause, and\n"
        "--resume continues from the checkpoint; see docs/distributed.md.\n\n"
        f"Without --method and --kl-reduction it uses the recommended {RECOMMENDED['method']} and\n"
        f"{RECOMMENDED['kl_reduction']} (see docs/pruning.md) and says so; the paper's are --method "
        f"{PAPER['method']}\nand --kl-reduction {PAPER['kl_reduction']}.",
        epilog="example: bmrs train --dataset digits --model mlp --out runs/digits\n"
        "the paper's settings: bmrs train --dataset fashion-mnist --model lenet5 --method bmrs-n-code \\\n"
        "           --kl-reduction mean --recompute-masks --out runs/lenet5-paper",
    )
    p.add_argument("--dataset", type=dataset_name, choices=DATASETS, required=True, help="data set")
    p.add_argument("--model", choices=tuple(MODELS), required=True, help="bundled model")
    p.add_argument("--method", choices=methods(), default=None,
                   help=f"default {RECOMMENDED['method']} (recommended; the paper's BMRS_N: {PAPER['method']}). "
                   + _methods_help())
    p.add_argument("--bits", type=float, default=None, help=f"precision of {criteria_with('bits')} in bits (default 8; fewer prune more)")
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
    p.add_argument("--kl-reduction", choices=tuple(KL_REDUCTIONS), default=None,
                   help=f"KL term (default {RECOMMENDED['kl_reduction']}, recommended): "
                   + "; ".join(f"{name}: {meaning}" for name, meaning in KL_REDUCTIONS.items()))
    p.add_argument("--image-size", type=int, default=None, help="resize images to SxS (default 32 for (fashion-)mnist)")
    g = p.add_argument_group("model options (passed to the model builder)")
    for flag, uses in _model_flags().items():
        g.add_argument(flag, type=int, default=None, help="; ".join(f"{model}: {help}" for model, help in uses))
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
                   help="training processes on this machine (data parallel; --batch-size is per process; one thread "
                   "each unless --threads; more than the machine's cores is warned of; their output in OUT/logs/)")
    p.add_argument("--out", metavar="RUN_DIR", type=out_path, required=True, help="run directory to write")
    p.set_defaults(func=run)
