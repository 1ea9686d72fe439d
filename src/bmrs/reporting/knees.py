"""Knees of accuracy-vs-compression curves, and where the BMRS criteria stop on them.

For the post-training sweeps of a model (one per seed): where each evidence criterion stops
(delta F >= its margin) compared with the knee of its own accuracy-vs-compression curve, with the
knee of the best criterion's curve, and with the best accuracy any criterion reaches at the
same compression (:func:`knee_analysis`, :func:`knees_markdown`, :func:`write_knees`).
Knees are found with Kneedle (:func:`knee`, the ``kneed`` package): both axes normalised
to [0, 1], the knee is where the curve, after standing out above the line through its ends,
starts to fall fast. The *best* criterion of a
model is the one whose curve has the highest mean accuracy over the compression range all
curves cover (the area under the curve divided by the range), averaged over the sweeps.
Everything here reads sweep records only.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from kneed import KneeLocator

from .._io import write_json, write_text
from ..errors import BMRSError
from ..pruning.criteria import default_labels
from .collect import SweepResult
from .tables import column_key, format_mean_std, markdown_table, mean_std, method_order

__all__ = [
    "knee_stops", "KNEE_METHOD", "knee", "interpolate_accuracy", "curves_from_sweep", "stop_vs_knee",
    "knee_analysis", "knees_markdown", "write_knees",
]


def knee_stops() -> tuple[str, ...]:
    """The stopping rules analysed: the default labels of the evidence criteria (which stop
    where delta F >= their margin)."""
    return default_labels(evidence_based=True)


#: How knees are found (written into knees.md and knees.json).
KNEE_METHOD = (
    "Kneedle (Satopaa et al., 2011) as the kneed package implements it, on each criterion's "
    "accuracy-vs-parameter-compression curve (KneeLocator(curve='concave', direction='decreasing'), "
    "no smoothing, sensitivity S = 1): both axes are normalised to [0, 1], and the knee is the first "
    "local maximum of the curve's height above the line through its ends that the curve then falls "
    "below by more than S times the mean spacing of the levels; a curve without one has no knee. "
    "The best criterion of a model is the "
    "one with the highest mean accuracy over the compression range every curve covers (area under "
    "the curve / range), averaged over the sweeps."
)


def knee(compression: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float] | None:
    """The knee ``(compression, accuracy)`` of an accuracy-vs-compression curve, or None.

    Kneedle as the ``kneed`` package implements it (``KneeLocator(curve="concave",
    direction="decreasing")``, no smoothing, sensitivity 1): accuracy falls with compression,
    slowly and then fast, and the knee is the first measured point where the normalised curve
    stands out above the line from its first to its last point by more than the sensitivity
    allows, i.e. where further compression starts to cost accuracy fast. Repeated
    compressions are averaged first. None when Kneedle finds no knee (a curve without a bend).
    """
    x, y = _clean(compression, accuracy)
    if len(x) < 3:
        raise BMRSError("a knee needs at least three distinct compression levels")
    locator = KneeLocator(x, y, curve="concave", direction="decreasing")
    if locator.knee is None:
        return None
    return float(locator.knee), float(locator.knee_y)


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
        found = knee(c["compression"], c["accuracy"]) if len(set(c["compression"])) >= 3 else None
        if found is not None:
            knees[name] = found
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


def _curve_auc(compression, accuracy, lo: float, hi: float) -> float:
    """Mean accuracy of a curve over [lo, hi] (trapezoids on the interpolated curve)."""
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
    curves = {name: c for name, c in curves_from_sweep(records).items() if len(set(c["compression"])) >= 3}
    knees = {}
    for name, c in curves.items():
        found = knee(c["compression"], c["accuracy"])
        if found is not None:
            knees[name] = [100 * v for v in found]
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
    three distinct compressions, are left out; a curve's knee is the mean over the sweeps in
    which Kneedle finds one (None if it finds none). ``stops`` defaults to :func:`knee_stops`.
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
        criteria = sorted({c for e in per_sweep for c in e["auc"]}, key=method_order)
        curves = {}
        for c in criteria:
            knees = [e["knees"][c] for e in per_sweep if c in e["knees"]]
            aucs = [e["auc"][c] for e in per_sweep if c in e["auc"]]
            curves[c] = {"knee": _pair([k[0] for k in knees], [k[1] for k in knees]), "auc": _ms(aucs), "n": len(aucs)}
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
            lines += markdown_table(["criterion", "knee Comp.", "knee Acc.", "mean Acc. over range", "n"], rows) + [""]
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
            lines += markdown_table(["criterion", "stop Comp.", "stop Acc.", "own knee (Comp. / Acc.)", "Δ own knee Comp.",
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
