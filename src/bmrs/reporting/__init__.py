"""Reports from result files: collecting runs and sweeps, tables, plots.

* :func:`collect` finds run directories (``config.json`` + ``metrics.json``) and sweep
  directories (``sweep.json``) under any paths.
* :func:`summarize` and :func:`results_markdown` average the runs over seeds per
  (data set, model, method) into the results table and its JSON form.
* :func:`plot_sweeps`, :func:`plot_runs` and :func:`plot_widths` draw the figures.
* :func:`write_report` does all of it into a directory (what ``bmrs report`` calls).
"""

from .collect import Collection, RunResult, SweepResult, collect, method_label
from .plots import plot_runs, plot_sweeps, plot_widths
from .report import Report, write_report
from .tables import format_mean_std, group_runs, mean_std, results_markdown, summarize

__all__ = [
    "Collection", "Report", "RunResult", "SweepResult", "collect", "format_mean_std", "group_runs",
    "mean_std", "method_label", "plot_runs", "plot_sweeps", "plot_widths", "results_markdown",
    "summarize", "write_report",
]
