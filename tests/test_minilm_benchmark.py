"""The MiniLM benchmark's arithmetic without the checkpoint: recall@k, the bisection to a
parameter budget, the summary's shape and ratios, and what it refuses to replace."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bmrs import BMRSError

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks" / "minilm"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(FOLDER))
    try:
        spec = importlib.util.spec_from_file_location("minilm_run", FOLDER / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FOLDER))
    return module


def _recall_by_hand(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    k = min(k, len(a) - 1)
    total = 0.0
    for i in range(len(a)):
        def nearest(e):
            sims = [(float(e[i] @ e[j]), j) for j in range(len(e)) if j != i]
            return {j for _, j in sorted(sims, key=lambda t: (-t[0], t[1]))[:k]}
        total += len(nearest(a) & nearest(b)) / k
    return total / len(a)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 12), k=st.integers(1, 12), seed=st.integers(0, 10_000), noise=st.floats(0.0, 2.0))
def test_recall_at_k_against_a_loop(bench, n, k, seed, noise):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(a + noise * torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    assert bench.recall_at(a, b, k) == pytest.approx(_recall_by_hand(a, b, k), abs=1e-12)
    assert bench.recall_at(a, a, k) == pytest.approx(1.0)


def test_bisection_finds_the_smallest_ratio_within_the_budget(bench):
    class Net(torch.nn.Module):
        def __init__(self, ratio):
            super().__init__()
            self.ratio = ratio
            self.w = torch.nn.Parameter(torch.zeros(round(1000 * (1 - ratio))))

    ratio, net = bench._bisect(Net, 700)
    assert bench.count(net) <= 700 and 0.29 < ratio < 0.31
    assert bench._bisect(Net, 1000)[0] == 0.0  # the unpruned network fits: nothing removed


def test_arguments(bench):
    args = bench.parse_args(["--out", "x"])
    assert (args.epochs, args.recovery_epochs, args.gate_lr) == (4, 2, 0.1)
    for bad in (["--recovery-epochs", "4"], ["--recovery-epochs", "-1"], ["--budget", "1.5"], ["--length", "1"],
                ["--distill-tolerance", "0"], ["--distill-tolerance", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--out", "x", *bad])


WIDTHS = {"layer_num_attention_heads": [12, 6], "layer_intermediate_size": [100, 50]}


def _write_seed(folder: Path, seed: int, accuracy: dict, ort: dict, eager: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "reference.json").write_text(json.dumps({"accuracy": accuracy["reference"], "wall_s": 1.0}))
    for name in ("bmrs-n-kr", "tp-taylor"):
        row = {"accuracy": accuracy[name], "params_ratio": 0.5 + seed / 100, "widths": WIDTHS, "wall_s": 2.0}
        if name == "bmrs-n-kr":
            row["accuracy_at_stop"] = accuracy[name] - 1
        (folder / f"{name}.json").write_text(json.dumps(row))
    (folder / "distillation.json").write_text(json.dumps(
        {"cosine": 0.9 + seed / 100, "recall_at_10": 0.5, "params_ratio": 0.6, "widths": WIDTHS, "wall_s": 3.0}))
    latency = {"onnxruntime": {name: {"1": t / 10, "32": t} for name, t in ort.items()},
               "eager": {name: {"1": 1.0, "32": t} for name, t in eager.items()}}
    (folder / "latency.json").write_text(json.dumps(latency))


def test_summary_has_the_documented_shape_and_ratios(bench, tmp_path):
    for seed, (acc, slow) in enumerate([(80.0, 30.0), (82.0, 40.0)]):
        _write_seed(tmp_path / f"seed{seed}", seed,
                    {"reference": acc + 1, "bmrs-n-kr": acc, "tp-taylor": acc - 2},
                    {"unpruned": slow, "bmrs-n-kr": slow / 2, "tp-taylor": slow / 1.5, "unpruned-embedder": 10,
                     "distillation": 5},
                    {"unpruned": slow, "bmrs-n-kr": slow / 1.25, "tp-taylor": slow, "unpruned-embedder": 1,
                     "distillation": 1})
    args = bench.parse_args(["--out", str(tmp_path), "--seeds", "0", "1", "2"])  # seed 2 has not run: left out
    result = bench.summary(args)
    assert result["format"] == bench.FORMAT
    assert result["base"]["accuracy"] == pytest.approx(82.0)
    stop = result["bmrs_stop"]
    assert stop["accuracy"] == pytest.approx([81.0, 2 ** 0.5])
    assert stop["accuracy_at_stop"][0] == pytest.approx(80.0)
    assert (stop["latency_ratio_ort"], stop["latency_ratio_eager"], stop["seeds"]) == pytest.approx((2.0, 1.25, 2))
    assert stop["params_ratio"] == pytest.approx(0.505)
    assert result["rows"]["tp-taylor"]["latency_ratio_ort"] == pytest.approx(1.5)
    assert result["rows"]["tp-taylor"]["latency_ratio_ort_b1"] == pytest.approx(1.5)
    assert (stop["heads_kept"], stop["ffn_kept"]) == (18, 150)
    assert set(result["rows"]) == {"bmrs-n-kr", "tp-taylor"}
    assert result["distillation"]["cosine"][0] == pytest.approx(0.905)
    assert result["distillation"]["latency_ratio_ort"] == pytest.approx(2.0)
    rows = bench.table(result).splitlines()
    assert rows[2].startswith("| unpruned (fine-tuned) | 82.00 |")
    assert rows[3] == "| bmrs-n-kr | 81.00 ± 1.41 | -1.00 | 50.5% | 18.0 | 150 | 2.00x | 2.00x | 1.25x | 1.00x | 2 |"
    assert rows[-1].startswith("| bmrs-n-kr | 0.9050 ± 0.0071 | 0.500 ± 0.000 | 60.0% |")
    png = tmp_path / "minilm.png"
    bench.figure(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.check_writable(png)  # a figure it wrote may be replaced


def test_files_it_did_not_write_are_not_replaced(bench, tmp_path):
    mine = tmp_path / "minilm.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(BMRSError, match="not written by this script"):
        bench.check_writable(mine)
    (tmp_path / "minilm.png").mkdir()
    with pytest.raises(BMRSError, match="not written by this script"):
        bench.check_writable(tmp_path / "minilm.png")
    mine.write_text(json.dumps({"format": bench.FORMAT}))
    bench.check_writable(mine)
    bench.check_writable(tmp_path / "absent.json")


@pytest.mark.parametrize("tolerance, dim", [(0.01, 384), (0.1, 384), (0.5, 384), (0.05, 3), (0.3, 16)])
def test_concentration_gives_the_mean_cosine_distance_asked_for(bench, tolerance, dim):
    import mpmath

    kappa = bench.concentration(tolerance, dim)
    with mpmath.workdps(50):  # E[cos] of a von Mises-Fisher in dim dimensions: I_{d/2}(k) / I_{d/2-1}(k)
        mean_cos = mpmath.besseli(dim / 2, kappa) / mpmath.besseli(dim / 2 - 1, kappa)
    assert float(1 - mean_cos) == pytest.approx(tolerance, rel=1e-9)
    if dim == 3:  # on the 2-sphere E[cos] = coth(k) - 1/k
        assert 1 - (1 / math.tanh(kappa) - 1 / kappa) == pytest.approx(tolerance, rel=1e-9)
    if tolerance == 0.01:  # small tolerances: about (d - 1) / (2 T)
        assert kappa == pytest.approx((dim - 1) / (2 * tolerance), rel=0.01)


def test_other_run_folders_join_the_summary_under_their_label(bench, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    row = {"accuracy": [80.0, 1.0], "params_ratio": 0.7, "heads_kept": 72.0, "ffn_kept": 10.0, "latency_ratio_ort": 1.7,
           "latency_ratio_ort_b1": 1.6, "latency_ratio_eager": 1.8, "latency_ratio_eager_b1": 1.5, "seeds": 3}
    distillation = {"cosine": [0.99, 0.0], "recall_at_10": [0.9, 0.0], "params_ratio": 1.0, "heads_kept": 72.0,
                    "ffn_kept": 9216.0, "latency_ratio_ort": 1.0, "latency_ratio_eager": 1.0, "seeds": 1}
    (other / "minilm.json").write_text(json.dumps({"format": bench.FORMAT, "rows": {"bmrs-n-kr": row},
                                                   "distillation": distillation, "config": {"epochs": 4}}))
    result = {"base": {"accuracy": 81.0, "accuracy_seeds": [81.0]}, "rows": {},
              "config": {"latency_batches": [1, 32]}}
    merged = bench.add_variants(result, [f"long={other}"])
    assert merged["rows"] == {"bmrs-n-kr (long)": row}
    assert merged["distillation_variants"] == {"long": distillation} and merged["variants"] == {"long": {"epochs": 4}}
    assert "| bmrs-n-kr (long) | 80.00 ± 1.00 | -1.00 |" in bench.table(merged)
    (other / "minilm.json").write_text('{"rows": {}}')
    with pytest.raises(BMRSError, match="not written by this script"):
        bench.add_variants(result, [f"long={other}"])
    with pytest.raises(BMRSError, match="does not exist"):
        bench.add_variants(result, [f"x={tmp_path / 'absent'}"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--with", "nolabel"])
