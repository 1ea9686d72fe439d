"""The evidence report of a run (``bmrs explain``): its Markdown, its figures and its JSON.

It renders what :func:`bmrs.experiments.analysis.explain_run` computed: the per-layer
evidence (:class:`bmrs.pruning.EvidenceReport`), what a budget forced against it, and the
calibration of the unpruned, the gated, the compacted model and the gates' Monte Carlo
predictive (:mod:`bmrs.calibration`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from .._io import write_json, write_text
from .plots import save_figure

__all__ = ["CALIBRATION_ROWS", "evidence_markdown", "plot_evidence", "plot_reliability", "write_evidence"]

#: The models whose calibration is reported, in order, with their labels.
CALIBRATION_ROWS = {
    "unpruned": "unpruned (the same gates, nothing masked)",
    "gated": "pruned, gated (E[theta] x mask)",
    "compacted": "pruned, compacted",
    "predictive": "pruned, Monte Carlo predictive (theta sampled)",
}


def _symlog_threshold(values: np.ndarray) -> float:
    """A linear range for the symmetric-log axis: the ambiguous band (1 nat) shows linearly."""
    return 1.0 if values.size == 0 else float(min(1.0, max(np.abs(values).max(), 1e-3)))


def plot_evidence(layers: list[dict], margin_label: str, path: str | os.PathLike) -> None:
    """One panel per layer: its structures' ΔF − margin, sorted, kept and removed told apart,
    the margin (0) drawn and the ambiguous band (|ΔF − margin| < 1 nat) shaded."""
    n = len(layers)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), layout="constrained")
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = np.asarray(layer["delta_f_minus_margin"], dtype=float)
        kept = np.asarray(layer["kept_mask"], dtype=bool)
        order = np.argsort(values)
        x = np.arange(1, len(values) + 1)
        ax.axhspan(-1.0, 1.0, color="0.9", zorder=0, label="ambiguous (< 1 nat)")
        ax.axhline(0.0, color="0.3", linewidth=1.0, zorder=1, label=f"margin of {margin_label}")
        for mask, colour, label in ((kept[order], "tab:blue", "kept"), (~kept[order], "tab:red", "removed")):
            ax.scatter(x[mask], values[order][mask], s=8, color=colour, label=label, zorder=2)
        ax.set_yscale("symlog", linthresh=_symlog_threshold(values))
        ax.set_title(f"{layer['layer']}: kept {layer['kept']}/{layer['total']}, ambiguous {layer['ambiguous']}",
                     fontsize=9)
        ax.set_xlabel("structures, sorted by ΔF − margin", fontsize=8)
        ax.set_ylabel("ΔF − margin (nats; ≥ 0: evidence to remove)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right", frameon=False)
    save_figure(fig, path)


def plot_reliability(calibration: dict, path: str | os.PathLike) -> None:
    """The reliability diagram of each model in ``calibration`` (accuracy against confidence
    per bin, the diagonal for perfect calibration, bar widths by the bin's share of examples)."""
    names = [k for k in CALIBRATION_ROWS if k in calibration]
    fig = Figure(figsize=(3.6 * len(names), 3.6), layout="constrained")
    for i, name in enumerate(names):
        c = calibration[name]
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1.0)
        bins = [b for b in c["bins"] if b["count"]]
        total = sum(b["count"] for b in bins)
        ax.bar([(b["lower"] + b["upper"]) / 2 for b in bins], [b["accuracy"] for b in bins],
               width=[(b["upper"] - b["lower"]) * 0.9 for b in bins], edgecolor="tab:blue",
               color=[(*to_rgb("tab:blue"), 0.2 + 0.8 * b["count"] / total) for b in bins])
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=10, color="black", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{CALIBRATION_ROWS[name]}\nECE {100 * c['ece']:.2f} %, NLL {c['nll']:.3f}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
        if i == 0:
            ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    save_figure(fig, path)


def _calibration_table(calibration: dict) -> str:
    rows = ["| model | accuracy | NLL (nats) | ECE (15 bins) |", "|---|---|---|---|"]
    for name, label in CALIBRATION_ROWS.items():
        if name in calibration:
            c = calibration[name]
            extra = f" ({c['draws']} draws)" if "draws" in c else ""
            rows.append(f"| {label}{extra} | {100 * c['accuracy']:.2f} % | {c['nll']:.4f} | {100 * c['ece']:.2f} % |")
    return "\n".join(rows)


def evidence_markdown(result: dict, images: dict[str, str] | None = None) -> str:
    """The report as Markdown: the per-layer evidence, the budget, the calibration."""
    ev = result["evidence"]
    lines = [f"# Evidence of {result['run']}", "",
             f"Criterion {ev['criterion']}; ΔF − margin in nats (≥ 0: the evidence favours removing the structure; "
             f"a decision within {ev['ambiguity_nats']:g} nat of the margin is ambiguous).", "",
             result["table"], "",
             f"The evidence alone removes {ev['evidence_removes']} structures; {ev['ambiguous']} decisions are ambiguous. "
             f"Most over-parameterised by the evidence: {ev['most_overparameterised']}."]
    if result.get("budget"):
        b = result["budget"]
        lines += ["", "## The budget", "", *b["summary"].splitlines(), "",
                  f"Removed against the evidence: {ev['removed_against']} structures; kept beyond it: {ev['kept_beyond']}; "
                  f"evidence spent: {ev['evidence_spent']:.3g} nats (per layer in the table)."]
    lines += ["", f"## Calibration on the {result['split']} set", "", _calibration_table(result["calibration"])]
    for key, caption in (("evidence_plot", "ΔF − margin per structure, sorted, per layer"),
                         ("reliability_plot", "reliability diagrams")):
        if images and key in images:
            lines += ["", f"![{caption}]({images[key]})"]
    return "\n".join(lines) + "\n"


def write_evidence(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``explain.json``, ``explain.md``, ``evidence.png`` and ``reliability.png`` into
    ``out_dir``; the paths by key."""
    out = Path(out_dir)
    files = {"json": out / "explain.json", "markdown": out / "explain.md",
             "evidence_plot": out / "evidence.png", "reliability_plot": out / "reliability.png"}
    plot_evidence(result["layers"], result["evidence"]["criterion"], files["evidence_plot"])
    plot_reliability(result["calibration"], files["reliability_plot"])
    write_json({k: v for k, v in result.items() if k != "table"}, files["json"])
    write_text(files["markdown"], evidence_markdown(result, {k: p.name for k, p in files.items()}))
    return files
