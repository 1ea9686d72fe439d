"""Adding a criterion is one class in one place: the worked example of docs/architecture.md,
run as written, is usable from make_criterion, `bmrs train`, `bmrs sweep --criteria` and reports."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bmrs
from bmrs.experiments.runs import methods
from bmrs.experiments.sweep import default_criteria, parse_criteria
from bmrs.pruning import CRITERIA, decide, make_criterion
from bmrs.reporting.diagnostics import diagnostic_criteria
from bmrs.reporting.tables import method_order
from nets import small_mlp

ROOT = Path(__file__).resolve().parents[1]
NAME = "bmrs-n-strong"  # the example's criterion


def example() -> str:
    """The one Python block of the section "Adding a criterion" of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Adding a criterion\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def registered():
    """The example executed in this process; the registry restored afterwards."""
    before = dict(CRITERIA)
    namespace: dict = {}
    try:
        exec(compile(example(), "docs/architecture.md", "exec"), namespace)
        yield namespace
    finally:
        CRITERIA.clear()
        CRITERIA.update(before)


def test_the_example_is_one_new_entry(registered):
    assert list(CRITERIA)[-1] == NAME
    criterion = make_criterion(NAME)
    assert criterion.evidence_based and criterion.margin == -3.0
    # every list of names sees it
    assert NAME in methods() and NAME in default_criteria() and NAME in diagnostic_criteria()
    assert parse_criteria(f"{NAME},bmrs-n") == [(NAME, NAME, {}), ("bmrs-n", "bmrs-n", {})]
    assert sorted(["other", NAME, "random", "none"], key=method_order) == ["none", "random", NAME, "other"]
    # and it decides by its rule: prune where delta F >= -3
    model = small_mlp(inputs=6, hidden=6, classes=3)
    bmrs.attach_gates(model, torch.randn(2, 6))
    gate = bmrs.gates(model)["1"]
    with torch.no_grad():
        gate.loc.copy_(torch.tensor([-19.0, -3.0, -12.0, -25.0, -1.3, -8.0]))
        gate.log_scale.copy_(torch.tensor([0.0, math.log(0.5), math.log(4.0), math.log(2.0), 3.8, 1.5]))
    exact = make_criterion("bmrs-n").delta_f(gate)
    assert torch.equal(criterion.delta_f(gate), exact)
    kept = decide(model, criterion)["1"]
    assert kept.tolist() == (exact < -3.0).tolist()
    assert 0 < int(kept.sum()) < 6
    assert kept.tolist() != decide(model, make_criterion("bmrs-n-kr"))["1"].tolist()  # between -3 and -1


def test_a_registered_name_cannot_be_taken_twice(registered):
    with pytest.raises(ValueError, match="already registered"):
        exec(compile(example(), "docs/architecture.md", "exec"), {})


TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "4", "--finetune-epochs", "1",
        "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]


def bmrs_command(*args, plugins: Path | None = None):
    env = dict(os.environ)
    if plugins is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(plugins), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "bmrs.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


def install_plugin(root: Path) -> Path:
    """The example as a module of an installed distribution that declares it in the
    ``bmrs.criteria`` entry point group (what pip makes of the pyproject.toml lines in
    docs/architecture.md), on a directory to put on the Python path."""
    root.mkdir()
    (root / "strong_criteria.py").write_text(example())
    info = root / "strong_criteria-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: strong-criteria\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bmrs.criteria]\nbmrs-n-strong = strong_criteria\n")
    return root


@pytest.mark.slow
def test_the_example_from_the_command_line_and_in_reports(tmp_path):
    plugins = install_plugin(tmp_path / "site")
    run, sweep, report = tmp_path / "run", tmp_path / "sweep", tmp_path / "report"
    # without the plugin the name is unknown: one line, exit 2
    code, _, err = bmrs_command("sweep", "--run", run, "--criteria", NAME, "--out", sweep)
    assert code == 2 and f"unknown criterion '{NAME}'" in err
    code, out, err = bmrs_command("train", "--help", plugins=plugins)
    assert code == 0 and NAME in out
    code, _, err = bmrs_command("train", *TINY, "--method", NAME, "--out", run, plugins=plugins)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["method"] == NAME
    code, _, err = bmrs_command("sweep", "--run", run, "--criteria", f"{NAME},bmrs-n", "--levels", "0,0.5",
                                "--out", sweep, plugins=plugins)
    assert code == 0, err
    records = json.loads((sweep / "sweep.json").read_text())["records"]
    assert {(r["criterion"], r["kind"]) for r in records} >= {(NAME, "level"), (NAME, "stop")}
    code, _, err = bmrs_command("report", run, sweep, "--out", report, plugins=plugins)
    assert code == 0, err
    table = (report / "results.md").read_text()
    assert any(line.startswith(f"| {NAME} |") for line in table.splitlines()), table
