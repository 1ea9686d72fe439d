"""Why BMRS prunes what it prunes: the gates of trained runs, as tables and figures.

Per trained run, every gated structure's posterior (mu, log sigma), E[theta], SNR, and for
every evidence criterion of :func:`diagnostic_criteria` its delta F, its margin and whether
it prunes the structure. The numbers are computed
from the trained posteriors by :func:`bmrs.experiments.analysis.run_diagnostics` (which
rebuilds the model); this module holds their form (:class:`RunDiagnostics`) and turns them
into a CSV, a Markdown summary and two figures per run (posteriors in the (mu, log sigma)
plane, and the histogram of the exact delta F on a symlog axis): :func:`write_diagnostics`.

A structure is *relaxed* when its (clamped) log sigma is at least ``relaxed_at`` (2.3: the
posterior is wider than half the prior's interval of log theta): it has drifted back toward
the prior, so every reduced prior gives delta F close to 0 (docs/math.md, "Relaxed gates
and ties"). In our runs such posteriors stop at log sigma 3 to 4.4, short of the clamp at 5.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .._io import write_text
from ..math.special import HALF_LOG_2PI
from ..pruning.criteria import CRITERIA, default_labels, parse_label
from .collect import RunResult
from .plots import save_figure
from .tables import markdown_table

__all__ = [
    "diagnostic_methods", "diagnostic_criteria", "RELAXED_LOG_SIGMA", "RunDiagnostics", "select_runs",
    "diagnostics_csv", "diagnostics_summary", "diagnostics_markdown", "plot_posteriors", "plot_delta_f",
    "write_diagnostics",
]


def diagnostic_methods() -> tuple[str, ...]:
    """Methods whose runs :func:`select_runs` picks for the gate diagnostics by default:
    ``none`` and the first default label of every evidence criterion."""
    return ("none", *(cls.label(**cls.variants[0]) for cls in CRITERIA.values() if cls.evidence_based))


def diagnostic_criteria() -> tuple[str, ...]:
    """The criteria evaluated on every gate, in column order: the default labels of the
    evidence criteria."""
    return default_labels(evidence_based=True)


#: A structure whose clamped log sigma is at least this is "relaxed" (prior-like): its
#: posterior is wider than half the prior's interval of log theta (20 / 2 = e^2.3).
RELAXED_LOG_SIGMA = 2.3


@dataclass
class RunDiagnostics:
    """The gate diagnostics of one run: one record per gated structure.

    Each record holds ``gate``, ``index``, ``mu``, ``log_sigma`` (the parameter),
    ``log_sigma_clamped`` (what the posterior uses), ``e_theta``, ``snr``,
    ``delta_f[c]`` (the true delta F under ``c``'s reduced prior), ``margin[c]`` (what
    delta F must reach for ``c`` to prune) and ``pruned[c]`` for every criterion ``c`` of
    :func:`diagnostic_criteria`, ``masked`` (the run's own mask removed it) and ``relaxed``.
    """

    path: Path
    dataset: str
    model: str
    label: str
    seed: object
    layers: list[str]
    log_sigma_max: dict[str, float]
    records: list[dict]
    relaxed_at: float = RELAXED_LOG_SIGMA

    @property
    def name(self) -> str:
        """A file-name friendly identifier: ``dataset_model_label_seed-s``."""
        return f"{self.dataset}_{self.model}_{self.label}_seed-{self.seed}"

    @property
    def title(self) -> str:
        return f"{self.model} / {self.dataset}, {self.label}, seed {self.seed}"

    def layer(self, name: str) -> list[dict]:
        return [r for r in self.records if r["gate"] == name]


def select_runs(runs: Iterable[RunResult], methods: Sequence[str] | None = None) -> list[RunResult]:
    """Per (data set, model) and method in ``methods`` (default :func:`diagnostic_methods`):
    the run with the lowest seed."""
    methods = diagnostic_methods() if methods is None else tuple(methods)
    chosen: dict[tuple, RunResult] = {}
    for run in runs:
        if run.label not in methods:
            continue
        seed = run.seed if isinstance(run.seed, int) else math.inf
        current = chosen.get(run.key)
        if current is None or seed < (current.seed if isinstance(current.seed, int) else math.inf):
            chosen[run.key] = run
    return [chosen[k] for k in sorted(chosen, key=lambda k: (k[0], k[1], methods.index(k[2])))]


def _csv_fields() -> list[str]:
    criteria = diagnostic_criteria()
    return (
        ["run", "dataset", "model", "method", "seed", "gate", "index", "mu", "log_sigma", "log_sigma_clamped", "e_theta", "snr"]
        + [f"delta_f[{c}]" for c in criteria] + [f"margin[{c}]" for c in criteria] + [f"pruned[{c}]" for c in criteria]
        + ["masked", "relaxed"]
    )


def diagnostics_csv(diagnostics: Sequence[RunDiagnostics]) -> str:
    """All structures of all runs as CSV, one row per structure (columns: run, dataset, model,
    method, seed, then the record's fields; booleans as 0/1)."""
    fields = _csv_fields()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for d in diagnostics:
        for r in d.records:
            row = {"run": str(d.path), "dataset": d.dataset, "model": d.model, "method": d.label, "seed": d.seed}
            for key in fields[5:]:
                value = r.get(key)
                row[key] = int(value) if isinstance(value, bool) else (f"{value:.10g}" if isinstance(value, float) else value)
            writer.writerow(row)
    return buffer.getvalue()


def _layer_counts(d: RunDiagnostics, name: str) -> dict:
    members = d.layer(name)
    relaxed = [r for r in members if r["relaxed"]]
    return {
        "structures": len(members),
        "masked": sum(r["masked"] for r in members),
        "pruned": {c: sum(r[f"pruned[{c}]"] for r in members) for c in diagnostic_criteria()},
        "relaxed": len(relaxed),
        "median_delta_f_relaxed": statistics.median(r["delta_f[bmrs-n]"] for r in relaxed) if relaxed else None,
    }


def diagnostics_summary(diagnostics: Sequence[RunDiagnostics]) -> list[dict]:
    """Per run and layer: structures, masked by the run, pruned per criterion, relaxed, and
    the median exact delta F of the relaxed structures."""
    return [{"run": str(d.path), "title": d.title, "gate": name, **_layer_counts(d, name)}
            for d in diagnostics for name in d.layers]


def diagnostics_markdown(diagnostics: Sequence[RunDiagnostics], *, images: dict[str, list[str]] | None = None) -> str:
    """The per-run, per-layer summary as Markdown (``images``: figure file names per run path)."""
    relaxed_at = diagnostics[0].relaxed_at if diagnostics else RELAXED_LOG_SIGMA
    criteria = diagnostic_criteria()
    by_name: dict[str, list[str]] = defaultdict(list)
    for label in criteria:
        by_name[parse_label(label)[0]].append(f"`{label}`")
    described = "; ".join(f"{', '.join(labels)} ({CRITERIA[name].summary})" for name, labels in by_name.items())
    lines = [
        "# Why BMRS prunes what it prunes",
        "",
        "The gates of trained runs, evaluated after training (closed forms only). For each gated layer: the "
        "number of structures, how many the run's own final mask removed, how many each criterion would "
        f"prune now (delta F >= its margin): {described}; "
        f"and how many are *relaxed* (log σ ≥ {relaxed_at:g}: wider than half the prior's interval, prior-like), "
        "with the median exact delta F of those. A relaxed structure sits just below delta F = 0 under the "
        "exact criterion, a tie it never breaks; the code's +0.919 nats breaks it toward pruning.",
        "",
    ]
    if not diagnostics:
        return "\n".join(lines + ["No runs.", ""])
    header = ["run", "layer", "structures", "masked by run"] + [f"`{c}`" for c in criteria] + [
        "relaxed", "median ΔF_N (relaxed)"]
    rows = []
    for d in diagnostics:
        for name in d.layers:
            c = _layer_counts(d, name)
            median = c["median_delta_f_relaxed"]
            rows.append([d.title, f"`{name}`", str(c["structures"]), str(c["masked"])]
                        + [str(c["pruned"][k]) for k in criteria]
                        + [str(c["relaxed"]), "—" if median is None else f"{median:.4g}"])
    lines += markdown_table(header, rows) + [""]
    if images:
        lines += ["## Figures", ""]
        for d in diagnostics:
            names = images.get(str(d.path), [])
            if names:
                lines += [f"### {d.title}", ""] + [f"![{n}]({n})" for n in names] + [""]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------

_PAIR_COLORS = {"both": "#d62728", "first": "#ff7f0e", "second": "#1f77b4", "neither": "#9a9a9a"}


def _panel_grid(rows: int, cols: int, width: float = 4.2, height: float = 3.6):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [[fig.add_subplot(rows, cols, r * cols + c + 1) for c in range(cols)] for r in range(rows)]
    return fig, axes


def plot_posteriors(d: RunDiagnostics, path: str | os.PathLike) -> None:
    """Posteriors of a run in the (mu, log sigma) plane: one column per gated layer.

    One row per pair of consecutive criteria of :func:`diagnostic_criteria` (the exact BMRS_N
    and the code's first): colour by which of the two prune the structure (both / the first
    only / the second only / neither). The band log sigma >= ``relaxed_at`` (prior-like) is shaded and the clamp of
    log sigma drawn dashed; structures the run's mask removed have a black edge.
    """
    criteria = diagnostic_criteria()
    pairs = list(zip(criteria[0::2], criteria[1::2]))
    if len(criteria) % 2:  # the last one against the first
        pairs.append((criteria[0], criteria[-1]))
    fig, axes = _panel_grid(len(pairs), max(len(d.layers), 1))
    for row, (first, second) in zip(axes, pairs):
        for ax, name in zip(row, d.layers):
            members = d.layer(name)
            top = d.log_sigma_max.get(name, 5.0)
            groups = {"both": [], "first": [], "second": [], "neither": []}
            for r in members:
                a, b = r[f"pruned[{first}]"], r[f"pruned[{second}]"]
                groups["both" if a and b else "first" if a else "second" if b else "neither"].append(r)
            labels = {"both": "both prune", "first": f"only {first}", "second": f"only {second}", "neither": "neither"}
            for key, rs in groups.items():
                if not rs:
                    continue
                ax.scatter([r["mu"] for r in rs], [r["log_sigma_clamped"] for r in rs], s=16, alpha=0.8,
                           color=_PAIR_COLORS[key], edgecolors=["black" if r["masked"] else "none" for r in rs],
                           linewidths=0.6, label=f"{labels[key]} ({len(rs)})")
            ax.axhspan(d.relaxed_at, top + 0.5, color="#2ca02c", alpha=0.08,
                       label=f"relaxed: log σ ≥ {d.relaxed_at:g}")
            ax.axhline(top, color="black", linestyle="--", linewidth=0.8)
            ax.set_title(f"layer {name}: {first} vs {second}", fontsize=9)
            ax.set_xlabel("μ (location of log θ)")
            ax.set_ylabel("log σ (clamped)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{d.title}: posteriors (black edge: removed by the run's mask; dashed: clamp of log σ)", fontsize=10)
    save_figure(fig, path)


def _symlog_edges(values: np.ndarray, linthresh: float) -> np.ndarray:
    neg = -values[values < -linthresh]
    pos = values[values > linthresh]
    edges = [np.linspace(-linthresh, linthresh, 5)]
    if len(neg):
        top = math.log10(neg.max() * 1.05)
        edges.insert(0, -np.logspace(top, math.log10(linthresh), max(int(8 * (top - math.log10(linthresh))), 2)))
    if len(pos):
        top = math.log10(pos.max() * 1.05)
        edges.append(np.logspace(math.log10(linthresh), top, max(int(8 * (top - math.log10(linthresh))), 2)))
    return np.unique(np.concatenate(edges))


def plot_delta_f(d: RunDiagnostics, path: str | os.PathLike, *, linthresh: float = 1e-3) -> None:
    """Histogram of the exact BMRS_N delta F per gated layer on a symlog axis, relaxed and
    other structures stacked; lines at 0 (where the exact criterion prunes) and at
    -½ log 2π (where the code's criterion prunes)."""
    cols = min(len(d.layers), 2) or 1
    rows = math.ceil(max(len(d.layers), 1) / cols)
    fig, grid = _panel_grid(rows, cols, width=5.5, height=3.8)
    axes = [ax for row in grid for ax in row]
    for ax, name in zip(axes, d.layers):
        members = d.layer(name)
        values = np.array([r["delta_f[bmrs-n]"] for r in members], dtype=float)
        finite = values[np.isfinite(values)]
        relaxed = np.array([r["delta_f[bmrs-n]"] for r in members if r["relaxed"]], dtype=float)
        others = np.array([r["delta_f[bmrs-n]"] for r in members if not r["relaxed"]], dtype=float)
        edges = _symlog_edges(finite, linthresh) if len(finite) else np.linspace(-1, 1, 5)
        clip = lambda v: np.clip(v[np.isfinite(v)], edges[0], edges[-1])  # noqa: E731
        ax.hist([clip(relaxed), clip(others)], bins=edges, stacked=True, color=["#2ca02c", "#7f7f7f"],
                label=[f"relaxed ({len(relaxed)})", f"other ({len(others)})"])
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.tick_params(axis="x", labelsize=7, labelrotation=45)
        ax.axvline(0.0, color="black", linewidth=0.9, label="0: exact BMRS_N prunes above")
        ax.axvline(-HALF_LOG_2PI, color="#d62728", linestyle="--", linewidth=0.9,
                   label="−½ log 2π: code's BMRS_N prunes above")
        ax.set_title(f"layer {name}", fontsize=9)
        ax.set_xlabel("ΔF (exact BMRS_N), symlog")
        ax.set_ylabel("structures")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2)
    for ax in axes[len(d.layers):]:
        ax.set_visible(False)
    fig.suptitle(f"{d.title}: exact delta F per layer", fontsize=10)
    save_figure(fig, path)


def write_diagnostics(diagnostics: Sequence[RunDiagnostics], out_dir: str | os.PathLike, *,
                      plots: bool = True) -> dict[str, Path]:
    """Write the gate diagnostics of runs (from :func:`bmrs.experiments.analysis.run_diagnostics`)
    into ``out_dir``: ``diagnostics.csv`` (every structure, with a run column),
    ``diagnostics.md`` (the summary and links to the figures) and, with ``plots``, per run
    ``posteriors_<name>.png`` and ``delta-f_<name>.png`` (``<name>``: data set, model, method
    label and seed). Nothing is written for no runs. Returns the files written, by key.
    """
    out = Path(out_dir)
    files: dict[str, Path] = {}
    images: dict[str, list[str]] = {}
    if not diagnostics:
        return files
    out.mkdir(parents=True, exist_ok=True)
    used: Counter = Counter()
    for d in diagnostics:
        used[d.name] += 1
        stem = d.name if used[d.name] == 1 else f"{d.name}-{used[d.name]}"
        if plots:
            names = [f"posteriors_{stem}.png", f"delta-f_{stem}.png"]
            plot_posteriors(d, out / names[0])
            plot_delta_f(d, out / names[1])
            images[str(d.path)] = names
            for n in names:
                files[n] = out / n
    write_text(out / "diagnostics.csv", diagnostics_csv(diagnostics))
    files["diagnostics_csv"] = out / "diagnostics.csv"
    write_text(out / "diagnostics.md", diagnostics_markdown(diagnostics, images=images))
    files["diagnostics_md"] = out / "diagnostics.md"
    return files
