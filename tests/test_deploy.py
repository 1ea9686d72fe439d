"""Deployment: exports agree with PyTorch at any batch size; bench and budgets from the command.

No timing is asserted here (speed is measured in benchmarks/); the bench test checks the
table's arithmetic and the recorded file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import bmrs
from bmrs.cli import main
from bmrs.compaction import compact, count_flops
from bmrs.deploy import TOLERANCE, benchmark, export, full_network, max_relative_error, prepare
from bmrs.models import build_model
from bmrs.pruning import set_masks

from nets import randomize

SHAPES = {"mlp": (1, 32, 32), "lenet5": (1, 32, 32), "resnet": (3, 32, 32)}
OPTIONS = {"mlp": {}, "lenet5": {}, "resnet": {"depth": 8, "width": 8}}
TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "2", "--finetune-epochs", "0",
        "--batch-size", "64", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]


def pruned(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A gated bundled model with random weights, BatchNorm statistics, posteriors and masks."""
    torch.manual_seed(seed)
    model = build_model(name, SHAPES[name], 10, **OPTIONS[name])
    randomize(model, bmrs.gates(model))
    set_masks(model, {n: torch.rand(g.num_structures) > 0.5 for n, g in bmrs.gates(model).items()})
    return model.eval(), torch.randn(4, *SHAPES[name], generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet"])
def test_onnx_export_matches_pytorch_at_any_batch_size(name, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    model, x = pruned(name)
    small = compact(model, x)
    result = export(small, x, tmp_path / "m.onnx", "onnx")
    assert result["max_relative_error"] <= TOLERANCE and result["batches"] == [4, 7]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 33):  # none of them the exported example's
        inputs = torch.randn(batch, *SHAPES[name], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference = model(inputs)  # the gated model itself
        output = session.run(None, {"input": inputs.numpy()})[0]
        assert output.shape == (batch, 10)
        assert max_relative_error(reference, torch.from_numpy(output)) <= TOLERANCE


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_torch_exports_reload_and_match(fmt, tmp_path):
    model, x = pruned("resnet")
    small = compact(model, x)
    export(small, x, tmp_path / "m.pt", fmt)
    loaded = torch.jit.load(tmp_path / "m.pt") if fmt == "torchscript" else torch.export.load(tmp_path / "m.pt").module()
    inputs = torch.randn(5, *SHAPES["resnet"])
    with torch.no_grad():
        assert max_relative_error(model(inputs), loaded(inputs)) <= TOLERANCE


def test_prepare_folds_batchnorm_and_keeps_outputs():
    model, x = pruned("resnet")
    small = compact(model, x)
    ready = prepare(small, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ready.modules())
    with torch.no_grad():
        assert max_relative_error(model(x), ready(x)) <= TOLERANCE


def test_full_network_removes_nothing():
    model, x = pruned("lenet5")
    full = full_network(model, x)
    assert count_flops(full, x) == count_flops(model, x)
    assert [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)] == [6, 16]
    assert any(g.mask.sum() < g.num_structures for g in bmrs.gates(model).values())  # model untouched


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    model, x = pruned("mlp")
    small = compact(model, x)
    monkeypatch.setattr("bmrs.deploy.TOLERANCE", -1.0)  # no export can pass
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):
        export(small, x, tmp_path / "m.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_benchmark_reports_both_networks():
    model, x = pruned("mlp")
    data = benchmark(full_network(model, x), compact(model, x), SHAPES["mlp"], batches=(1, 8),
                     runtimes=("eager",), repeats=3, warmup=1)
    assert [(r["runtime"], r["batch"]) for r in data["results"]] == [("eager", 1), ("eager", 8)]
    for r in data["results"]:
        assert r["ratio"] == pytest.approx(r["full_ms"] / r["compact_ms"])
    nets = data["networks"]
    assert data["flop_ratio"] == pytest.approx(nets["full"]["flops"] / nets["compact"]["flops"]) and data["flop_ratio"] > 1
    assert [g["batch"] for g in data["deployment_gain"]] == [1, 8]
    json.dumps(data)


# --- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    assert main(["train", *TINY, "--method", "random", "--target", "0.5", "--out", str(out)]) == 0
    return out


def one_line_error(capsys, argv, text):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bmrs: error: ") and text in err[0], err


@pytest.mark.slow
def test_export_command(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked: onnxruntime" in printed and "at batch sizes 4 and 7" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    small = bmrs.load_compact(run / "compact.pt")
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], small(x).numpy(), rtol=1e-4, atol=1e-5)
    # never overwrite a file without --force; a compacted file is a source too
    one_line_error(capsys, ["export", str(run), "--format", "onnx", "--out", str(out)], "pass --force")
    assert main(["export", str(run / "compact.pt"), "--format", "torchscript", "--out", str(out), "--force"]) == 0
    for own in (run / "model.pt", run / "compact.pt"):  # not even with --force
        one_line_error(capsys, ["export", str(run), "--format", "onnx", "--out", str(own), "--force"], "a file of the run")
    one_line_error(capsys, ["export", str(tmp_path / "nothing"), "--format", "onnx", "--out", str(tmp_path / "x")],
                   "no such file")


def test_bench_command_records_and_info_shows(run, capsys):
    argv = ["bench", str(run), "--batch", "1", "16", "--runtime", "eager", "--repeats", "3", "--warmup", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| runtime | batch | full ms | compact ms | full/compact | FLOP ratio | settings (full; compact) |" in printed
    data = json.loads((run / "bench.json").read_text())
    assert data["format"] == "bmrs-bench" and len(data["results"]) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert data["networks"]["compact"]["flops"] == metrics["compaction"]["flops_after"]
    assert data["networks"]["full"]["flops"] == metrics["compaction"]["flops_before"]
    assert main(["info", str(run)]) == 0
    assert "last measured latency" in capsys.readouterr().out
    assert main(["info", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bench"]["results"] == data["results"]
    # a file of the same name that bmrs did not write is left alone
    (run / "bench.json").write_text("my notes\n")
    one_line_error(capsys, argv, "was not written by 'bmrs bench'")
    assert (run / "bench.json").read_text() == "my notes\n"
    (run / "bench.json").unlink()
    one_line_error(capsys, [*argv[:2], "--batch", "0"], "--batch must be >= 1")


def test_compact_with_a_budget(run, tmp_path, capsys):
    out = tmp_path / "budget.pt"
    assert main(["compact", str(run), "--budget", "flops=0.2", "--criterion", "bmrs-n", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "delta F >= 0 prunes" in printed and "the budget (FLOPs <= 20.00 %) needs" in printed
    small = bmrs.load_compact(out)
    x = torch.zeros(1, 1, 8, 8)
    metrics = json.loads((run / "metrics.json").read_text())
    assert count_flops(small, x) <= 0.2 * metrics["compaction"]["flops_before"]
    one_line_error(capsys, ["compact", str(run), "--budget", "flops=2", "--out", str(tmp_path / "b.pt")], "(0, 1]")
    one_line_error(capsys, ["compact", str(run), "--criterion", "l2", "--out", str(tmp_path / "b.pt")],
                   "--criterion applies with --budget or --round-to only")
