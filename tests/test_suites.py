"""run_suite for real, on a miniature of the quick suite: every Table 1 method trains in
worker processes, the matched L2 run waits for bmrs-n-code, the sweep for the unpruned run,
and a second call finds everything complete."""

import json

import pytest

import bmrs.experiments.suites as suites
from bmrs.experiments.runs import RunConfig

TINY = RunConfig(
    epochs=2, finetune_epochs=1, prune_every=1, batch_size=32, lr=2e-2, kl_reduction="elbo",
    model_options={"width": 16},
)


@pytest.fixture
def tiny_suite(monkeypatch):
    monkeypatch.setitem(
        suites.SUITES, "tiny", ("digits, 3 epochs", 1, lambda seeds: suites._table_runs("digits", ("mlp",), seeds, TINY))
    )
    return "tiny"


def test_run_suite_end_to_end(tiny_suite, tmp_path):
    dirs = suites.run_suite(tiny_suite, tmp_path, jobs=2, progress=False)
    names = {str(d.relative_to(tmp_path)) for d in dirs}
    methods = ("none", "bmrs-n", "bmrs-n-code", "bmrs-n-rel", "bmrs-n-kr", "bmrs-u8", "bmrs-u4", "etheta", "snr", "l2")
    assert names == {f"train/mlp/{m}/seed-0" for m in methods} | {"sweep/mlp/seed-0"}
    for m in methods:
        metrics = json.loads((tmp_path / "train" / "mlp" / m / "seed-0" / "metrics.json").read_text())
        assert len(metrics["history"]) == 3
    # L2 followed the compression of bmrs-n-code epoch by epoch
    l2 = json.loads((tmp_path / "train/mlp/l2/seed-0/config.json").read_text())
    assert l2["method"] == "l2" and l2["match"] == str(tmp_path / "train/mlp/bmrs-n-code/seed-0")
    code = json.loads((tmp_path / "train/mlp/bmrs-n-code/seed-0/metrics.json").read_text())
    matched = json.loads((tmp_path / "train/mlp/l2/seed-0/metrics.json").read_text())
    assert matched["parameter_compression"] >= code["parameter_compression"]
    # the sweep pruned the unpruned run as its training ended, not its best-validation model
    sweep = json.loads((tmp_path / "sweep/mlp/seed-0/sweep.json").read_text())
    assert sweep["config"]["run"] == str(tmp_path / "train/mlp/none/seed-0/checkpoint.pt")
    assert sweep["run_config"]["method"] == "none" and sweep["records"]
    # resumable: a second call trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    suites.run_suite(tiny_suite, tmp_path, jobs=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")} == stamps
