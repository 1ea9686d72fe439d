"""Writing a report directory: results.md, results.json and the plots; optionally the
comparison with the paper and the knee analysis of the sweeps."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .._io import write_json, write_text
from ..errors import BMRSError
from .collect import Collection, collect
from .knees import write_knees
from .paper import PAPER_FILES, compare, comparison_markdown, paper_table, write_paper_json
from .plots import plot_runs, plot_sweeps, plot_widths
from .tables import config_differences, group_runs, results_markdown, summarize

__all__ = ["Report", "write_report"]

#: File names inside a report directory.
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
ACCURACY_PLOT = "accuracy_vs_compression.png"
WIDTHS_PLOT = "widths.png"
COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
KNEES_MD = "knees.md"
KNEES_JSON = "knees.json"


@dataclass
class Report:
    """What :func:`write_report` wrote: the files, the table, the summary and any notes."""

    out_dir: Path
    files: dict[str, Path]
    markdown: str
    summary: dict
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    sweeps: int = 0


def write_report(source, out_dir: str | os.PathLike, *, paper: str | None = None, analysis: bool = False) -> Report:
    """Summarise runs and sweeps into ``out_dir``.

    Args:
        source: a :class:`~bmrs.reporting.collect.Collection`, or paths for
            :func:`~bmrs.reporting.collect.collect` (run, sweep or suite directories).
        out_dir: the report directory (created if needed).
        paper: a data set with published numbers (``"fashion-mnist"``, ``"mnist"``, see
            :data:`~bmrs.reporting.paper.PAPER_TABLES`): also write ``comparison.md`` and
            ``comparison.json`` (:func:`~bmrs.reporting.paper.compare`) and our summary of
            that data set's runs as ``paper-fmnist.json`` (``paper-mnist.json``).
        analysis: also write the knee analysis of the sweeps (``knees.md``, ``knees.json``,
            when there are sweeps; :mod:`bmrs.reporting.knees`). The gate diagnostics of
            trained runs need their models rebuilt and are written by
            :func:`bmrs.experiments.analysis.diagnose_runs` (``bmrs reproduce`` does both).

    Writes ``results.md`` (the table of :func:`~bmrs.reporting.tables.results_markdown`),
    ``results.json`` (:func:`~bmrs.reporting.tables.summarize`), ``accuracy_vs_compression.png``
    (from the sweeps if there are any, with the training runs of the same models as
    diamonds; else from the training runs alone) and, when there are
    training runs, ``widths.png`` (kept structures per layer). Every file is written to a
    temporary name first and then renamed.

    Raises:
        ValueError: if there is no complete run and no sweep to report, or ``paper`` has no
            published numbers.
    """
    if paper is not None:
        paper_table(paper)  # fail on an unknown data set before anything is written
    collection = source if isinstance(source, Collection) else collect(source)
    if not collection.runs and not collection.sweeps:
        detail = f" ({'; '.join(collection.skipped)})" if collection.skipped else ""
        raise BMRSError(f"nothing to report: no complete runs or sweeps{detail}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(collection.skipped)
    for key, members in sorted(group_runs(collection.runs).items()):
        differing = config_differences(members)
        if differing:
            notes.append(f"{key[2]} on {key[1]} / {key[0]} averages runs that differ in {', '.join(differing)}")
    files: dict[str, Path] = {}
    plots = []
    if collection.sweeps:
        plot_sweeps(collection.sweeps, out / ACCURACY_PLOT, collection.runs)
    else:
        plot_runs(collection.runs, out / ACCURACY_PLOT)
    files["accuracy_plot"] = out / ACCURACY_PLOT
    plots.append(ACCURACY_PLOT)
    if collection.runs:
        plot_widths(collection.runs, out / WIDTHS_PLOT)
        files["widths_plot"] = out / WIDTHS_PLOT
        plots.append(WIDTHS_PLOT)
    summary = summarize(collection.runs)
    write_json(summary, out / RESULTS_JSON)
    files["json"] = out / RESULTS_JSON
    markdown = results_markdown(collection.runs, collection.sweeps, plots=plots)
    write_text(out / RESULTS_MD, markdown)
    files["markdown"] = out / RESULTS_MD
    if paper is not None:
        files.update(_write_comparison(collection, out, paper))
    if analysis and collection.sweeps:
        write_knees(collection.sweeps, out)
        files["knees"] = out / KNEES_MD
        files["knees_json"] = out / KNEES_JSON
    return Report(out, files, markdown, summary, notes, len(collection.runs), len(collection.sweeps))


def _write_comparison(collection: Collection, out: Path, dataset: str) -> dict[str, Path]:
    stem = PAPER_FILES.get(dataset, f"paper-{dataset}")
    summary = write_paper_json(collection.runs, out / f"{stem}.json", dataset)
    write_json(compare(summary, dataset), out / COMPARISON_JSON)
    write_text(out / COMPARISON_MD, comparison_markdown(summary, dataset))
    return {"paper_json": out / f"{stem}.json", "comparison_json": out / COMPARISON_JSON,
            "comparison": out / COMPARISON_MD}

