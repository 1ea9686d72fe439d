"""Hardening: what bmrs does with hostile files, diverging training, user files in the way,
unusual grad modes and non-finite gates. Each test reproduces a case that once misbehaved."""

import json
import math
import pathlib
import shutil

import pytest
import torch

from bmrs.cli import main
from bmrs.datasets import load_dataset
from bmrs.models import build_model
from bmrs.training import Trainer, TrainingDiverged, seed_everything

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "2", "--finetune-epochs", "0",
        "--batch-size", "64", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]


class _Touch:
    """Unpickling this object would create ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def one_line_error(capsys, status, code=2):
    err = capsys.readouterr().err
    assert status == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmrs: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert main(["train", *TINY, "--method", "bmrs-n-code", "--out", str(out)]) == 0
    return out


def copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


# --- 1. no code runs from a checkpoint --------------------------------------------------------------


def test_checkpoints_hold_only_tensors_and_plain_containers(run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "history", "rng"}
    assert torch.load(run / "model.pt", weights_only=True)


def test_a_crafted_checkpoint_runs_no_code(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    marker = tmp_path / "code-ran"
    torch.save({"model": _Touch(marker)}, victim / "checkpoint.pt")
    (victim / "metrics.json").unlink()  # an unfinished run, so --resume reads the checkpoint
    for argv in (["info", victim / "checkpoint.pt"], ["compact", victim / "checkpoint.pt", "--out", tmp_path / "c.pt"],
                 ["sweep", "--run", victim / "checkpoint.pt", "--out", tmp_path / "s", "--no-progress"],
                 ["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", victim]):
        line = one_line_error(capsys, main([str(a) for a in argv]))
        assert str(victim / "checkpoint.pt") in line, line
        assert not marker.exists(), argv
    torch.save(_Touch(marker), victim / "model.pt")
    line = one_line_error(capsys, main(["info", str(victim / "model.pt")]))
    assert str(victim / "model.pt") in line and not marker.exists()


# --- 3. divergence stops training ---------------------------------------------------------------------


class _PoisonedLoader:
    """Batches of a data set; from epoch ``poison_epoch`` on, batch ``poison_step`` holds NaN."""

    def __init__(self, dataset, poison_epoch, poison_step):
        self.x, self.y = dataset.tensors
        self.epoch, self.poison_epoch, self.poison_step = 0, poison_epoch, poison_step

    def __iter__(self):
        self.epoch += 1
        for step, start in enumerate(range(0, 320, 64), 1):
            x = self.x[start:start + 64].clone()
            if self.epoch >= self.poison_epoch and step == self.poison_step:
                x[0, 0] = math.nan
            yield x, self.y[start:start + 64]


def test_a_non_finite_loss_stops_training_before_the_checkpoint(tmp_path):
    seed_everything(0)
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes, width=16)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    val = torch.utils.data.DataLoader(data.val, batch_size=500)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        trainer.fit(_PoisonedLoader(data.train, 2, 3), val, 3, checkpoint=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert len(saved["history"]) == 1  # the last good epoch
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_a_diverging_run_exits_3_and_writes_no_model(tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line_error(capsys, main(["train", *TINY, "--method", "none", "--lr", "1e300", "--out", str(out)]), 3)
    assert "diverged" in line and "epoch 1, step" in line
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--threshold", "nan")])
def test_non_finite_options_are_refused(flag, value, tmp_path, capsys):
    method = ["--method", "snr"] if flag == "--threshold" else ["--method", "none"]
    line = one_line_error(capsys, main(["train", *TINY, *method, flag, value, "--out", str(tmp_path / "r")]))
    assert flag in line
    assert not (tmp_path / "r").exists()


def test_json_files_are_strict(tmp_path):
    from bmrs._io import write_json

    with pytest.raises(ValueError, match="x.json"):
        write_json({"loss": math.nan}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# --- 2. no code runs from a CIFAR-10 batch ---------------------------------------------------------


def test_a_crafted_cifar_batch_runs_no_code(tmp_path, capsys):
    import pickle

    import numpy as np

    from bmrs.datasets import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    assert len(load_cifar10(tmp_path, val_fraction=0.0, download=False).train) == 10  # plain batches load
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Touch(marker), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3") as info:
        load_cifar10(tmp_path, val_fraction=0.0, download=False)
    assert "\n" not in str(info.value) and not marker.exists()
    line = one_line_error(capsys, main(["train", *TINY[2:], "--dataset", "cifar10", "--model", "mlp", "--method", "none",
                                        "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]))
    assert "data_batch_3" in line and not marker.exists()


# --- 4. nothing a user owns is overwritten -------------------------------------------------------


def test_compact_never_replaces_an_input_or_an_existing_file(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    for target in ("model.pt", "config.json", "metrics.json", "checkpoint.pt"):
        line = one_line_error(capsys, main(["compact", str(victim), "--out", str(victim / target), "--force"]))
        assert "file of the run" in line
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"user data")
    line = one_line_error(capsys, main(["compact", str(victim), "--out", str(mine)]))
    assert "--force" in line and mine.read_bytes() == b"user data"
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    assert main(["compact", str(victim), "--out", str(mine), "--force"]) == 0
    assert mine.read_bytes() != b"user data"


def test_train_never_replaces_files_of_no_run_in_progress(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("model.pt", "config.json"):
        (out / name).write_text("user data")
    line = one_line_error(capsys, main(["train", *TINY, "--method", "none", "--out", str(out)]))
    assert "--force" in line and "model.pt" in line
    assert all((out / name).read_text() == "user data" for name in ("model.pt", "config.json"))
    assert main(["train", *TINY, "--method", "none", "--force", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("command", [["train", *TINY, "--method", "none"], ["sweep", "--run", "x"], ["report", "x"],
                                     ["compact", "x"], ["reproduce", "quick"]])
def test_an_empty_out_is_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, main([*command, "--out", ""]))
    assert "--out" in line
    assert list(tmp_path.iterdir()) == []


# --- 5. compact and attach_gates in the caller's grad mode -------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_attach_gates_and_compact_work_in_no_grad_and_inference_mode(mode):
    import bmrs
    from bmrs.compaction import compact

    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    with context():
        x = torch.randn(4, 6)
        bmrs.attach_gates(model, x)
        assert torch.is_grad_enabled() is False and torch.is_inference_mode_enabled() is (mode == "inference_mode")
    for gate in bmrs.gates(model).values():
        gate.mask[::2] = 0
        assert not gate.loc.is_inference() and gate.loc.requires_grad
    with context():
        small = compact(model.eval(), x)
        assert torch.is_grad_enabled() is False and torch.is_inference_mode_enabled() is (mode == "inference_mode")
        torch.testing.assert_close(small(x), model(x))
    assert small[0].out_features == 4


# --- 6. a masked structure contributes exactly zero -------------------------------------------------


def test_a_masked_structure_with_a_nan_posterior_contributes_zero():
    import bmrs
    from bmrs.compaction import compact
    from bmrs.pruning import make_criterion, prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 6)
    bmrs.attach_gates(model, x)
    gate = bmrs.gates(model)["1"]
    gate.mask[[1, 4]] = 0
    model.eval()
    with torch.no_grad():
        clean = model(x)
        gate.loc[1], gate.log_scale[4] = math.nan, math.inf
        assert torch.equal(model(x), clean)
        model.train()
        assert torch.isfinite(model(x)).all()
        model.eval()
    torch.testing.assert_close(compact(model, x)(x), clean)
    with torch.no_grad():
        gate.loc[2] = math.nan  # an unmasked structure
    with pytest.raises(ValueError, match=r"non-finite gate parameters .* 1 \(structures 2\)"):
        compact(model, x)
    with pytest.raises(ValueError, match=r"1 \(structures 2\)"):
        prune(model, make_criterion("bmrs-n"))
