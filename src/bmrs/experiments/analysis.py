"""Analyses of results: knees of accuracy-vs-compression curves, and what the gates hold.

* :func:`knee` finds the knee of a post-training curve with the Kneedle method
  (Satopaa et al., 2011): normalise both axes to [0, 1], and take the point of the curve
  farthest above the chord joining its ends (the maximum of Kneedle's difference curve).
* :func:`stop_vs_knee` reports, for each BMRS stopping point, its distance to the knee of
  every criterion's curve and to the best accuracy any criterion reaches at that compression.
* :func:`gate_diagnostics` lists, per gate and structure, the posterior (mu, log sigma),
  E[theta], SNR, the delta F and margin of every evidence criterion, and which criteria prune it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..gates import gates
from ..pruning.criteria import Criterion, default_labels, make_criterion, parse_label
from ..pruning.masks import decide

__all__ = ["knee", "curves_from_sweep", "stop_vs_knee", "gate_diagnostics", "interpolate_accuracy"]


def knee(compression: Sequence[float], accuracy: Sequence[float], *, grid: int = 1001) -> tuple[float, float]:
    """The knee ``(compression, accuracy)`` of an accuracy-vs-compression curve (Kneedle).

    The curve is interpolated linearly on a fine grid between the measured points (sorted by
    compression; repeated compressions are averaged). Accuracy is assumed to fall with
    compression (a concave, decreasing curve): the knee is where the normalised curve lies
    farthest above the straight line from its first to its last point, i.e. where further
    compression starts to cost accuracy fast.
    """
    x, y = _clean(compression, accuracy)
    if len(x) < 3:
        raise ValueError("a knee needs at least three distinct compression levels")
    xs = np.linspace(x[0], x[-1], grid)
    ys = np.interp(xs, x, y)
    xn = (xs - xs[0]) / (xs[-1] - xs[0])
    span = ys.max() - ys.min()
    yn = (ys - ys.min()) / span if span > 0 else np.zeros_like(ys)
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    i = int(np.argmax(yn - chord))
    return float(xs[i]), float(ys[i])


def _clean(compression, accuracy) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(compression, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    ux = np.unique(x)
    uy = np.array([y[x == v].mean() for v in ux])
    return ux, uy


def interpolate_accuracy(compression: Sequence[float], accuracy: Sequence[float], at: float) -> float | None:
    """Accuracy of a curve at compression ``at`` (linear interpolation; None outside it)."""
    x, y = _clean(compression, accuracy)
    if len(x) == 0 or at < x[0] - 1e-12 or at > x[-1] + 1e-12:
        return None
    return float(np.interp(at, x, y))


def curves_from_sweep(records: list[dict]) -> dict[str, dict]:
    """Group sweep records by criterion: ``{name: {"levels": (comp, acc), "stop": (comp, acc)}}``
    with compressions and accuracies as arrays (parameter compression)."""
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(r["criterion"], {"compression": [], "accuracy": [], "stop": None})
        if r["kind"] == "stop":
            entry["stop"] = (r["parameter_compression"], r["accuracy"])
        else:
            entry["compression"].append(r["parameter_compression"])
            entry["accuracy"].append(r["accuracy"])
    return out


def stop_vs_knee(records: list[dict], stops: Sequence[str]) -> dict[str, dict]:
    """For each criterion in ``stops`` with a stopping point: its distance to every curve's knee
    and to the best accuracy any criterion's curve reaches at the same compression.

    Returns ``{stop criterion: {"stop": [comp, acc], "knees": {criterion: {"knee": [comp, acc],
    "d_compression": stop - knee, "d_accuracy": stop - knee}}, "best_at_stop": [criterion, acc],
    "d_best": stop accuracy - best}}``.
    """
    curves = curves_from_sweep(records)
    knees = {}
    for name, c in curves.items():
        if len(set(c["compression"])) >= 3:
            knees[name] = knee(c["compression"], c["accuracy"])
    result = {}
    for name in stops:
        stop = curves.get(name, {}).get("stop")
        if stop is None:
            continue
        comp, acc = stop
        best_name, best = None, -np.inf
        for other, c in curves.items():
            value = interpolate_accuracy(c["compression"], c["accuracy"], comp)
            if value is not None and value > best:
                best_name, best = other, value
        result[name] = {
            "stop": [comp, acc],
            "knees": {
                other: {"knee": list(k), "d_compression": comp - k[0], "d_accuracy": acc - k[1]}
                for other, k in knees.items()
            },
            "best_at_stop": [best_name, float(best)],
            "d_best": float(acc - best),
        }
    return result


def gate_diagnostics(model: nn.Module, criteria: dict[str, Criterion] | None = None) -> list[dict]:
    """One record per gated structure: gate, index, mu, log sigma, E[theta], SNR; for every
    evidence criterion in ``criteria`` its delta F (``delta_f[label]``, the true value under
    its reduced prior) and its margin (``margin[label]``); and per criterion whether it
    prunes the structure (``pruned[label]``). ``criteria`` default: every evidence
    criterion's default labels."""
    if criteria is None:
        criteria = {}
        for label in default_labels(evidence_based=True):
            name, options = parse_label(label)
            criteria[label] = make_criterion(name, **options)
    decisions = {name: decide(model, c) for name, c in criteria.items()}
    evidence = {label: c for label, c in criteria.items() if c.evidence_based}
    records = []
    for name, gate in gates(model).items():
        q = gate.posterior(torch.float64)
        delta = {label: c.delta_f(gate) for label, c in evidence.items()}
        margin = {label: torch.as_tensor(c.gate_margin(gate), dtype=torch.float64).expand(gate.num_structures)
                  for label, c in evidence.items()}
        mean, snr = q.mean, q.snr
        for i in range(gate.num_structures):
            record = {
                "gate": name, "index": i,
                "mu": float(gate.loc[i]), "log_sigma": float(gate.log_scale[i]),
                "e_theta": float(mean[i]), "snr": float(snr[i]),
            }
            record.update({f"delta_f[{label}]": float(d[i]) for label, d in delta.items()})
            record.update({f"margin[{label}]": float(m[i]) for label, m in margin.items()})
            record.update({f"pruned[{c}]": not bool(keep[name][i]) for c, keep in decisions.items()})
            records.append(record)
    return records
