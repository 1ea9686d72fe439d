"""Analyses of trained runs: what their gates hold, and which criteria would prune it.

* :func:`gate_diagnostics` lists, per gate and structure, the posterior (mu, log sigma),
  E[theta], SNR, the delta F and margin of every evidence criterion, and which criteria prune it.
* :func:`run_diagnostics` rebuilds a run's gated model and gives its diagnostics as a
  :class:`~bmrs.reporting.diagnostics.RunDiagnostics`; :func:`diagnose_runs` does so for
  several runs (noting the ones it cannot rebuild) and writes them with
  :func:`bmrs.reporting.diagnostics.write_diagnostics`.

* :func:`explain_run` gives the evidence behind a run's decisions (optionally after a
  budget) and the calibration of its unpruned, gated and compacted models and of the gates'
  Monte Carlo predictive (``bmrs explain``).

The knees of accuracy-vs-compression curves need sweep records only and live with the
reports (:mod:`bmrs.reporting.knees`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..calibration import DEFAULT_DRAWS, model_calibration
from ..compaction import compact
from ..errors import BMRSError
from ..gates import gates, layer_names
from ..pruning import RECOMMENDED, explain, parse_budget, prune
from ..pruning.criteria import Criterion, criterion_class, default_labels, make_criterion, parse_label
from ..pruning.masks import decide
from ..reporting.collect import RunResult, method_label
from ..reporting.diagnostics import RELAXED_LOG_SIGMA, RunDiagnostics, diagnostic_criteria, write_diagnostics
from .runs import load_run, run_files

__all__ = ["gate_diagnostics", "run_diagnostics", "diagnose_runs", "explain_run", "evidence_criterion"]


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
    decisions = {name: decide(model, c, keep_pruned=False) for name, c in criteria.items()}  # from the scores alone
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


def _criteria() -> dict[str, Criterion]:
    """The criteria of :func:`~bmrs.reporting.diagnostics.diagnostic_criteria`, by label."""
    return {label: make_criterion(name, **options) for label in diagnostic_criteria() for name, options in [parse_label(label)]}


def run_diagnostics(run_dir: str | os.PathLike, *, relaxed_at: float = RELAXED_LOG_SIGMA) -> RunDiagnostics:
    """Rebuild the gated model of ``run_dir`` (:func:`~bmrs.experiments.runs.load_run`) and
    evaluate every criterion of :func:`~bmrs.reporting.diagnostics.diagnostic_criteria` on
    its gates (:func:`gate_diagnostics`).

    Raises:
        FileNotFoundError, ValueError: not a run directory with a model, as ``load_run`` says.
    """
    loaded = load_run(run_dir)
    run_dir, _ = run_files(run_dir)
    config = asdict(loaded.config)
    model = loaded.model
    with torch.no_grad():
        records = gate_diagnostics(model, _criteria())
        named = gates(model)
        extra = {name: (gate.mask.tolist(), gate.log_scale_bounds) for name, gate in named.items()}
    layer = layer_names(model)  # the names printed: the layer each gate prunes
    for r in records:
        mask, bounds = extra[r["gate"]]
        r["gate"] = layer[r["gate"]]
        i = r["index"]
        r["log_sigma_clamped"] = min(max(r["log_sigma"], bounds[0]), bounds[1])
        r["masked"] = mask[i] == 0
        r["relaxed"] = r["log_sigma_clamped"] >= relaxed_at
    return RunDiagnostics(
        path=run_dir, dataset=config["dataset"], model=config["model"], label=method_label(config),
        seed=config["seed"],
        layers=[layer[name] for name in named],
        log_sigma_max={layer[name]: g.log_scale_bounds[1] for name, g in named.items()},
        records=records, relaxed_at=relaxed_at,
    )


def diagnose_runs(runs: Iterable, out_dir: str | os.PathLike, *, relaxed_at: float = RELAXED_LOG_SIGMA,
                  plots: bool = True) -> tuple[list[RunDiagnostics], dict[str, Path], list[str]]:
    """Gate diagnostics of ``runs`` (run directories or :class:`~bmrs.reporting.collect.RunResult`),
    written into ``out_dir`` by :func:`bmrs.reporting.diagnostics.write_diagnostics`.

    A run whose model cannot be rebuilt (no ``model.pt``, a config it does not fit) is left
    out with a note. Returns the diagnostics, the files written and the notes.
    """
    diagnostics, notes = [], []
    for run in runs:
        path = run.path if isinstance(run, RunResult) else Path(run)
        try:
            diagnostics.append(run_diagnostics(path, relaxed_at=relaxed_at))
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            notes.append(f"diagnostics: {path} skipped ({' '.join(str(err).split())[:200]})")
    files = write_diagnostics(diagnostics, out_dir, plots=plots)
    return diagnostics, files, notes


def evidence_criterion(config, name: str | None = None) -> Criterion:
    """The evidence criterion that explains a run: ``name`` (a label such as ``bmrs-u8``),
    else the run's method when it is an evidence criterion, else the recommended one."""
    if name is None:
        method = config.method
        if method == "bmrs-u":
            name = f"bmrs-u{config.bits:g}"
        elif method != "none" and criterion_class(method).evidence_based:
            name = method
        else:
            name = RECOMMENDED["method"]
    base, options = parse_label(name)
    criterion = make_criterion(base, **options)
    if not criterion.evidence_based:
        raise BMRSError(f"{name} is not an evidence criterion: only BMRS criteria have a delta F to explain")
    return criterion


def explain_run(path: str | os.PathLike, *, criterion: str | None = None, budget: str | None = None,
                draws: int = DEFAULT_DRAWS, split: str = "test", data_dir=None) -> dict:
    """The evidence report of a run (``bmrs explain``): per layer, the evidence of its
    decisions under ``criterion`` (:func:`evidence_criterion`); with ``budget``
    (``"flops=0.5"``), first pruned further until the budget holds, in the order of the
    evidence, and what that cost; and the calibration of :func:`model_calibration` on the
    ``split`` set. A dict of plain values (what ``explain.json`` holds) plus ``"table"``."""
    loaded = load_run(path, data_dir, need_data=True)
    run_dir, _ = run_files(path)
    model, data = loaded.model, loaded.data
    chosen = evidence_criterion(loaded.config, criterion)
    result = {"run": str(run_dir), "split": split, "criterion": repr(chosen)}
    if budget is not None:
        outcome = prune(model, chosen, budget=parse_budget(budget), example_input=loaded.example[:1], keep_pruned=True)
        result["budget"] = {"budget": outcome.budget, "summary": outcome.summary(), "evidence_pruned": outcome.evidence_pruned,
                            "budget_pruned": outcome.budget_pruned, "pruned": outcome.pruned, "kept": outcome.kept}
    report = explain(model, chosen)
    result["evidence"] = report.summary()
    result["table"] = report.table()
    result["layers"] = [asdict(e) for e in report.layers]
    dataset = data.test if split == "test" else data.val
    loader = torch.utils.data.DataLoader(dataset, batch_size=1000)
    result["calibration"] = model_calibration(model, loader, compact(model, loaded.example), draws=draws)
    return result
