"""The Lightning callback: gates, KL in the loss, pruning at epoch ends, logging and
compaction, in one process and under Lightning's DDP strategy with 2 CPU processes."""

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lightning")

# The training script: Lightning's DDP strategy starts the other ranks by running the
# script again, so it lives in a file.
SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn

    import bmrs
    from bmrs.datasets import load_dataset
    from bmrs.integrations.lightning import BMRSPruning

    out, devices, strategy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    L.seed_everything(0)
    data = load_dataset("digits", seed=0)


    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("data_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y), on_step=False, on_epoch=True, sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)


    module = Classifier()
    # a wide initial posterior, so that pruning starts within a few epochs
    bmrs.attach_gates(module.net, data.train.tensors[0][:2], init_log_scale=-1.0)
    pruning = BMRSPruning("bmrs-n-code", module="net", kl_reduction="mean", prune_until=5, predictive_draws=2)
    trainer = L.Trainer(
        max_epochs=6, accelerator="cpu", devices=devices, strategy=strategy, callbacks=[pruning],
        logger=CSVLogger(out, name="logs", version=0), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True)
    trainer.fit(module, loader, torch.utils.data.DataLoader(data.val, batch_size=64))

    x = data.test.tensors[0][:256]
    module.eval()
    with torch.no_grad():
        gated, small = module(x), pruning.compacted(x)
    torch.save({"state": module.state_dict(), "gated": gated, "small": small, "kept": {bmrs.layer_names(module.net)[n]: k for n, k in bmrs.kept_structures(module.net).items()},
                "small_state": pruning.compacted.state_dict()}, out / f"rank{trainer.global_rank}.pt")
''')


def run_script(tmp_path, devices, strategy):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the timeout guards against hangs; it is no speed test
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(devices), strategy], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(devices)], rows


def check_run(results, rows):
    first = results[0]
    assert sum(first["kept"].values()) < 64  # pruned during training
    scale = first["gated"].abs().max()
    torch.testing.assert_close(first["small"] / scale, first["gated"] / scale, rtol=0, atol=1e-5)
    for other in results[1:]:  # every rank ends with the same masks and parameters, bitwise
        assert other["kept"] == first["kept"]
        for key, value in first["state"].items():
            assert torch.equal(value, other["state"][key]), key
        for key, value in first["small_state"].items():
            assert torch.equal(value, other["small_state"][key]), key
    logged = [r for r in rows if r.get("bmrs/parameter_compression")]
    assert len(logged) == 6  # one summary per epoch
    last = logged[-1]
    assert {name: float(last[f"bmrs/kept/{name}"]) for name in first["kept"]} == first["kept"]
    assert float(last["bmrs/parameter_compression"]) > 0
    assert all(float(r["bmrs/kl"]) > 0 for r in logged)
    assert float(logged[0]["bmrs/delta_f_max"]) < 0  # nothing pruned after epoch 1: every kept delta F < 0
    # the evidence summary: the per-layer ambiguous counts add up, and nothing was forced
    assert float(last["bmrs/ambiguous"]) == sum(float(last[f"bmrs/ambiguous/{n}"]) for n in first["kept"])
    assert float(last["bmrs/removed_against"]) == 0 and float(last["bmrs/evidence_spent"]) >= 0
    # calibration after every validation epoch, of the gated model and of its predictive
    calibrated = [r for r in rows if r.get("bmrs/val_ece")]
    assert len(calibrated) == 6
    for r in calibrated:
        assert 0 <= float(r["bmrs/val_ece"]) <= 1 and float(r["bmrs/val_nll"]) > 0
        assert 0 <= float(r["bmrs/val_predictive_ece"]) <= 1 and float(r["bmrs/val_predictive_nll"]) > 0


@pytest.mark.slow
def test_callback_in_one_process(tmp_path):
    check_run(*run_script(tmp_path, 1, "auto"))


@pytest.mark.slow
def test_callback_under_ddp_with_two_processes(tmp_path):
    results, rows = run_script(tmp_path, 2, "ddp")
    check_run(results, rows)


def test_bmrs_does_not_import_lightning():
    code = "import sys, bmrs, bmrs.cli, bmrs.distributed; assert 'lightning' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_callback_checks_its_inputs_and_offers_the_kl_term():
    from torch import nn

    import bmrs
    from bmrs.integrations.lightning import BMRSPruning

    with pytest.raises(ValueError, match="kl_reduction"):
        BMRSPruning(kl_reduction="max")

    class Net(nn.Module):
        automatic_optimization = True

        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    net = Net()
    with pytest.raises(ValueError, match="example inputs"):
        BMRSPruning(add_to_loss=False).setup(None, net, "fit")
    callback = BMRSPruning(example_input=torch.zeros(2, 3), kl_reduction="sum", kl_weight=0.5, add_to_loss=False)
    callback.setup(None, net, "fit")
    assert list(bmrs.gates(net)) == ["fc"]
    assert torch.equal(callback.kl_term(net), 0.5 * bmrs.model_kl(net, "sum"))
    net.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimisation"):
        BMRSPruning().setup(None, net, "fit")  # already gated: no example needed
