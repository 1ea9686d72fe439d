"""Every run records what produced it, and its recorded command reproduces it bit for bit."""

import json
import shlex
import subprocess
import sys

import torch

from bmrs.cli import main
from bmrs.experiments.provenance import train_command
from bmrs.rundir import RunConfig

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "3", "--finetune-epochs", "1",
        "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo", "--recompute-masks", "--threads", "1",
        "--no-progress"]


def test_recorded_command_reproduces_the_run_in_a_fresh_process(tmp_path):
    first = tmp_path / "first"
    assert main(["train", *TINY, "--method", "bmrs-n-code", "--out", str(first)]) == 0
    metrics = json.loads((first / "metrics.json").read_text())
    record = metrics["provenance"]
    assert record["torch"] == torch.__version__ and record["threads"] == 1
    assert record["processor"] and record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    words = shlex.split(record["command"])
    assert words[:2] == ["bmrs", "train"] and words[-2:] == ["--out", str(first)]
    assert "--recompute-masks" in words and words[words.index("--width") + 1] == "16"

    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "bmrs.cli", *words[1:-1], str(again), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rerun = json.loads((again / "metrics.json").read_text())
    assert shlex.split(rerun["provenance"]["argv"])[1:3] == ["train", "--dataset"]  # what the process was given
    for key in ("test_accuracy", "test_loss", "val_accuracy", "parameter_compression", "kept", "best_epoch"):
        assert rerun[key] == metrics[key], key
    assert [r["train_loss"] for r in rerun["history"]] == [r["train_loss"] for r in metrics["history"]]
    a, b = torch.load(first / "model.pt"), torch.load(again / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())


def test_train_command_spells_out_every_setting():
    config = RunConfig(dataset="fashion-mnist", model="lenet5", method="bmrs-u", bits=4.0, epochs=50,
                       finetune_epochs=10, recompute_masks=True, seed=2, kl_reduction="structures").resolved()
    words = shlex.split(train_command(config, "runs/x", threads=1))
    assert "--recompute-masks" in words
    pairs = {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and w != "--recompute-masks"}
    assert pairs["--lr"] == "0.0014" and pairs["--batch-size"] == "32" and pairs["--image-size"] == "32"
    assert pairs["--bits"] == "4.0" and pairs["--seed"] == "2" and pairs["--kl-reduction"] == "structures"
    assert pairs["--threads"] == "1" and pairs["--out"] == "runs/x"
