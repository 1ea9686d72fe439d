"""Live metrics of bmrs train --log: the CSV files and the TensorBoard events hold what the
run's history holds, epoch by epoch, and delta F of every structure."""

import csv

import pytest
import torch

import bmrs
from bmrs.experiments.runs import load_run, train_run
from bmrs.rundir import RunConfig
from bmrs.pruning.criteria import make_criterion

TINY = RunConfig(dataset="digits", model="mlp", method="bmrs-n-kr", epochs=3, finetune_epochs=1, batch_size=32,
                 lr=2e-2, kl_reduction="elbo", model_options={"width": 8})


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_log_follows_the_history(tmp_path):
    torch.set_num_threads(1)
    metrics = train_run(TINY, tmp_path, progress=False, log="csv")
    rows = _rows(tmp_path / "log.csv")
    history = metrics["history"]
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
    for row, h in zip(rows, history):
        assert row["phase"] == h["phase"]
        for key in ("train_loss", "train_kl", "val_accuracy", "parameter_compression"):
            assert float(row[key]) == pytest.approx(h[key], rel=1e-12)
        assert {k.removeprefix("kept:"): int(v) for k, v in row.items() if k.startswith("kept:")} == h["kept"]
    delta = _rows(tmp_path / "delta_f.csv")
    assert len(delta) == len(history) * sum(metrics["structures"].values())
    # the last epoch's delta F is the run's criterion's on the final gates, and 'kept' its masks
    model = load_run(tmp_path / "checkpoint.pt").model
    criterion = make_criterion("bmrs-n-kr")
    from bmrs.gates import gates

    last = [r for r in delta if int(r["epoch"]) == history[-1]["epoch"]]
    layer = bmrs.layer_names(model)
    for name, gate in gates(model).items():
        mine = [r for r in last if r["layer"] == layer[name]]
        expected = criterion.delta_f(gate).double()
        assert [float(r["delta_f"]) for r in mine] == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
        assert [int(r["kept"]) for r in mine] == gate.mask.int().tolist()


def test_tensorboard_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    metrics = train_run(TINY, tmp_path, progress=False, log="tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    history = metrics["history"]
    for tag, key in (("loss/train", "train_loss"), ("kl/train", "train_kl"), ("accuracy/val", "val_accuracy"),
                     ("compression/parameters", "parameter_compression")):
        values = events.Scalars(tag)
        assert [v.step for v in values] == [h["epoch"] for h in history]
        assert [v.value for v in values] == pytest.approx([h[key] for h in history], rel=1e-6)
    for name, total in metrics["structures"].items():
        assert [v.value for v in events.Scalars(f"kept/{name}")] == [h["kept"][name] for h in history]
        histograms = events.Histograms(f"delta_f/{name}")
        assert len(histograms) == len(history) and histograms[-1].histogram_value.num == total
    assert set(tags["histograms"]) == {f"delta_f/{name}" for name in metrics["structures"]}


def test_unknown_log_format(tmp_path):
    with pytest.raises(ValueError, match="log format"):
        train_run(TINY, tmp_path, progress=False, log="wandb")


def test_force_starts_the_logs_afresh_and_a_foreign_log_is_refused(tmp_path, capsys):
    from bmrs.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--width", "8", "--epochs", "2", "--finetune-epochs", "0",
            "--log", "csv", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert [r["epoch"] for r in _rows(out / "log.csv")] == ["1", "2"]
    assert main(args + ["--force", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in _rows(out / "log.csv")] == ["1", "2", "3"]  # the earlier run's rows are gone
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.csv").write_text("a user's file\n")
    capsys.readouterr()
    assert main([*args[:-5], "--out", str(other), "--no-progress"]) == 2
    assert "log.csv" in capsys.readouterr().err
    assert (other / "log.csv").read_text() == "a user's file\n"
