"""The evidence report and calibration (bmrs.pruning.explain, bmrs.calibration, bmrs explain),
each number against an independent computation: quantiles and counts from the gate
diagnostics' own delta F and margins, ECE from a direct loop over the bins, NLL from
PyTorch's cross entropy, the Monte Carlo predictive from sampling by hand."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bmrs
from bmrs.calibration import calibration, expected_calibration_error, model_calibration, predict
from bmrs.cli import main
from bmrs.experiments.analysis import gate_diagnostics
from bmrs.pruning import explain, make_criterion, set_masks

# the recommended settings on a tiny digits MLP, trained long enough to prune
TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "8", "--finetune-epochs", "1",
        "--batch-size", "32", "--lr", "0.05", "--threads", "1", "--no-progress"]


def gated_model(seed=0):
    """An MLP on random data whose gates have varied posteriors and some masks."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 5))
    bmrs.attach_gates(net, torch.randn(2, 12))
    with torch.no_grad():
        for gate in bmrs.gates(net).values():
            gate.loc.copy_(torch.randn(gate.num_structures) * 2)
            gate.log_scale.copy_(torch.rand(gate.num_structures) * 4 - 3)
    return net


def ece_by_loop(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels))
                   if lo <= probs[i].max() < hi or (b == bins - 1 and probs[i].max() == 1.0)]
        if members:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in members])
            confidence = np.mean([probs[i].max() for i in members])
            total += len(members) / len(labels) * abs(accuracy - confidence)
    return total


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(2, 6), st.integers(0, 10_000), st.floats(0.1, 8.0))
def test_ece_equals_a_direct_loop_over_the_bins(n, classes, seed, sharpness):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(n, classes, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(classes, (n,), generator=g)
    ece, table = expected_calibration_error(probs, labels)
    assert ece == pytest.approx(ece_by_loop(probs.numpy(), labels.numpy()), abs=1e-12)
    assert sum(row["count"] for row in table) == n and len(table) == 15


def test_a_confidence_of_one_falls_into_the_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ece, table = expected_calibration_error(probs, torch.tensor([0, 0]))
    assert table[-1]["count"] == 2 and ece == pytest.approx(0.5)


def test_nll_and_accuracy_are_pytorchs_of_the_eval_outputs():
    net = gated_model()
    x, y = torch.randn(50, 12), torch.randint(5, (50,))
    found = calibration(*predict(net, [(x[:20], y[:20]), (x[20:], y[20:])]))
    net.eval()
    with torch.no_grad():
        logits = net(x).double()
    assert found["nll"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-9)
    assert found["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert found["examples"] == 50


def test_the_predictive_averages_sampled_passes_and_leaves_the_random_stream_alone():
    net = gated_model()
    x, y = torch.randn(30, 12), torch.randint(5, (30,))
    before = torch.get_rng_state()
    probs, _ = predict(net, [(x, y)], draws=5, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    net.eval()
    for gate in bmrs.gates(net).values():
        gate.train()
    with torch.no_grad():
        by_hand = sum(torch.softmax(net(x).double(), dim=1) for _ in range(5)) / 5
    torch.testing.assert_close(probs, by_hand, rtol=0, atol=1e-12)
    net.eval()
    eval_probs, _ = predict(net, [(x, y)])
    assert not torch.allclose(probs, eval_probs)  # theta was sampled
    with pytest.raises(bmrs.BMRSError, match="draws"):
        predict(net, [(x, y)], draws=-1)


def test_the_compacted_model_is_calibrated_as_the_gated_one_and_unpruned_clears_the_masks():
    net = gated_model()
    masks = {name: torch.rand(g.num_structures) > 0.4 for name, g in bmrs.gates(net).items()}
    set_masks(net, masks)
    x, y = torch.randn(40, 12), torch.randint(5, (40,))
    found = model_calibration(net, [(x, y)], bmrs.compact(net, x[:8]), draws=3)
    assert set(found) == {"unpruned", "gated", "compacted", "predictive"} and found["predictive"]["draws"] == 3
    assert found["compacted"]["nll"] == pytest.approx(found["gated"]["nll"], rel=1e-5)
    cleared = gated_model()
    assert found["unpruned"]["nll"] == pytest.approx(calibration(*predict(cleared, [(x, y)]))["nll"], rel=1e-12)
    assert all(bool(g.mask.all()) is False for g in bmrs.gates(net).values())  # the model keeps its masks


@pytest.mark.parametrize("label", ["bmrs-n", "bmrs-n-kr", "bmrs-n-code", "bmrs-u8", "bmrs-n-rel"])
def test_explain_agrees_with_the_gate_diagnostics(label):
    net = gated_model()
    name, options = bmrs.pruning.criteria.parse_label(label)
    criterion = make_criterion(name, **options)
    bmrs.prune(net, criterion)
    with torch.no_grad():
        torch.manual_seed(3)
        masks = {n: g.mask > 0 for n, g in bmrs.gates(net).items()}
        first = next(iter(masks))
        masks[first] = masks[first].clone()
        masks[first][torch.randperm(len(masks[first]))[:4]] ^= True  # decisions against the evidence
        set_masks(net, masks)
    report = explain(net, criterion)
    records = gate_diagnostics(net, {label: criterion})
    layer = bmrs.layer_names(net)
    for e in report.layers:
        rows = [r for r in records if layer[r["gate"]] == e.layer]
        distance = np.array([r[f"delta_f[{label}]"] - r[f"margin[{label}]"] for r in rows])
        pruned_by_rule = np.array([r[f"pruned[{label}]"] for r in rows])
        gate = next(g for n, g in bmrs.gates(net).items() if layer[n] == e.layer)
        kept = gate.mask.numpy() > 0
        np.testing.assert_allclose(e.delta_f_minus_margin, distance, rtol=1e-12, atol=1e-12)
        for chosen, quantiles in ((kept, e.kept_quantiles), (~kept, e.removed_quantiles)):
            if chosen.any():
                np.testing.assert_allclose(quantiles, np.quantile(distance[chosen], [0, 0.25, 0.5, 0.75, 1]), rtol=1e-9)
            else:
                assert quantiles is None
        assert e.kept == kept.sum() and e.total == len(rows)
        assert e.ambiguous == int((np.abs(distance) < 1).sum())
        assert e.evidence_removes == int(pruned_by_rule.sum())
        against, beyond = ~kept & ~pruned_by_rule, kept & pruned_by_rule
        assert (e.removed_against, e.kept_beyond) == (int(against.sum()), int(beyond.sum()))
        assert e.evidence_spent == pytest.approx(float(np.abs(distance[against | beyond]).sum()), abs=1e-12)
    assert report.summary()["removed_against"] + report.summary()["kept_beyond"] > 0
    share = {e.layer: e.evidence_removes / e.total for e in report.layers}
    assert share[report.most_overparameterised] == max(share.values())


def test_explain_refuses_a_baseline_and_a_model_without_gates():
    with pytest.raises(bmrs.BMRSError, match="not an evidence criterion"):
        explain(gated_model(), make_criterion("l2"))
    with pytest.raises(bmrs.BMRSError, match="no gates"):
        explain(torch.nn.Linear(3, 2), make_criterion("bmrs-n"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_a_runs_metrics_hold_its_evidence_and_calibration(run):
    metrics = json.loads((run / "metrics.json").read_text())
    ev, cal = metrics["evidence"], metrics["calibration"]
    assert ev["criterion"] == "bmrs-n-kr" and set(ev["layers"]) == set(metrics["kept"])
    assert all(ev["layers"][n]["kept"] == k for n, k in metrics["kept"].items())
    assert cal["gated"]["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    assert cal["compacted"]["nll"] == pytest.approx(cal["gated"]["nll"], rel=1e-5)
    assert "bins" not in cal["gated"]


def test_bmrs_explain_prints_writes_and_refuses_to_replace(run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["explain", str(run), "--out", str(out), "--draws", "3", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "| layer | kept |" in text and "ambiguous" in text and "Monte Carlo predictive" in text
    assert {p.name for p in out.iterdir()} == {"explain.json", "explain.md", "evidence.png", "reliability.png"}
    data = json.loads((out / "explain.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert data["evidence"] == metrics["evidence"]  # the same report as the run recorded
    assert data["evidence"]["evidence_removes"] > 0
    assert data["calibration"]["gated"]["nll"] == pytest.approx(metrics["calibration"]["gated"]["nll"])
    assert main(["explain", str(run), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["explain", str(run), "--criterion", "l2", "--draws", "0"]) == 2
    assert "not an evidence criterion" in capsys.readouterr().err


def test_bmrs_explain_with_a_budget_says_what_it_forced(run, capsys):
    assert main(["explain", str(run), "--budget", "params=0.3", "--draws", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ev = data["evidence"]
    assert data["budget"]["pruned"] >= data["budget"]["budget_pruned"]
    assert ev["removed_against"] == data["budget"]["pruned"] - ev["evidence_removes"] + ev["kept_beyond"]
    assert ev["removed_against"] > 0 and ev["evidence_spent"] > 0
    assert "predictive" not in data["calibration"]
