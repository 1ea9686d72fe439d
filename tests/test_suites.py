"""run_suite for real, on a miniature of the quick suite: every Table 1 method trains in
worker processes, the matched L2 run waits for bmrs-n-code, the sweep for the unpruned run,
and a second call finds everything complete."""

import json

import pytest

import bmrs.experiments.suites as suites
from bmrs.rundir import RunConfig

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


def _other_defaults(**given):
    """A RunConfig whose every setting not in ``given`` differs from RunConfig's default."""
    other = {
        "dataset": "cifar10", "model": "vit", "method": "random", "bits": 3.0, "epochs": 7, "finetune_epochs": 3,
        "prune_every": 5, "recompute_masks": not RunConfig().recompute_masks, "seed": 99, "kl_reduction": "sum",
        "model_options": {"width": 5},
    }
    defaults = RunConfig()
    assert all(other[k] != getattr(defaults, k) for k in other)
    return RunConfig(**{**other, **given})


@pytest.mark.parametrize("name", sorted(suites.SUITES))
def test_suite_runs_do_not_depend_on_the_defaults(name, monkeypatch):
    """Every suite gives every setting: had RunConfig other defaults (say, other recommended
    settings), no run of the suite would change."""
    before = [(r.name, r.config) for r in suites.suite_runs(name, 2)]
    monkeypatch.setattr(suites, "RunConfig", _other_defaults)
    after = [(r.name, r.config) for r in suites.suite_runs(name, 2)]
    assert after == before


def test_paper_suite_pins_the_papers_settings():
    runs = {r.name: r.config for r in suites.suite_runs("paper-fmnist", 1)}
    assert runs["train/mlp/bmrs-n-code/seed-0"].kl_reduction == "mean"
    assert runs["train/lenet5/bmrs-n-code+kl-structures/seed-0"].kl_reduction == "structures"
    # the recommended criterion under the recommended KL weighting is a row of its own
    assert runs["train/lenet5/bmrs-n-kr+kl-structures/seed-0"].method == "bmrs-n-kr"
    assert {c.kl_reduction for n, c in runs.items() if "+kl-" not in n} == {"mean"}
    assert all(c.epochs == 50 and c.finetune_epochs == 10 and c.recompute_masks for c in runs.values())
