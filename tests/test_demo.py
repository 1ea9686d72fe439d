"""The summary make demo ends with, on a miniature of the demo's directory, and the
available() check that picks its data set."""

import json

import pytest
import torch

from bmrs.cli import main
from bmrs.datasets import available
from bmrs.experiments.demo import demo_summary, measure_latency

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "4", "--finetune-epochs", "1",
        "--batch-size", "32", "--lr", "0.02", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["train", *TINY, "--method", "none", "--out", str(root / "unpruned")]) == 0
    assert main(["train", *TINY, "--out", str(root / "bmrs")]) == 0
    assert main(["train", *TINY, "--method", "l2", "--match", str(root / "bmrs"), "--out", str(root / "l2-matched")]) == 0
    assert main(["sweep", "--run", str(root / "unpruned"), "--criteria", "bmrs-n-kr,snr,l2", "--levels", "0,0.3,0.6,0.9",
                 "--threads", "1", "--no-progress", "--out", str(root / "sweep")]) == 0
    assert main(["report", str(root), "--out", str(root / "report")]) == 0
    return root


def _metrics(root, name):
    return json.loads((root / name / "metrics.json").read_text())


def test_demo_summary_reads_the_runs_the_sweep_and_the_compaction(demo_dir):
    text = demo_summary(demo_dir, repeats=3)
    lines = text.splitlines()
    for name, head in (("unpruned", "unpruned"), ("bmrs", "BMRS, the recommended settings [bmrs-n-kr, KL structures]"),
                       ("l2-matched", "L2 baseline")):
        m = _metrics(demo_dir, name)
        line = next(l for l in lines if l.strip().startswith(head))
        assert f"{100 * m['test_accuracy']:5.1f} %" in line and f"{100 * m['parameter_compression']:5.1f} % removed" in line
    sweep = json.loads((demo_dir / "sweep" / "sweep.json").read_text())
    stops = {r["criterion"]: r for r in sweep["records"] if r["kind"] == "stop"}
    assert set(stops) == {"bmrs-n-kr", "snr"}
    for name, r in stops.items():
        line = next(l for l in lines if l.strip().startswith(name + " "))
        assert f"{100 * r['parameter_compression']:5.1f} %, {100 * r['accuracy']:5.1f} %" in line
    epochs = len(_metrics(demo_dir, "unpruned")["history"])
    assert f"epoch {epochs} of {epochs}, its last epoch" in text
    info = _metrics(demo_dir, "bmrs")["compaction"]
    assert f"parameters {info['parameters_before']:,} -> {info['parameters_after']:,}" in text
    assert "ms compacted" in text and str(demo_dir / "report" / "accuracy_vs_compression.png") in text


def test_measure_latency_times_each_model():
    slow = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    fast = torch.nn.Linear(256, 256)
    a, b = measure_latency(slow, fast, torch.randn(64, 256), repeats=5)
    assert a > 0 and b > 0


def test_available_looks_without_downloading(tmp_path, monkeypatch):
    import bmrs.datasets as datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BMRS_DATA", raising=False)
    monkeypatch.setattr(datasets, "_SYSTEM_DIRS", {})
    monkeypatch.setattr(datasets, "_download", lambda *a, **k: pytest.fail("available() must not download"))
    assert available("digits")
    assert not available("fashion-mnist", data_dir=tmp_path)
    for name in datasets._SOURCES["fashion-mnist"].files:
        (tmp_path / name).write_bytes(b"")
    assert available("fashion_mnist", data_dir=tmp_path)
    assert not available("imagenet")
