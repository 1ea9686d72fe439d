"""Summaries of runs over seeds: the results table (Markdown) and its JSON twin."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from ..errors import BMRSError
from ..models import MODELS
from ..pruning.criteria import label_order
from .collect import RunResult, SweepResult, base_label, natural_key

__all__ = [
    "mean_std", "format_mean_std", "group_runs", "column_key", "method_order", "summarize",
    "results_markdown", "config_differences", "markdown_table",
]

# Configuration keys that may differ between the runs of one group.
_PER_RUN_KEYS = {"seed", "data_dir", "match"}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise BMRSError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def format_mean_std(mean: float, std: float, n: int, digits: int = 2) -> str:
    """``"93.20 ± 0.66"``; a single seed has no spread and gives ``"93.20"``."""
    if n < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def method_order(label: str) -> tuple:
    """Sort key of a method label for the rows of the table: no pruning, then the criteria
    in the registry's order (the evidence criteria, BMRS_U by falling precision, then the
    baselines; :func:`~bmrs.pruning.criteria.label_order`), anything else after them,
    alphabetically; a KL variant after its method."""
    base = base_label(label)
    if base != label:
        return method_order(base) + (1, label)
    return (*label_order(label), label)


def group_runs(runs: Iterable[RunResult]) -> dict[tuple[str, str, str], list[RunResult]]:
    """Runs by (dataset, model, method label), each group sorted by seed."""
    groups: dict[tuple[str, str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    return {
        key: sorted(members, key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0, str(r.path)))
        for key, members in groups.items()
    }


def column_key(dataset: str, model: str, datasets: set[str]) -> str:
    """The key of a (dataset, model) column: the model's name when the report covers one
    data set, ``"dataset/model"`` when it covers several."""
    return model if len(datasets) <= 1 else f"{dataset}/{model}"


def _columns(groups) -> list[tuple[str, str]]:
    order = list(MODELS)
    pairs = {(d, m) for d, m, _ in groups}
    return sorted(pairs, key=lambda p: (p[0], order.index(p[1]) if p[1] in order else len(order), p[1]))


def summarize(runs: Iterable[RunResult]) -> dict:
    """Mean and standard deviation over seeds, in percent, per model and method.

    Returns ``{model: {label: {"param_compression": [mean, std], "accuracy": [mean, std],
    "seeds": n}}}`` where accuracy is the test accuracy and the column key is as
    :func:`column_key` gives it.
    """
    groups = group_runs(runs)
    datasets = {d for d, _, _ in groups}
    out: dict[str, dict] = {}
    for dataset, model in _columns(groups):
        col = column_key(dataset, model, datasets)
        labels = sorted((k[2] for k in groups if k[:2] == (dataset, model)), key=method_order)
        out[col] = {}
        for label in labels:
            members = groups[(dataset, model, label)]
            out[col][label] = {
                "param_compression": list(mean_std([100 * r.metrics["parameter_compression"] for r in members])),
                "accuracy": list(mean_std([100 * r.metrics["test_accuracy"] for r in members])),
                "seeds": len(members),
            }
    return out


def config_differences(runs: Sequence[RunResult]) -> list[str]:
    """Configuration keys (other than the seed) whose values differ between ``runs``."""
    keys = set().union(*(r.config for r in runs)) - _PER_RUN_KEYS
    return sorted(k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table with ``header`` and ``rows`` (cells as text)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _widths_text(members: Sequence[RunResult]) -> str:
    names = sorted(members[0].metrics.get("kept", {}), key=natural_key)
    parts = []
    for name in names:
        values = [r.metrics["kept"][name] for r in members if name in r.metrics.get("kept", {})]
        total = members[0].metrics.get("structures", {}).get(name)
        mean = sum(values) / len(values)
        parts.append(f"{mean:.3g}" + (f"/{total}" if total is not None else ""))
    return " - ".join(parts) if parts else "n/a"


def _compaction_row(members: Sequence[RunResult]) -> list[str] | None:
    infos = [r.metrics.get("compaction") for r in members]
    infos = [i for i in infos if isinstance(i, dict) and "parameters_after" in i]
    if not infos:
        return None
    params_before = mean_std([i["parameters_before"] for i in infos])[0]
    params_after = mean_std([i["parameters_after"] for i in infos])[0]
    flops_before = mean_std([i["flops_before"] for i in infos])[0]
    flops_after = mean_std([i["flops_after"] for i in infos])[0]
    ratio = flops_before / flops_after if flops_after else float("inf")
    return [f"{params_before:,.0f}", f"{params_after:,.0f}", f"{flops_before:,.0f}", f"{flops_after:,.0f}", f"{ratio:.2f}x"]


def _cost_lines(groups) -> list[str]:
    """One row per run: its training time and where it ran (from its provenance record)."""
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], method_order(k[2]))):
        for run in sorted(groups[key], key=lambda r: natural_key(str(r.seed))):
            seconds = run.metrics.get("train_seconds")
            record = run.metrics.get("provenance") or {}
            where = record.get("processor") or "not recorded"
            threads = record.get("threads")
            rows.append([key[2], f"{key[1]} / {key[0]}", str(run.seed),
                         f"{seconds / 60:.1f}" if isinstance(seconds, (int, float)) else "–",
                         where + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")])
    if not rows:
        return []
    total = sum(r.metrics.get("train_seconds") or 0.0 for members in groups.values() for r in members)
    return ["## What the runs cost", "",
            f"Training time of each run (the epochs, without loading data and compacting), {total / 3600:.1f} hours in all.",
            ""] + markdown_table(["method", "model / data", "seed", "training (min)", "processor"], rows) + [""]


def results_markdown(runs: Sequence[RunResult], sweeps: Sequence[SweepResult] = (), *, plots: Sequence[str] = ()) -> str:
    """The report as Markdown.

    A table like the paper's Table 1 (rows: methods; per model and data set: parameter
    compression and test accuracy in percent, mean ± std over seeds, and the number of
    seeds), then the kept structures per layer, the compacted sizes, the stopping points
    of any sweeps, and links to ``plots``.
    """
    groups = group_runs(runs)
    lines = ["# Results", ""]
    if groups:
        lines += _main_table(groups) + _kept_table(groups) + _compaction_table(groups) + _cost_lines(groups)
        lines += _group_warnings(groups)
    if sweeps:
        lines += _sweep_stops(sweeps)
    if not groups and not sweeps:
        lines += ["No complete runs or sweeps.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def _by_method(groups: dict) -> list:
    return sorted(groups, key=lambda k: (k[0], k[1], method_order(k[2])))


def _main_table(groups: dict) -> list[str]:
    """Compression and accuracy per method (rows) and model / data set (columns)."""
    columns = _columns(groups)
    lines = ["Parameter compression (Comp., % of parameters removed) and test accuracy (Acc., %), "
             "mean ± standard deviation over seeds; n = number of seeds.", ""]
    header = ["method"]
    for dataset, model in columns:
        header += [f"{model} / {dataset} Comp. (%)", f"{model} / {dataset} Acc. (%)", "n"]
    rows = []
    for label in sorted({k[2] for k in groups}, key=method_order):
        row = [label]
        for dataset, model in columns:
            members = groups.get((dataset, model, label))
            if not members:
                row += ["–", "–", "0"]
                continue
            n = len(members)
            row.append(format_mean_std(*mean_std([100 * r.metrics["parameter_compression"] for r in members]), n))
            row.append(format_mean_std(*mean_std([100 * r.metrics["test_accuracy"] for r in members]), n))
            row.append(str(n))
        rows.append(row)
    return lines + markdown_table(header, rows) + [""]


def _kept_table(groups: dict) -> list[str]:
    lines = ["## Kept structures per layer", "", "Mean over seeds, kept/total per gated layer, in layer order.", ""]
    rows = []
    for key in _by_method(groups):
        members = groups[key]
        comp = mean_std([100 * r.metrics.get("structure_compression", 0.0) for r in members])
        rows.append([key[2], f"{key[1]} / {key[0]}", _widths_text(members), format_mean_std(*comp, len(members))])
    return lines + markdown_table(["method", "model / data", "kept per layer", "structure comp. (%)"], rows) + [""]


def _compaction_table(groups: dict) -> list[str]:
    rows = []
    for key in _by_method(groups):
        row = _compaction_row(groups[key])
        if row is not None:
            rows.append([key[2], f"{key[1]} / {key[0]}"] + row)
    if not rows:
        return []
    lines = ["## Compacted networks", "", "Mean over seeds; FLOPs of one forward pass of one example.", ""]
    header = ["method", "model / data", "params before", "params after", "FLOPs before", "FLOPs after", "FLOPs reduction"]
    return lines + markdown_table(header, rows) + [""]


def _group_warnings(groups: dict) -> list[str]:
    """Groups whose runs differ in more than the seed, or repeat a seed."""
    notes = []
    for key, members in sorted(groups.items()):
        differing = config_differences(members)
        if differing:
            notes.append(f"- {key[2]} on {key[1]} / {key[0]}: the runs differ in {', '.join(differing)}")
        seeds = [r.seed for r in members]
        if len(set(map(repr, seeds))) < len(seeds):
            notes.append(f"- {key[2]} on {key[1]} / {key[0]}: a seed occurs more than once")
    return ["## Warnings", ""] + notes + [""] if notes else []


def _sweep_stops(sweeps: Sequence[SweepResult]) -> list[str]:
    lines = ["## Post-training sweeps", ""]
    for sweep in sweeps:
        stops = [r for r in sweep.records if r.get("kind") == "stop"]
        lines += [f"### {sweep.model} / {sweep.dataset}: `{sweep.path}`", ""]
        split = sweep.data.get("config", {}).get("split", "test")
        if stops:
            lines += [f"Stopping points (BMRS: delta F >= 0; baselines: their threshold); {split} accuracy.", ""]
            rows = [
                [r["criterion"], f"{100 * r['parameter_compression']:.2f}", f"{100 * r['structure_compression']:.2f}",
                 f"{100 * r['accuracy']:.2f}"]
                for r in stops
            ]
            lines += markdown_table(["criterion", "param. comp. (%)", "structure comp. (%)", "acc. (%)"], rows) + [""]
        else:
            lines += ["No criterion with a stopping rule in this sweep.", ""]
    return lines
