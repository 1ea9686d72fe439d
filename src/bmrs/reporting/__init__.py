"""Reports from result files: collecting runs and sweeps, tables, plots.

* :func:`collect` finds run directories (``config.json`` + ``metrics.json``) and sweep
  directories (``sweep.json``) under any paths.
* :func:`summarize` and :func:`results_markdown` average the runs over seeds per
  (data set, model, method) into the results table and its JSON form.
* :func:`plot_sweeps`, :func:`plot_runs` and :func:`plot_widths` draw the figures.
* :func:`write_report` does all of it into a directory (what ``bmrs report`` calls); with
  ``paper=`` it adds the comparison with the paper's published numbers
  (:mod:`bmrs.reporting.paper`), with ``analysis=True`` the knee analysis of the sweeps
  (:mod:`bmrs.reporting.knees`).
* :func:`write_diagnostics` writes the gate diagnostics of trained runs
  (:mod:`bmrs.reporting.diagnostics`), computed by :mod:`bmrs.experiments.analysis`.

Reporting reads result files (through :mod:`bmrs.rundir`, which knows what a run directory
holds and upgrades files of earlier versions) and the diagnostics handed to it; it imports
nothing from :mod:`bmrs.experiments`.
"""

from .collect import Collection, RunResult, SweepResult, collect, method_label
from .diagnostics import RunDiagnostics, write_diagnostics
from .knees import knee_analysis, write_knees
from .paper import PAPER_TABLES, compare, comparison_markdown, paper_summary, paper_table, write_paper_json
from .plots import plot_runs, plot_sweeps, plot_widths
from .report import Report, write_report
from .tables import format_mean_std, group_runs, mean_std, results_markdown, summarize

__all__ = [
    "Collection", "PAPER_TABLES", "Report", "RunResult", "SweepResult", "collect", "compare", "comparison_markdown",
    "format_mean_std", "group_runs", "knee_analysis", "mean_std", "method_label", "paper_summary", "paper_table",
    "plot_runs", "plot_sweeps", "plot_widths", "results_markdown", "RunDiagnostics", "summarize",
    "write_diagnostics", "write_knees", "write_paper_json", "write_report",
]
