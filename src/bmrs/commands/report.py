"""``bmrs report``: tables and plots from runs and sweeps, written beside nothing a user owns."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .._io import write_text
from ..errors import BMRSError
from ..experiments.analysis import diagnose_runs
from ..reporting import collect, write_report
from ..reporting.diagnostics import select_runs
from ._common import Formatter, out_path, say

# The files of the last report written into a report directory, one relative path per line:
# what a new report there may replace without --force.
_REPORT_MANIFEST = ".bmrs-report"
_MAX_MANIFEST = 2**20  # bytes: a listing of thousands of files

def _listing(manifest: Path) -> set[str]:
    """The files the last report wrote beside ``manifest`` (none if there is no listing)."""
    if not manifest.is_file():
        return set()
    with open(manifest, "rb") as f:
        data = f.read(_MAX_MANIFEST + 1)
    try:
        if len(data) > _MAX_MANIFEST:
            raise ValueError
        return set(data.decode("utf-8").split("\n")) - {""}
    except ValueError:  # too long, or not UTF-8 text
        raise BMRSError(f"{manifest} is not the listing a bmrs report writes; move it away, or choose another --out") from None


def _publish(staged: Path, out: Path, force: bool) -> None:
    """Move the files of ``staged`` into ``out``, refusing (before moving anything) to replace
    a file that no earlier report wrote there, unless ``force``."""
    manifest = out / _REPORT_MANIFEST
    ours = _listing(manifest)
    new = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    foreign = [name for name in new if (out / name).exists() and name not in ours]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BMRSError(f"{out} holds {shown}, which no bmrs report wrote; pass --force to replace them, "
                        "or choose another --out")
    for name in new:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, out / name)
    write_text(manifest, "\n".join(sorted(ours | set(new))) + "\n")


def write_report_dir(paths, out: Path, *, paper: str | None = None, analysis: bool = False, force: bool = False) -> None:
    """Write the report of ``paths`` into ``out``; with ``analysis``, also the knees of the
    sweeps and the gate diagnostics of the lowest-seed run of each diagnosed method. The
    report is written aside first and then moved in, so that it never replaces a file that
    no earlier report wrote there (unless ``force``)."""
    collection = collect(paths)
    if out.exists() and not out.is_dir():
        raise BMRSError(f"--out {out} exists and is not a directory")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            staged = Path(tmp)
            try:
                report = write_report(collection, staged, paper=paper, analysis=analysis)
                if analysis:
                    _, files, notes = diagnose_runs(select_runs(collection.runs), staged)
                    report.files.update(files)
                    report.notes.extend(notes)
            except (BMRSError, OSError) as err:  # named as the file it would have been in OUT
                raise type(err)(str(err).replace(str(staged), str(out))) from None
            _publish(staged, out, force)
    except BaseException:
        for folder in created:  # a refused report leaves no folder it made behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    report.files = {key: out / Path(path).relative_to(staged) for key, path in report.files.items()}
    for note in report.notes:
        print(f"bmrs: note: {note}", file=sys.stderr)
    say(report.markdown.split("\n## ")[0].rstrip())
    say("")
    say(f"report of {report.runs} run(s) and {report.sweeps} sweep(s):")
    say(f"  table       {report.files['markdown']}")
    say(f"  json        {report.files['json']}")
    say(f"  plot        {report.files['accuracy_plot']}")
    if "widths_plot" in report.files:
        say(f"  widths      {report.files['widths_plot']}")
    for key, label in (("comparison", "paper"), ("paper_json", "paper json"), ("knees", "knees"),
                       ("diagnostics_md", "diagnostics")):
        if key in report.files:
            say(f"  {label:<11} {report.files[key]}")
    figures = sum(1 for name in report.files if name.startswith(("posteriors_", "delta-f_")))
    if figures:
        say(f"  {figures} diagnostic figure(s) in {out}")


def run(args) -> int:
    write_report_dir(args.paths, Path(args.out), paper=args.paper, analysis=args.analysis, force=args.force)
    return 0


def add_parser(commands, parents: dict[str, argparse.ArgumentParser]) -> None:
    """The parser of ``bmrs report``."""
    p = commands.add_parser(
        "report", formatter_class=Formatter,
        help="tables and plots from runs and sweeps",
        description="Collect complete runs (config.json + metrics.json) and sweeps (sweep.json) from the\n"
        "given directories, at any depth, and write into OUT:\n"
        "  results.md                   the table (rows: methods; per model and data set: parameter\n"
        "                               compression and test accuracy in %, mean ± std over seeds, n),\n"
        "                               kept structures per layer, compacted sizes, each run's training time\n"
        "                               and processor, sweep stop points\n"
        "  results.json                 {model: {method: {param_compression: [mean, std],\n"
        "                               accuracy: [mean, std], seeds: n}}} (keys 'dataset/model'\n"
        "                               when several data sets are reported)\n"
        "  accuracy_vs_compression.png  from the sweeps if any, else one point per run\n"
        "  widths.png                   kept structures per layer, mean over seeds, per method\n"
        "Runs are grouped by data set, model and method (bmrs-u as bmrs-u<bits>, e.g. bmrs-u8;\n"
        "a KL reduction other than the paper's mean appended, e.g. bmrs-n-code+kl-structures).",
        epilog="example: bmrs report runs/quick --out runs/quick/report",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="run, sweep or suite directories")
    p.add_argument("--out", metavar="DIR", type=out_path, required=True,
                   help="report directory; files that no earlier bmrs report wrote there are never replaced")
    p.add_argument("--force", action="store_true", help="replace files in OUT that no earlier bmrs report wrote")
    p.add_argument("--analysis", action="store_true",
                   help="also the analyses 'bmrs reproduce' writes: knees.md/json (the sweeps' stopping points against "
                   "the knees of their curves) and the gate diagnostics of the lowest-seed run of each method")
    p.add_argument("--paper", metavar="DATASET", default=None,
                   help="also compare with the paper's published numbers for DATASET (fashion-mnist or mnist): "
                   "comparison.md, comparison.json and paper-fmnist.json (paper-mnist.json)")
    p.set_defaults(func=run)
