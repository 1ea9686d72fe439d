"""bmrs under DistributedDataParallel: the public functions take a wrapped model, two
processes train, prune and compact identically, a killed run resumes, and `bmrs train
--nproc 2` writes one run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import bmrs
from bmrs._io import content_digest
from bmrs import distributed
from bmrs.compaction import count_flops, count_parameters
from nets import small_mlp

HERE = Path(__file__).resolve().parent


def run(args, timeout=600, cwd=None):  # the timeout guards against hangs; it is no speed test
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def torchrun(script, *args):
    """``script`` in 2 processes (gloo), on a free port (standalone rendezvous on port 0)."""
    return run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args])


@pytest.fixture
def process_group():
    """A gloo process group of one process, so that DistributedDataParallel can be built here."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def gated_mlp():
    torch.manual_seed(0)
    model = small_mlp(inputs=6, hidden=8, classes=3)
    bmrs.attach_gates(model, torch.randn(2, 6))
    with torch.no_grad():  # three structures of the first gate near theta = 0: BMRS prunes them
        gate = next(iter(bmrs.gates(model).values()))
        gate.loc[:3] = -19.0
        gate.log_scale[:3] = 0.0
    return model


def test_unwrap_and_single_process_defaults():
    model = gated_mlp()
    assert distributed.unwrap(model) is model
    assert distributed.unwrap(torch.nn.DataParallel(model)) is model
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    state = torch.get_rng_state()
    distributed.seed_noise(3)  # one process: the stream goes on unchanged
    assert torch.equal(torch.get_rng_state(), state)
    assert distributed.average({"a": 1.5}) == {"a": 1.5}
    assert distributed.gather_rows(torch.arange(3)).tolist() == [[0, 1, 2]]


def test_every_public_function_takes_a_ddp_model(process_group):
    model, twin = gated_mlp(), gated_mlp()
    ddp = DistributedDataParallel(model)
    x = torch.randn(16, 6)
    assert list(bmrs.gates(ddp)) == list(bmrs.gates(twin))
    assert bmrs.gate_layout(ddp) is bmrs.gate_layout(model)
    for reduction in ("mean", "structures", "sum"):
        assert torch.equal(bmrs.model_kl(ddp, reduction), bmrs.model_kl(twin, reduction))
    assert torch.equal(bmrs.model_kl(ddp, "elbo", 100), bmrs.model_kl(twin, "elbo", 100))
    criterion = bmrs.make_criterion("bmrs-n")
    decided = bmrs.decide(ddp, criterion)
    assert {k: v.tolist() for k, v in decided.items()} == {k: v.tolist() for k, v in bmrs.decide(twin, criterion).items()}
    assert bmrs.prune(ddp, criterion) == bmrs.prune(twin, criterion)
    assert bmrs.kept_structures(ddp) == bmrs.kept_structures(twin) and sum(bmrs.kept_structures(ddp).values()) == 13
    assert bmrs.ContinuousPruning(criterion)(ddp, 1) == bmrs.kept_structures(twin)
    assert bmrs.structure_compression(ddp) == bmrs.structure_compression(twin) > 0
    assert bmrs.parameter_compression(ddp) == bmrs.parameter_compression(twin) > 0
    assert count_parameters(ddp) == count_parameters(twin) and count_flops(ddp, x) == count_flops(twin, x)
    small = bmrs.compact(ddp, example_input=x)
    assert not bmrs.gates(small)
    model.eval()
    torch.testing.assert_close(small(x), model(x))
    trainer = bmrs.Trainer(ddp, torch.optim.Adam(ddp.parameters(), 1e-2), progress=False)
    assert trainer.step(x, torch.randint(0, 3, (16,)))["n"] == 16
    batches = [(x, torch.zeros(16, dtype=torch.long))]
    assert trainer.evaluate(batches) == bmrs.Trainer(model, None, progress=False).evaluate(batches)
    plain = small_mlp(inputs=6, hidden=8, classes=3)
    with pytest.raises(ValueError, match="before wrapping"):
        bmrs.attach_gates(DistributedDataParallel(plain), x[:2])


def test_checkpoint_holds_the_plain_state_and_every_rank_state(process_group, tmp_path):
    model = gated_mlp()
    ddp = DistributedDataParallel(model)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    trainer = bmrs.Trainer(ddp, torch.optim.Adam(ddp.parameters(), 1e-2), progress=False)
    trainer.fit(loader, loader, 1, checkpoint=tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert list(state["model"]) == list(model.state_dict())  # no "module." prefix: loads without DDP
    assert state["rng"]["ranks"].shape == (1, torch.get_rng_state().numel())
    state["rng"]["ranks"] = state["rng"]["ranks"].repeat(2, 1)  # as if two processes had written it
    del state["checksum"]
    state["checksum"] = content_digest(state)  # as training writes it
    torch.save(state, tmp_path / "c.pt")
    again = bmrs.Trainer(ddp, torch.optim.Adam(ddp.parameters(), 1e-2), progress=False)
    with pytest.raises(ValueError, match="written by 2 training process"):
        again.fit(loader, loader, 2, checkpoint=tmp_path / "c.pt")


def _rank_files(out):
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _assert_same_tensors(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_processes_train_prune_compact_identically_and_resume_after_a_kill(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    full.mkdir(), crashed.mkdir()
    proc = torchrun(HERE / "ddp_train.py", "--out", full)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = _rank_files(full)
    assert first["parameter_compression"] > 0.1  # continuous BMRS pruning removed structures
    _assert_same_tensors(first["model"], second["model"])  # masks and every parameter, bitwise
    assert first["history"] == second["history"] and first["kept"] == second["kept"]
    assert not torch.equal(first["first_noise"], second["first_noise"])  # each rank draws its own noise
    for result in (first, second):  # the compacted network gives the gated model's outputs
        scale = result["gated_out"].abs().max()
        torch.testing.assert_close(result["small_out"] / scale, result["gated_out"] / scale, rtol=0, atol=1e-5)
    _assert_same_tensors(first["small_finetuned"], second["small_finetuned"])  # re-wrapped in DDP, trained

    proc = torchrun(HERE / "ddp_train.py", "--out", crashed, "--kill-after", 3)
    assert proc.returncode != 0  # rank 1 was killed; torchrun stopped rank 0
    interrupted = torch.load(crashed / "checkpoint.pt", weights_only=False)
    assert 1 <= len(interrupted["history"]) <= 3
    assert not (crashed / "rank0.pt").exists()
    proc = torchrun(HERE / "ddp_train.py", "--out", crashed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for done, resumed in zip((first, second), _rank_files(crashed)):
        _assert_same_tensors(done["model"], resumed["model"])
        _assert_same_tensors(done["small_finetuned"], resumed["small_finetuned"])
        assert done["history"] == resumed["history"]


@pytest.mark.slow
def test_cli_nproc_2_writes_one_run_directory(tmp_path):
    out = tmp_path / "R"
    args = ["-m", "bmrs", "train", "--dataset", "digits", "--model", "mlp", "--method", "bmrs-n-code", "--width", "16",
            "--epochs", "3", "--finetune-epochs", "1", "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo",
            "--no-progress", "--nproc", "2", "--out", out]
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["R"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "compact.pt", "config.json", "metrics.json", "model.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["history"]) == 4
    assert proc.stdout.count(f"run {out}:") == 1  # rank 0 reports, once
    assert "(2 processes)" in proc.stdout
    again = run([*args, "--resume"], cwd=tmp_path)  # complete: reported, not retrained
    assert again.returncode == 0 and "is complete" in again.stdout


def test_cli_nproc_errors(tmp_path, capsys, monkeypatch):
    from bmrs.cli import main

    base = ["train", "--dataset", "digits", "--model", "mlp", "--method", "none", "--out", str(tmp_path / "R")]
    assert main([*base, "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    # started by torchrun with 4 processes per machine: --nproc 2 contradicts it
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert main([*base, "--nproc", "2"]) == 2
    assert "leave it out when torchrun starts them" in capsys.readouterr().err
    assert not (tmp_path / "R").exists()
