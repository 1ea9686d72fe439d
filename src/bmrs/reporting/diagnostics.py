"""Why BMRS prunes what it prunes: stopping points against knees, and the gates themselves.

Two analyses, both from files alone (nothing is trained; the gate analysis only evaluates
closed forms on the trained posteriors):

* **Knees** (:func:`knee_analysis`, :func:`knees_markdown`, :func:`write_knees`): for the
  post-training sweeps of a model (one per seed), where each evidence criterion stops
  (delta F >= its margin) compared with the knee of its own accuracy-vs-compression curve, with the
  knee of the best criterion's curve, and with the best accuracy any criterion reaches at
  the same compression. Knees are found with Kneedle (:func:`bmrs.experiments.analysis.knee`):
  both axes normalised to [0, 1], the knee is the point of the curve farthest above the
  chord joining its ends. The *best* criterion of a model is the one whose curve has the
  highest mean accuracy over the compression range all curves cover (the area under the
  curve divided by the range), averaged over the sweeps.
* **Gates** (:func:`run_diagnostics`, :func:`write_diagnostics`): per trained run, every
  gated structure's posterior (mu, log sigma), E[theta], SNR, and for every evidence
  criterion of :func:`diagnostic_criteria` its delta F, its margin and whether it prunes the
  structure (:func:`bmrs.experiments.analysis.gate_diagnostics`); written as a CSV, a
  Markdown summary and two figures per run (posteriors in the (mu, log sigma) plane, and
  the histogram of the exact delta F on a symlog axis).

A structure is *relaxed* when its (clamped) log sigma is at least ``relaxed_at`` (2.3: the
posterior is wider than half the prior's interval of log theta): it has drifted back toward
the prior, so every reduced prior gives delta F close to 0 (docs/results.md, "Why BMRS prunes what it prunes"). In our runs
such posteriors stop at log sigma 3 to 4.4, short of the clamp at 5.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._io import write_json, write_text
from ..pruning.criteria import CRITERIA, default_labels, parse_label
from .collect import RunResult, SweepResult, method_label
from .tables import column_key, format_mean_std, mean_std, method_order

__all__ = [
    "knee_stops", "KNEE_METHOD", "knee_analysis", "knees_markdown", "write_knees",
    "diagnostic_methods", "diagnostic_criteria", "RELAXED_LOG_SIGMA", "RunDiagnostics", "run_diagnostics",
    "select_runs", "diagnostics_csv", "diagnostics_summary", "diagnostics_markdown", "plot_posteriors", "plot_delta_f", "write_diagnostics",
]

# ============================================================================================
# Knees of post-training sweeps


def knee_stops() -> tuple[str, ...]:
    """The stopping rules analysed: the default labels of the evidence criteria (which stop
    where delta F >= their margin)."""
    return default_labels(evidence_based=True)


#: How knees are found (written into knees.md and knees.json).
KNEE_METHOD = (
    "Kneedle (Satopaa et al., 2011) on each criterion's accuracy-vs-parameter-compression curve: the "
    "curve is interpolated linearly, both axes are normalised to [0, 1], and the knee is the point "
    "farthest above the chord from the first to the last point. The best criterion of a model is the "
    "one with the highest mean accuracy over the compression range every curve covers (area under "
    "the curve / range), averaged over the sweeps."
)


def _curve_auc(compression, accuracy, lo: float, hi: float) -> float:
    """Mean accuracy of a curve over [lo, hi] (trapezoids on the interpolated curve)."""
    from ..experiments.analysis import _clean

    x, y = _clean(compression, accuracy)
    if hi <= lo:
        return float(np.mean(y))
    xs = np.linspace(lo, hi, 513)
    ys = np.interp(xs, x, y)
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (hi - lo))


def _sweep_seed(sweep: SweepResult):
    return sweep.data.get("run_config", {}).get("seed")


def _ms(values: list[float]) -> list[float] | None:
    return list(mean_std(values)) if values else None


def _pair(comps: list[float], accs: list[float]) -> dict | None:
    if not comps:
        return None
    return {"compression": _ms(comps), "accuracy": _ms(accs)}


def _analyse_sweep(records: list[dict], stops: Sequence[str]) -> dict:
    """Knees, AUCs and stop distances of one sweep (percent)."""
    from ..experiments.analysis import curves_from_sweep, knee, stop_vs_knee

    curves = {name: c for name, c in curves_from_sweep(records).items() if len(set(c["compression"])) >= 3}
    knees = {name: [100 * v for v in knee(c["compression"], c["accuracy"])] for name, c in curves.items()}
    auc = {}
    if curves:
        lo = max(min(c["compression"]) for c in curves.values())
        hi = min(max(c["compression"]) for c in curves.values())
        auc = {name: 100 * _curve_auc(c["compression"], c["accuracy"], lo, hi) for name, c in curves.items()}
    stop_results = stop_vs_knee(records, stops)
    out_stops = {}
    for name, res in stop_results.items():
        best_name, best_acc = res["best_at_stop"]
        out_stops[name] = {
            "stop": [100 * res["stop"][0], 100 * res["stop"][1]],
            "best_at_stop": [best_name, 100 * best_acc] if best_name is not None else None,
        }
    return {"knees": knees, "auc": auc, "stops": out_stops}


def knee_analysis(sweeps: Sequence[SweepResult], stops: Sequence[str] | None = None) -> dict:
    """Stopping points against knees, per model, over its sweeps (one per seed).

    Returns (all numbers in percent; ``[mean, std]`` over the sweeps)::

        {"method": KNEE_METHOD, "stops": [...], "models": {model: {
            "dataset", "model", "sweeps": [paths], "seeds": [...],
            "best_criterion": name,
            "curves": {criterion: {"knee": {"compression", "accuracy"}, "auc": [m, s], "n": k}},
            "stops": {criterion: {"n": k, "stop": {"compression", "accuracy"},
                "own_knee": {...}, "to_own_knee": {...},            # stop - knee of its curve
                "best_knee": {...}, "to_best_knee": {...},          # stop - knee of the best curve
                "best_at_stop": {"accuracy": [m, s], "criteria": {name: count}},
                "to_best_at_stop": {"accuracy": [m, s]}}},          # stop acc. - best acc. there
            "per_sweep": [{"path", "seed", "knees", "auc", "stops"}]}}}

    The model key is the model's name, or ``"dataset/model"`` when the sweeps cover several
    data sets. Criteria without a stopping point in a sweep, and curves with fewer than
    three distinct compressions (no knee), are left out. ``stops`` defaults to :func:`knee_stops`.
    """
    stops = knee_stops() if stops is None else tuple(stops)
    groups: dict[tuple[str, str], list[SweepResult]] = defaultdict(list)
    for sweep in sweeps:
        groups[(sweep.dataset, sweep.model)].append(sweep)
    datasets = {d for d, _ in groups}
    models: dict[str, dict] = {}
    for (dataset, model), members in sorted(groups.items()):
        members = sorted(members, key=lambda s: (str(_sweep_seed(s)), str(s.path)))
        per_sweep = []
        for sweep in members:
            entry = _analyse_sweep(sweep.records, stops)
            per_sweep.append({"path": str(sweep.path), "seed": _sweep_seed(sweep), **entry})
        criteria = sorted({c for e in per_sweep for c in e["knees"]}, key=method_order)
        curves = {}
        for c in criteria:
            knees = [e["knees"][c] for e in per_sweep if c in e["knees"]]
            aucs = [e["auc"][c] for e in per_sweep if c in e["auc"]]
            curves[c] = {"knee": _pair([k[0] for k in knees], [k[1] for k in knees]), "auc": _ms(aucs), "n": len(knees)}
        best = max(curves, key=lambda c: (curves[c]["auc"][0] if curves[c]["auc"] else -math.inf)) if curves else None
        stop_summary = {}
        for name in stops:
            rows = [(e, e["stops"][name]) for e in per_sweep if name in e["stops"]]
            if not rows:
                continue
            stop_c = [s["stop"][0] for _, s in rows]
            stop_a = [s["stop"][1] for _, s in rows]
            own = [(s["stop"], e["knees"][name]) for e, s in rows if name in e["knees"]]
            bestk = [(s["stop"], e["knees"][best]) for e, s in rows if best in e["knees"]]
            at = [s["best_at_stop"] for _, s in rows if s["best_at_stop"] is not None]
            gaps = [s["stop"][1] - s["best_at_stop"][1] for _, s in rows if s["best_at_stop"] is not None]
            stop_summary[name] = {
                "n": len(rows),
                "stop": _pair(stop_c, stop_a),
                "own_knee": _pair([k[0] for _, k in own], [k[1] for _, k in own]),
                "to_own_knee": _pair([s[0] - k[0] for s, k in own], [s[1] - k[1] for s, k in own]),
                "best_knee": _pair([k[0] for _, k in bestk], [k[1] for _, k in bestk]),
                "to_best_knee": _pair([s[0] - k[0] for s, k in bestk], [s[1] - k[1] for s, k in bestk]),
                "best_at_stop": {"accuracy": _ms([a[1] for a in at]), "criteria": dict(Counter(a[0] for a in at))} if at else None,
                "to_best_at_stop": {"accuracy": _ms(gaps)} if gaps else None,
            }
        models[column_key(dataset, model, datasets)] = {
            "dataset": dataset, "model": model, "sweeps": [str(s.path) for s in members],
            "seeds": [_sweep_seed(s) for s in members], "best_criterion": best, "curves": curves,
            "stops": stop_summary, "per_sweep": per_sweep,
        }
    return {"method": KNEE_METHOD, "stops": list(stops), "models": models}


def _fmt(pair: list[float] | None, n: int, digits: int = 2) -> str:
    return "—" if pair is None else format_mean_std(pair[0], pair[1], n, digits)


def _signed_fmt(pair: list[float] | None, n: int) -> str:
    if pair is None:
        return "—"
    text = "0.00" if abs(pair[0]) < 5e-3 else f"{pair[0]:+.2f}"
    return text if n < 2 else f"{text} ± {pair[1]:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def knees_markdown(analysis: dict) -> str:
    """:func:`knee_analysis` as Markdown: per model, the knee of every curve, then each
    stopping point with its distances to the knees and to the best accuracy at its compression."""
    lines = [
        "# Stopping points and knees",
        "",
        "Post-training sweeps of the unpruned (`none`) model, one per seed: every criterion prunes to a series "
        "of parameter-compression levels (a curve), and the BMRS criteria also stop on their own where "
        "delta F >= 0 (the stopping point). Comp. = % of parameters removed, Acc. = accuracy (%), "
        "mean ± std over the sweeps; Δ = stop − reference, in percentage points.",
        "",
        f"Knees: {analysis['method']}",
        "",
    ]
    if not analysis["models"]:
        return "\n".join(lines + ["No sweeps.", ""])
    for key, entry in analysis["models"].items():
        best = entry["best_criterion"]
        lines += [f"## {key}", "", f"{len(entry['sweeps'])} sweep(s); best criterion (highest mean accuracy over the "
                  f"common compression range): `{best}`.", ""]
        rows = []
        for name, c in entry["curves"].items():
            label = f"**`{name}`**" if name == best else f"`{name}`"
            knee = c["knee"]
            rows.append([label, _fmt(knee and knee["compression"], c["n"]), _fmt(knee and knee["accuracy"], c["n"]),
                         _fmt(c["auc"], c["n"]), str(c["n"])])
        if rows:
            lines += ["### Knees of the curves", ""]
            lines += _table(["criterion", "knee Comp.", "knee Acc.", "mean Acc. over range", "n"], rows) + [""]
        rows = []
        for name, s in entry["stops"].items():
            n = s["n"]
            best_at = s["best_at_stop"]
            which = ", ".join(f"{c}" + (f" ×{k}" if k > 1 else "") for c, k in sorted(best_at["criteria"].items())) if best_at else ""
            rows.append([
                f"`{name}`", _fmt(s["stop"]["compression"], n), _fmt(s["stop"]["accuracy"], n),
                "—" if s["own_knee"] is None else f"{s['own_knee']['compression'][0]:.2f} / {s['own_knee']['accuracy'][0]:.2f}",
                _signed_fmt(s["to_own_knee"] and s["to_own_knee"]["compression"], n),
                _signed_fmt(s["to_own_knee"] and s["to_own_knee"]["accuracy"], n),
                _signed_fmt(s["to_best_knee"] and s["to_best_knee"]["compression"], n),
                _signed_fmt(s["to_best_knee"] and s["to_best_knee"]["accuracy"], n),
                "—" if best_at is None else f"{_fmt(best_at['accuracy'], n)} ({which})",
                _signed_fmt(s["to_best_at_stop"] and s["to_best_at_stop"]["accuracy"], n),
                str(n),
            ])
        if rows:
            lines += ["### Stopping points", "",
                      f"Own knee: mean Comp. / Acc. of the knee of the criterion's own curve. Best knee: the knee of "
                      f"`{best}`. Best Acc. at stop: the highest accuracy any criterion's curve reaches at the "
                      "stopping point's compression (which criterion, and in how many sweeps).", ""]
            lines += _table(["criterion", "stop Comp.", "stop Acc.", "own knee (Comp. / Acc.)", "Δ own knee Comp.",
                             "Δ own knee Acc.", "Δ best knee Comp.", "Δ best knee Acc.", "best Acc. at stop",
                             "Δ best Acc.", "n"], rows) + [""]
        else:
            lines += ["No BMRS stopping points in these sweeps.", ""]
    return "\n".join(lines)


def write_knees(sweeps: Sequence[SweepResult], out_dir: str | os.PathLike, stops: Sequence[str] | None = None) -> dict:
    """Write ``knees.md`` and ``knees.json`` into ``out_dir``; return the analysis."""
    analysis = knee_analysis(sweeps, stops)
    out = Path(out_dir)
    write_json(analysis, out / "knees.json")
    write_text(out / "knees.md", knees_markdown(analysis))
    return analysis


# ============================================================================================
# Gate diagnostics of trained runs

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


def _criteria() -> dict:
    """The criteria of :func:`diagnostic_criteria`, by label."""
    from ..pruning.criteria import make_criterion

    return {label: make_criterion(name, **options) for label in diagnostic_criteria() for name, options in [parse_label(label)]}


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


def run_diagnostics(run_dir: str | os.PathLike, *, relaxed_at: float = RELAXED_LOG_SIGMA) -> RunDiagnostics:
    """Rebuild the gated model of ``run_dir`` (:func:`~bmrs.experiments.runs.load_run`) and
    evaluate every evidence criterion on its gates (:func:`~bmrs.experiments.analysis.gate_diagnostics`).

    Raises:
        FileNotFoundError, ValueError: not a run directory with a model, as ``load_run`` says.
    """
    import torch

    from ..experiments.analysis import gate_diagnostics
    from ..experiments.runs import load_run, run_files
    from ..gates import gates

    loaded = load_run(run_dir)
    run_dir, _ = run_files(run_dir)
    config = asdict(loaded.config)
    model = loaded.model
    criteria = _criteria()
    with torch.no_grad():
        records = gate_diagnostics(model, criteria)
        named = gates(model)
        extra = {name: (gate.mask.tolist(), gate.log_scale_bounds) for name, gate in named.items()}
    for r in records:
        mask, bounds = extra[r["gate"]]
        i = r["index"]
        r["log_sigma_clamped"] = min(max(r["log_sigma"], bounds[0]), bounds[1])
        r["masked"] = mask[i] == 0
        r["relaxed"] = r["log_sigma_clamped"] >= relaxed_at
    return RunDiagnostics(
        path=run_dir, dataset=config["dataset"], model=config["model"], label=method_label(config),
        seed=config["seed"],
        layers=list(named), log_sigma_max={name: g.log_scale_bounds[1] for name, g in named.items()},
        records=records, relaxed_at=relaxed_at,
    )


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
    lines += _table(header, rows) + [""]
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
    from matplotlib.figure import Figure

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
    from .plots import save_figure

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
            ax.set_title(f"gate {name}: {first} vs {second}", fontsize=9)
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
    from ..math.special import HALF_LOG_2PI
    from .plots import save_figure

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
        ax.set_title(f"gate {name}", fontsize=9)
        ax.set_xlabel("ΔF (exact BMRS_N), symlog")
        ax.set_ylabel("structures")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2)
    for ax in axes[len(d.layers):]:
        ax.set_visible(False)
    fig.suptitle(f"{d.title}: exact delta F per layer", fontsize=10)
    save_figure(fig, path)


def write_diagnostics(runs: Iterable, out_dir: str | os.PathLike, *, relaxed_at: float = RELAXED_LOG_SIGMA,
                      plots: bool = True) -> tuple[list[RunDiagnostics], dict[str, Path], list[str]]:
    """Gate diagnostics of ``runs`` (run directories or :class:`RunResult`) into ``out_dir``:
    ``diagnostics.csv`` (every structure, with a run column), ``diagnostics.md`` (the summary
    and links to the figures) and, with ``plots``, per run ``posteriors_<name>.png`` and
    ``delta-f_<name>.png`` (``<name>``: data set, model, method label and seed).

    A run whose model cannot be rebuilt (no ``model.pt``, a config it does not fit) is left
    out with a note. Returns the diagnostics, the files written and the notes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diagnostics, notes = [], []
    for run in runs:
        path = run.path if isinstance(run, RunResult) else Path(run)
        try:
            diagnostics.append(run_diagnostics(path, relaxed_at=relaxed_at))
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            notes.append(f"diagnostics: {path} skipped ({' '.join(str(err).split())[:200]})")
    files: dict[str, Path] = {}
    images: dict[str, list[str]] = {}
    if not diagnostics:
        return diagnostics, files, notes
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
    return diagnostics, files, notes
