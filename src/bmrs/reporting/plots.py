"""Plots of a report: accuracy against compression, and kept structures per layer.

Figures are drawn with Matplotlib's object API on the Agg canvas (no pyplot, no global
backend change) and saved atomically as PNG.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._io import write_atomic
from .collect import RunResult, SweepResult, natural_key
from .collect import base_label
from .tables import group_runs, method_order

__all__ = ["save_figure", "plot_sweeps", "plot_runs", "plot_widths"]


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save ``fig`` as PNG to a temporary file beside ``path``, then rename it."""
    FigureCanvasAgg(fig)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _grid(n: int, width: float = 5.5, height: float = 4.2) -> tuple[Figure, list]:
    """``n`` panels stacked in one column (their legends go beside them)."""
    fig = Figure(figsize=(width, height * n), layout="constrained")
    axes = [fig.add_subplot(n, 1, i + 1) for i in range(n)]
    return fig, axes


def _legends_right(fig: Figure, axes: list) -> None:
    """Each panel's legend beside it, in small type where it hides no data (two columns
    when it is long, the figure widened for the second), and the panels just tall enough
    for their legends."""
    entries = max(len(ax.get_legend_handles_labels()[0]) for ax in axes)
    columns = 1 if entries <= 14 else 2
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncols=columns,
                  handlelength=2.2, labelspacing=0.35, columnspacing=1.0, frameon=False)
    width, height = fig.get_size_inches()
    # a second legend column gets its own room, so that the panels keep their width
    fig.set_size_inches(width + 2.5 * (columns - 1), max(height, len(axes) * (0.15 * -(-entries // columns) + 0.8)))


def _is_bmrs(label: str) -> bool:
    return base_label(label).startswith("bmrs")


# Baselines: shades of grey, dashed, told apart by their markers.
_BASELINE_MARKERS = ("s", "^", "v", "<", ">", "p", "h", "8")
# Trained runs: one marker shape per method label, in its method's colour.
_RUN_MARKERS = ("D", "s", "^", "v", "P", "X", "h", "p", "<", ">", "8", "d", "H", "o")


# The fixed places of the known methods in their colour family, so that a method has the
# same colour in every figure, whatever else a figure shows.
_BMRS_PLACES = ("bmrs-n", "bmrs-n-code", "bmrs-n-rel", "bmrs-n-kr", "bmrs-u8", "bmrs-u4")
_BASELINE_PLACES = ("snr", "etheta", "l2", "taylor", "random")


def _place(label: str, known: tuple[str, ...], others: list[str], span: tuple[float, float], extra: tuple[float, float]) -> float:
    """Where ``label`` sits on its colour scale: the known methods spread evenly over ``span``,
    any other (e.g. bmrs-u2) in ``extra``, beyond them, so the known keep their places."""
    if label in known:
        return span[0] + (span[1] - span[0]) * known.index(label) / (len(known) - 1)
    return extra[0] + (extra[1] - extra[0]) * (others.index(label) + 1) / (len(others) + 1)


def _styles(labels: Sequence[str]) -> dict[str, dict]:
    """Styles by method label: the BMRS criteria in one colour family (plasma, solid lines,
    round markers), every baseline grey and dashed with its own marker, the unpruned run
    (none) black; no two methods share a colour, and a method keeps its colour across
    figures. A KL variant (``bmrs-n-kr+kl-structures``) takes its method's style."""

    bases = sorted({base_label(label) for label in labels}, key=method_order)
    bmrs_others = [b for b in bases if _is_bmrs(b) and b not in _BMRS_PLACES]
    baseline_others = [b for b in bases if not _is_bmrs(b) and b != "none" and b not in _BASELINE_PLACES]
    plasma = colormaps["plasma"]
    style = {"none": {"color": "black", "linestyle": "-", "marker": "o"}}
    for b in bases:
        if b == "none":
            continue
        if _is_bmrs(b):
            style[b] = {"color": plasma(_place(b, _BMRS_PLACES, bmrs_others, (0.0, 0.85), (0.85, 1.0))),
                        "linestyle": "-", "marker": "o"}
        else:
            grey = _place(b, _BASELINE_PLACES, baseline_others, (0.15, 0.6), (0.6, 0.75))
            i = _BASELINE_PLACES.index(b) if b in _BASELINE_PLACES else len(_BASELINE_PLACES) + baseline_others.index(b)
            style[b] = {"color": (grey, grey, grey), "linestyle": "--", "marker": _BASELINE_MARKERS[i % len(_BASELINE_MARKERS)]}
    return {label: style[base_label(label)] for label in labels}


def _panels(items, key) -> dict[tuple[str, str], list]:
    panels: dict[tuple[str, str], list] = defaultdict(list)
    for item in items:
        panels[key(item)].append(item)
    return dict(sorted(panels.items()))


def plot_sweeps(sweeps: Sequence[SweepResult], path: str | os.PathLike, runs: Sequence[RunResult] = ()) -> None:
    """Accuracy against parameter compression from post-training sweeps.

    One panel per (model, data set); one line per criterion through its target levels
    (mean over the sweeps of that model, e.g. several seeds); each sweep's stopping points
    (BMRS: delta F >= 0; baselines: their threshold) as stars in the criterion's colour.
    BMRS criteria are drawn in one colour family with solid lines, baselines grey and
    dashed (see :func:`_styles`). Training runs of the same model and data set, if given,
    appear as large markers, one shape per method label (their test accuracy after
    continuous pruning), in their method's colour.
    """
    panels = _panels(sweeps, lambda s: (s.model, s.dataset))
    fig, axes = _grid(len(panels))
    criteria = sorted({r["criterion"] for s in sweeps for r in s.records}, key=method_order)
    run_labels = sorted({k[2] for k in group_runs(runs)}, key=method_order)
    styles = _styles([*criteria, *run_labels])
    markers = {label: _RUN_MARKERS[i % len(_RUN_MARKERS)] for i, label in enumerate(run_labels)}
    for ax, ((model, dataset), members) in zip(axes, panels.items()):
        for criterion in criteria:
            by_target: dict[float, list[dict]] = defaultdict(list)
            stops = []
            for sweep in members:
                for r in sweep.records:
                    if r["criterion"] != criterion:
                        continue
                    if r.get("kind") == "stop":
                        stops.append(r)
                    else:
                        by_target[float(r["target"])].append(r)
            if by_target:
                targets = sorted(by_target)
                xs = [100 * sum(r["parameter_compression"] for r in by_target[t]) / len(by_target[t]) for t in targets]
                ys = [100 * sum(r["accuracy"] for r in by_target[t]) / len(by_target[t]) for t in targets]
                style = styles[criterion]
                ax.plot(xs, ys, color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                        markersize=3.5, linewidth=1.6 if _is_bmrs(criterion) else 1.1, label=criterion)
            if stops:
                ax.plot(
                    [100 * r["parameter_compression"] for r in stops], [100 * r["accuracy"] for r in stops], "*",
                    color=styles[criterion]["color"], markersize=13, markeredgecolor="black", markeredgewidth=0.6,
                    label=None if by_target else criterion,
                )
        ax.plot([], [], "*", color="grey", markeredgecolor="black", markersize=11, label="stopping point")
        trained = [r for r in runs if (r.model, r.dataset) == (model, dataset)]
        if trained:
            groups = group_runs(trained)
            for (_, _, label), members in sorted(groups.items(), key=lambda item: method_order(item[0][2])):
                ax.scatter([100 * r.metrics["parameter_compression"] for r in members],
                           [100 * r.metrics["test_accuracy"] for r in members], marker=markers[label], s=70,
                           color=styles[label]["color"], edgecolors="black", linewidths=0.8, zorder=5,
                           label=f"trained: {label}")
        _compression_axes(ax, f"{model} / {dataset} ({len(members)} sweep{'s' if len(members) > 1 else ''})", "accuracy (%)")
    _legends_right(fig, axes)
    save_figure(fig, path)


def _compression_axes(ax, title: str, ylabel: str) -> None:
    """Title, labels and grid of a panel of accuracy against parameter compression."""
    ax.set_title(title)
    ax.set_xlabel("parameter compression (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_runs(runs: Sequence[RunResult], path: str | os.PathLike) -> None:
    """Test accuracy against parameter compression of training runs: one point per run,
    one marker shape per method in its method's colour (:func:`_styles`), one panel per
    (model, data set); a cross marks each method's mean."""
    groups = group_runs(runs)
    panels = _panels(groups.items(), lambda item: (item[0][1], item[0][0]))
    fig, axes = _grid(len(panels))
    labels = sorted({k[2] for k in groups}, key=method_order)
    styles = _styles(labels)
    markers = {label: _RUN_MARKERS[i % len(_RUN_MARKERS)] for i, label in enumerate(labels)}
    for ax, ((model, dataset), items) in zip(axes, panels.items()):
        for (_, _, label), members in sorted(items, key=lambda item: method_order(item[0][2])):
            xs = [100 * r.metrics["parameter_compression"] for r in members]
            ys = [100 * r.metrics["test_accuracy"] for r in members]
            ax.scatter(xs, ys, color=styles[label]["color"], marker=markers[label], s=45, alpha=0.8,
                       edgecolors="black", linewidths=0.5, label=f"{label} (n={len(members)})")
            if len(members) > 1:
                ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], color=styles[label]["color"], marker="X", s=90,
                           edgecolors="black")
        _compression_axes(ax, f"{model} / {dataset}", "test accuracy (%)")
    _legends_right(fig, axes)
    save_figure(fig, path)


def plot_widths(runs: Sequence[RunResult], path: str | os.PathLike) -> None:
    """Kept structures per gated layer, mean over seeds: one panel per (model, data set),
    one bar per method in each layer's group (BMRS in colour, baselines grey, a KL variant
    hatched where its method is shown too), the layer's full width as a dashed outline."""
    groups = group_runs(runs)
    panels = _panels(groups.items(), lambda item: (item[0][1], item[0][0]))
    fig, axes = _grid(len(panels), width=6.5)
    labels = sorted({k[2] for k in groups}, key=method_order)
    styles = _styles(labels)
    for ax, ((model, dataset), items) in zip(axes, panels.items()):
        items = sorted(items, key=lambda item: method_order(item[0][2]))
        layers = sorted({name for _, members in items for r in members for name in r.metrics.get("kept", {})}, key=natural_key)
        width = 0.8 / max(len(items), 1)
        for i, ((_, _, label), members) in enumerate(items):
            means, totals = [], []
            for name in layers:
                values = [r.metrics["kept"][name] for r in members if name in r.metrics.get("kept", {})]
                full = [r.metrics.get("structures", {}).get(name) for r in members]
                full = [f for f in full if f is not None]
                means.append(sum(values) / len(values) if values else 0.0)
                totals.append(sum(full) / len(full) if full else 0.0)
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(layers))]
            variant = base_label(label) != label and base_label(label) in labels
            ax.bar(xs, means, width=width, color=styles[label]["color"], label=label, edgecolor="white",
                   hatch="///" if variant else None)
            ax.bar(xs, totals, width=width, fill=False, edgecolor="grey", linestyle="--", linewidth=0.8,
                   label="full width" if i == 0 else None)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center", fontsize=8)
        ax.set_title(f"{model} / {dataset}: kept structures per layer (mean over seeds)")
        ax.set_xlabel("gated layer")
        ax.set_ylabel("kept structures")
        ax.grid(axis="y", alpha=0.3)
    _legends_right(fig, axes)
    save_figure(fig, path)
