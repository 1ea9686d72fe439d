"""The paper's published numbers, and our results set beside them.

:data:`PAPER_TABLES` holds Table 1 of Wright, Igel and Selvan (NeurIPS 2024) for
Fashion-MNIST (and the few MNIST numbers the paper quotes), in the shape
:func:`~bmrs.reporting.tables.summarize` gives our runs:
``{model: {method: {"param_compression": [mean, std], "accuracy": [mean, std], "seeds": n}}}``
in percent, where a standard deviation the paper does not give is ``None``.

The paper's BMRS_N row was produced by its released code, whose delta F is the exact one
plus 1/2 log 2 pi (docs/math.md, "Relaxed gates and ties"). Its like-for-like counterpart is our
``bmrs-n-code``; our exact ``bmrs-n`` is compared with the same row, to show what the exact
criterion changes (:data:`PAPER_ROW`).

* :func:`paper_summary` / :func:`write_paper_json`: our summary for one data set
  (``paper-fmnist.json``).
* :func:`compare` / :func:`comparison_markdown`: ours, the paper's and the differences.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from .._io import write_json
from ..errors import BMRSError
from ..pruning.criteria import default_labels
from .collect import RunResult, base_label
from .tables import format_mean_std, method_order, summarize

__all__ = [
    "PAPER_TABLES", "PAPER_ROW", "PAPER_ROW_NAMES", "PAPER_FILES", "SUITE_PAPERS", "comparison_methods",
    "paper_table", "paper_summary", "write_paper_json", "compare", "comparison_markdown",
]


def _entry(comp: float, comp_std: float | None, acc: float, acc_std: float | None, seeds: int = 10) -> dict:
    return {"param_compression": [comp, comp_std], "accuracy": [acc, acc_std], "seeds": seeds}


#: Published numbers per data set, model and method label (percent; std None where not given).
#: Fashion-MNIST: Table 1 (continuous pruning, 10 seeds). MNIST: the numbers the paper quotes
#: in its text (Wright, Igel and Selvan, NeurIPS 2024), without spreads (docs/math.md, "The
#: paper's reported numbers").
PAPER_TABLES: dict[str, dict[str, dict[str, dict]]] = {
    "fashion-mnist": {
        "mlp": {
            "none": _entry(0.0, None, 88.17, 0.20),
            "l2": _entry(87.86, None, 18.23, None),
            "etheta": _entry(91.76, None, 85.59, None),
            "snr": _entry(99.83, None, 10.00, None),
            "bmrs-n": _entry(93.20, 0.66, 84.99, 0.35),
            "bmrs-u8": _entry(93.02, 0.81, 85.01, 0.32),
            "bmrs-u4": _entry(91.57, 0.71, 85.79, 0.34),
        },
        "lenet5": {
            "none": _entry(0.0, None, 89.16, 0.27),
            "l2": _entry(83.62, None, 10.00, None),
            "etheta": _entry(89.71, None, 50.93, None),
            "snr": _entry(98.47, None, 17.01, None),
            "bmrs-n": _entry(88.02, 1.00, 77.90, 2.44),
            "bmrs-u8": _entry(87.61, 0.72, 77.23, 3.49),
            "bmrs-u4": _entry(88.72, 0.73, 81.10, 1.50),
        },
    },
    "mnist": {
        "mlp": {
            "none": _entry(0.0, None, 97.43, None),
            "bmrs-n": _entry(48.86, None, 96.95, None),
        },
        "lenet5": {
            "none": _entry(0.0, None, 99.07, None),
            "bmrs-n": _entry(86.90, None, 95.59, None),
            "bmrs-u4": _entry(87.58, None, 96.66, None),
        },
    },
}

#: Our label -> the paper's row it is compared with (every other label: its own row).
#: The paper's BMRS_N came from the code's criterion, so both our BMRS_N variants meet it.
PAPER_ROW: dict[str, str] = {"bmrs-n-code": "bmrs-n"}

#: How the paper names its rows.
PAPER_ROW_NAMES: dict[str, str] = {
    "none": "None", "l2": "L2 (matched)", "etheta": "E[θ] < 0.1", "snr": "SNR < 1",
    "bmrs-n": "BMRS_N", "bmrs-u8": "BMRS_U-8", "bmrs-u4": "BMRS_U-4",
}

#: File stem of our summary per data set (``paper-fmnist.json``).
PAPER_FILES: dict[str, str] = {"fashion-mnist": "paper-fmnist", "mnist": "paper-mnist"}

#: Suite of ``bmrs reproduce`` -> the data set whose published numbers it reproduces.
SUITE_PAPERS: dict[str, str] = {"paper-fmnist": "fashion-mnist"}


def _published() -> list[str]:
    """The paper's row labels, in its order, over all data sets."""
    return list(dict.fromkeys(label for models in PAPER_TABLES.values() for rows in models.values() for label in rows))


def comparison_methods() -> tuple[str, ...]:
    """Rows of the comparison, in order: the published rows of no pruning and the ranking
    baselines (in the paper's order), then the default labels of every evidence criterion;
    other labels present follow, in the results' order."""
    evidence = default_labels(evidence_based=True)
    return (*(label for label in _published() if label not in evidence), *evidence)


def _unpublished() -> list[str]:
    """The evidence criteria's labels without a published row (neither their own nor one
    :data:`PAPER_ROW` sets them against)."""
    published = set(_published())
    return [label for label in default_labels(evidence_based=True) if PAPER_ROW.get(label, label) not in published]


def paper_table(dataset: str) -> dict[str, dict[str, dict]]:
    """The published numbers for ``dataset`` (a copy), shaped like :func:`summarize`'s output.

    Raises:
        ValueError: no published numbers for ``dataset``.
    """
    if dataset not in PAPER_TABLES:
        raise BMRSError(f"no published numbers for data set {dataset!r}; choose from {', '.join(PAPER_TABLES)}")
    return {model: {label: {k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}
                    for label, entry in rows.items()}
            for model, rows in PAPER_TABLES[dataset].items()}


def paper_summary(runs: Iterable[RunResult], dataset: str = "fashion-mnist") -> dict:
    """:func:`~bmrs.reporting.tables.summarize` of the runs on ``dataset`` only, so its keys
    are plain model names: ``{model: {label: {"param_compression": [mean, std],
    "accuracy": [mean, std], "seeds": n}}}`` in percent, for every label with runs."""
    return summarize([r for r in runs if r.dataset == dataset])


def write_paper_json(runs: Iterable[RunResult], path: str | os.PathLike, dataset: str = "fashion-mnist") -> dict:
    """Write :func:`paper_summary` to ``path`` (atomically) and return it."""
    summary = paper_summary(runs, dataset)
    write_json(summary, path)
    return summary


def _rows(labels: Iterable[str], methods: Sequence[str]) -> list[str]:
    extra = sorted(set(labels) - set(methods), key=method_order)
    return list(methods) + extra


def _models(ours: dict, paper: dict) -> list[str]:
    return list(paper) + sorted(set(ours) - set(paper))


def compare(summary: dict, dataset: str = "fashion-mnist", *, methods: Sequence[str] | None = None) -> dict:
    """Our summary beside the published numbers.

    Args:
        summary: ``{model: {label: {...}}}`` as :func:`paper_summary` returns it.
        dataset: whose published numbers to use (:data:`PAPER_TABLES`).
        methods: the rows always shown, in order (default :func:`comparison_methods`); other
            labels of ``summary`` follow.

    Returns ``{model: {label: {"ours": entry or None, "paper": entry or None, "paper_row":
    the paper's row label or None, "difference": {"param_compression": d, "accuracy": d}
    or None}}}`` with ``d`` = our mean − the paper's, in percentage points.
    """
    paper = paper_table(dataset)
    methods = comparison_methods() if methods is None else methods
    out: dict[str, dict] = {}
    for model in _models(summary, paper):
        ours_rows, paper_rows = summary.get(model, {}), paper.get(model, {})
        out[model] = {}
        for label in _rows(ours_rows, methods):
            ours = ours_rows.get(label)
            base = base_label(label)
            row = PAPER_ROW.get(base, base)
            published = paper_rows.get(row)
            difference = None
            if ours is not None and published is not None:
                difference = {key: ours[key][0] - published[key][0] for key in ("param_compression", "accuracy")}
            out[model][label] = {"ours": ours, "paper": published, "paper_row": row if published else None,
                                 "difference": difference}
    return out


def _paper_cell(pair: list) -> str:
    mean, std = pair
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _signed(value: float) -> str:
    return "0.00" if abs(value) < 5e-3 else f"{value:+.2f}"


def comparison_markdown(summary: dict, dataset: str = "fashion-mnist", *, methods: Sequence[str] | None = None) -> str:
    """The comparison of :func:`compare` as Markdown: one table per model, rows = methods.

    Columns: our parameter compression and test accuracy (mean ± std over seeds, percent),
    the number of seeds n, the paper's compression and accuracy (with its std where it gives
    one), and the differences ours − paper in percentage points. "—" marks a number that
    does not exist (no runs of ours, or no published number).
    """
    table = compare(summary, dataset, methods=methods)
    unpublished = _unpublished()
    lines = [
        f"# Comparison with the paper ({dataset})",
        "",
        "Ours: mean ± standard deviation over n seeds. Paper: Wright, Igel & Selvan, \"BMRS: Bayesian Model "
        "Reduction for Structured Pruning\", NeurIPS 2024"
        + (", Table 1 (10 seeds; ± where the paper gives a spread)" if dataset == "fashion-mnist" else
           " (numbers quoted in its text)")
        + ". Comp. = % of trainable parameters removed, Acc. = test accuracy (%). "
        "Δ = ours − paper, in percentage points.",
        "",
        "The paper's BMRS_N row was produced by its released code, whose delta F is the exact one "
        "plus ½ log 2π ≈ 0.919 nats; that criterion is our `bmrs-n-code`, the like-for-like row. "
        "Our exact `bmrs-n` (the paper's Eq. 8) is set against the same row; "
        + " and ".join(", ".join(f"`{label}`" for label in unpublished).rsplit(", ", 1))
        + " (our threshold-free treatments of ties) have no published counterpart. A label "
        "ending in `+kl-structures` is a run with the KL weighted per structure instead of the "
        "paper's per-layer mean, set against the paper's row of its method.",
        "",
    ]
    dash = "—"
    for model, rows in table.items():
        lines += [f"## {model}", ""]
        header = ["method", "Comp. ours", "Acc. ours", "n", "paper row", "Comp. paper", "Acc. paper", "Δ Comp.", "Δ Acc."]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for label, cell in rows.items():
            ours, published, diff = cell["ours"], cell["paper"], cell["difference"]
            row = [f"`{label}`"]
            if ours is not None:
                n = ours["seeds"]
                row += [format_mean_std(*ours["param_compression"], n), format_mean_std(*ours["accuracy"], n), str(n)]
            else:
                row += [dash, dash, "0"]
            if published is not None:
                row += [PAPER_ROW_NAMES.get(cell["paper_row"], cell["paper_row"]),
                        _paper_cell(published["param_compression"]), _paper_cell(published["accuracy"])]
            else:
                row += [dash, dash, dash]
            if diff is not None:
                row += [_signed(diff["param_compression"]), _signed(diff["accuracy"])]
            else:
                row += [dash, dash]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
