"""The paper comparison, the knee analysis and the gate diagnostics of reports.

Synthetic suite directories (files in the format ``bmrs train`` and ``bmrs sweep`` write)
with known numbers, sweeps whose piecewise-linear curves have known knees, and one tiny
real run whose gate posteriors are set by hand, checked against the closed forms of
docs/math.md computed here with the standard library.
"""

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bmrs.cli import main
from bmrs.experiments.analysis import diagnose_runs, run_diagnostics
from bmrs._io import state_checksum
from bmrs.experiments.runs import train_run
from bmrs.rundir import RunConfig
from bmrs.reporting import collect, write_report
from bmrs.reporting.diagnostics import select_runs
from bmrs.reporting.collect import SweepResult
from bmrs.reporting.knees import knee, knee_analysis, knees_markdown
from bmrs.reporting.paper import PAPER_TABLES, compare, comparison_markdown, paper_summary, paper_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Our synthetic results per model and label: (compression, accuracy) in percent for 3 seeds.
# Each triple is centre - d, centre, centre + d: mean = centre, sample std = d.
OURS = {
    "mlp": {
        "none": ((0.0, 0.0), (88.0, 0.3)),
        "bmrs-n": ((0.0, 0.0), (86.0, 0.5)),
        "bmrs-n-code": ((90.0, 1.0), (84.0, 0.4)),
        "bmrs-n-rel": ((92.0, 2.0), (85.0, 0.2)),
        "bmrs-u8": ((93.5, 0.5), (85.5, 0.1)),
        "l2": ((90.0, 1.0), (20.0, 5.0)),
        "taylor": ((90.0, 1.0), (60.0, 3.0)),  # no row in the paper
    },
    "lenet5": {
        "none": ((0.0, 0.0), (89.0, 0.2)),
        "bmrs-n-code": ((85.0, 2.0), (80.0, 1.0)),
        "bmrs-u4": ((88.0, 0.5), (81.5, 0.5)),
    },
}


def _config(model, label, seed, dataset="fashion-mnist"):
    method, bits = ("bmrs-u", float(label[len("bmrs-u"):])) if label.startswith("bmrs-u") else (label, 8.0)
    config = RunConfig(dataset=dataset, model=model, method=method, bits=bits, seed=seed, epochs=50,
                       finetune_epochs=10, recompute_masks=True, kl_reduction="mean")
    return asdict(config.resolved())


def write_run(folder, config, comp, acc):
    """A complete run directory as train_run writes it (the fields a report reads; fractions)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    widths = {"mlp": {"fc1": 150, "fc2": 150}, "lenet5": {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}}[config["model"]]
    kept = {k: max(1, round(v * (1 - comp))) for k, v in widths.items()}
    metrics = {
        "test_accuracy": acc, "test_loss": 0.5, "val_accuracy": acc, "structure_compression": comp,
        "parameter_compression": comp, "kept": kept, "structures": widths, "best_epoch": 60,
        "train_seconds": 1.0, "history": [],
        "compaction": {"error": "synthetic", "architecture": {"name": config["model"], "input_shape": [1, 32, 32],
                                                              "num_classes": 10, "options": {}}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def make_suite(root, models=OURS, dataset="fashion-mnist"):
    """RUN/train/{model}/{label}/seed-{s} for 3 seeds with OURS' means and stds."""
    for model, rows in models.items():
        for label, ((c, dc), (a, da)) in rows.items():
            for seed, k in enumerate((-1, 0, 1)):
                write_run(root / "train" / model / label / f"seed-{seed}", _config(model, label, seed, dataset),
                          (c + k * dc) / 100, (a + k * da) / 100)
    return root


# --- sweeps with known knees -------------------------------------------------------------------

LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def flat_then_linear(kink, top=0.9, bottom=0.1):
    """Accuracy flat at ``top`` up to ``kink``, then falling linearly to ``bottom`` at 1:
    its Kneedle knee is the kink, (kink, top)."""
    return lambda x: top if x <= kink else top - (top - bottom) * (x - kink) / (1 - kink)


CURVES = {"bmrs-n": flat_then_linear(0.4), "bmrs-n-code": flat_then_linear(0.4), "l2": flat_then_linear(0.6)}
STOPS = {0: {"bmrs-n": (0.5, 0.85), "bmrs-n-code": (0.6, 0.9)}, 1: {"bmrs-n": (0.7, 0.75), "bmrs-n-code": (0.6, 0.9)}}


def write_sweep(folder, model, seed, dataset="fashion-mnist"):
    folder.mkdir(parents=True)
    records = []
    for criterion, curve in CURVES.items():
        for level in LEVELS:
            records.append({"criterion": criterion, "kind": "level", "target": level, "structure_compression": level,
                            "parameter_compression": level, "accuracy": curve(level)})
        if criterion in STOPS[seed]:
            comp, acc = STOPS[seed][criterion]
            records.append({"criterion": criterion, "kind": "stop", "target": None, "structure_compression": comp,
                            "parameter_compression": comp, "accuracy": acc})
    data = {"config": {"split": "test", "criteria": list(CURVES), "levels": list(LEVELS)},
            "run_config": _config(model, "none", seed, dataset), "model_accuracy": 0.9, "seconds": 1.0,
            "records": records}
    (folder / "sweep.json").write_text(json.dumps(data))


# --- the comparison --------------------------------------------------------------------------


def test_paper_table_holds_table_1():
    fm = paper_table("fashion-mnist")
    assert set(fm) == {"mlp", "lenet5"}
    assert set(fm["mlp"]) == set(fm["lenet5"]) == {"none", "l2", "etheta", "snr", "bmrs-n", "bmrs-u8", "bmrs-u4"}
    assert fm["mlp"]["bmrs-n"] == {"param_compression": [93.20, 0.66], "accuracy": [84.99, 0.35], "seeds": 10}
    assert fm["lenet5"]["bmrs-u4"] == {"param_compression": [88.72, 0.73], "accuracy": [81.10, 1.50], "seeds": 10}
    assert fm["lenet5"]["etheta"]["accuracy"] == [50.93, None]  # no spread published
    assert fm["mlp"]["none"]["accuracy"] == [88.17, 0.20]
    fm["mlp"]["none"]["accuracy"][0] = 0.0  # a copy: the module's table is untouched
    assert PAPER_TABLES["fashion-mnist"]["mlp"]["none"]["accuracy"][0] == 88.17
    with pytest.raises(ValueError, match="no published numbers"):
        paper_table("cifar10")


def test_paper_summary_shape_and_values(tmp_path):
    make_suite(tmp_path / "suite")
    make_suite(tmp_path / "other", {"mlp": {"none": ((0.0, 0.0), (97.0, 0.1))}}, dataset="digits")
    runs = collect([tmp_path]).runs
    summary = paper_summary(runs, "fashion-mnist")
    assert set(summary) == {"mlp", "lenet5"}  # plain model keys: the digits runs are left out
    for model, rows in OURS.items():
        assert set(summary[model]) == set(rows)
        for label, ((c, dc), (a, da)) in rows.items():
            entry = summary[model][label]
            assert set(entry) == {"param_compression", "accuracy", "seeds"}
            assert entry["seeds"] == 3
            assert entry["param_compression"] == pytest.approx([c, dc], abs=1e-9)
            assert entry["accuracy"] == pytest.approx([a, da], abs=1e-9)


def test_compare_differences_and_rows(tmp_path):
    summary = paper_summary(collect([make_suite(tmp_path)]).runs)
    table = compare(summary, "fashion-mnist")
    assert list(table) == ["mlp", "lenet5"]
    mlp = table["mlp"]
    assert list(mlp) == ["none", "l2", "etheta", "snr", "bmrs-n", "bmrs-n-code", "bmrs-n-rel", "bmrs-n-kr", "bmrs-u8", "bmrs-u4",
                         "taylor"]
    # both BMRS_N variants of ours meet the paper's BMRS_N row
    assert mlp["bmrs-n-code"]["paper_row"] == mlp["bmrs-n"]["paper_row"] == "bmrs-n"
    assert mlp["bmrs-n-code"]["difference"] == pytest.approx({"param_compression": 90.0 - 93.20, "accuracy": 84.0 - 84.99})
    assert mlp["bmrs-n"]["difference"] == pytest.approx({"param_compression": -93.20, "accuracy": 86.0 - 84.99})
    assert mlp["l2"]["difference"] == pytest.approx({"param_compression": 90.0 - 87.86, "accuracy": 20.0 - 18.23})
    assert mlp["bmrs-u8"]["difference"] == pytest.approx({"param_compression": 93.5 - 93.02, "accuracy": 85.5 - 85.01})
    assert table["lenet5"]["bmrs-u4"]["difference"] == pytest.approx({"param_compression": 88.0 - 88.72,
                                                                       "accuracy": 81.5 - 81.10})
    # ours missing, or no published number: no difference
    assert mlp["etheta"]["ours"] is None and mlp["etheta"]["paper"] is not None and mlp["etheta"]["difference"] is None
    assert mlp["bmrs-n-rel"]["paper"] is None and mlp["bmrs-n-rel"]["difference"] is None
    assert mlp["taylor"]["paper"] is None and mlp["taylor"]["ours"]["seeds"] == 3


def _rows(markdown, section):
    """Table rows of ``## section`` as {first cell: [cells]}."""
    part = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_comparison_markdown(tmp_path):
    summary = paper_summary(collect([make_suite(tmp_path)]).runs)
    md = comparison_markdown(summary, "fashion-mnist")
    mlp = _rows(md, "mlp")
    # ours comp, ours acc, n, paper row, paper comp, paper acc, diff comp, diff acc
    assert mlp["bmrs-n-code"] == ["90.00 ± 1.00", "84.00 ± 0.40", "3", "BMRS_N", "93.20 ± 0.66", "84.99 ± 0.35",
                                  "-3.20", "-0.99"]
    assert mlp["bmrs-n"] == ["0.00 ± 0.00", "86.00 ± 0.50", "3", "BMRS_N", "93.20 ± 0.66", "84.99 ± 0.35",
                             "-93.20", "+1.01"]
    assert mlp["l2"][3:] == ["L2 (matched)", "87.86", "18.23", "+2.14", "+1.77"]
    assert mlp["none"][3:] == ["None", "0.00", "88.17 ± 0.20", "0.00", "-0.17"]
    assert mlp["etheta"] == ["—", "—", "0", "E[θ] < 0.1", "91.76", "85.59", "—", "—"]
    assert mlp["bmrs-n-rel"][3:] == ["—"] * 5
    assert mlp["taylor"][:3] == ["90.00 ± 1.00", "60.00 ± 3.00", "3"]
    lenet = _rows(md, "lenet5")
    assert lenet["bmrs-u4"] == ["88.00 ± 0.50", "81.50 ± 0.50", "3", "BMRS_U-4", "88.72 ± 0.73", "81.10 ± 1.50",
                                "-0.72", "+0.40"]
    assert lenet["snr"][:3] == ["—", "—", "0"] and lenet["snr"][4:6] == ["98.47", "17.01"]


# --- knees -------------------------------------------------------------------------------------


def _sweeps(tmp_path):
    for seed in (0, 1):
        write_sweep(tmp_path / "sweep" / "mlp" / f"seed-{seed}", "mlp", seed)
    return collect([tmp_path]).sweeps


def test_knee_analysis_of_known_curves(tmp_path):
    analysis = knee_analysis(_sweeps(tmp_path))
    entry = analysis["models"]["mlp"]
    assert entry["seeds"] == [0, 1] and len(entry["sweeps"]) == 2
    curves = entry["curves"]
    assert curves["bmrs-n"]["knee"]["compression"] == pytest.approx([40.0, 0.0], abs=0.2)
    assert curves["bmrs-n"]["knee"]["accuracy"] == pytest.approx([90.0, 0.0], abs=0.2)
    assert curves["l2"]["knee"]["compression"] == pytest.approx([60.0, 0.0], abs=0.2)
    # mean accuracy over [0, 1]: 0.9 up to the kink, then the trapezoid down to 0.1
    assert curves["l2"]["auc"][0] == pytest.approx(100 * (0.9 * 0.6 + 0.5 * 0.4), abs=0.05)
    assert curves["bmrs-n"]["auc"][0] == pytest.approx(100 * (0.9 * 0.4 + 0.5 * 0.6), abs=0.05)
    assert entry["best_criterion"] == "l2"

    s = entry["stops"]["bmrs-n"]  # stops (50, 85) and (70, 75)
    assert s["n"] == 2
    assert s["stop"]["compression"] == pytest.approx([60.0, math.sqrt(200)])
    assert s["stop"]["accuracy"] == pytest.approx([80.0, math.sqrt(50)])
    assert s["own_knee"]["compression"][0] == pytest.approx(40.0, abs=0.2)
    assert s["to_own_knee"]["compression"] == pytest.approx([20.0, math.sqrt(200)], abs=0.2)
    assert s["to_own_knee"]["accuracy"] == pytest.approx([-10.0, math.sqrt(50)], abs=0.2)
    assert s["to_best_knee"]["compression"] == pytest.approx([0.0, math.sqrt(200)], abs=0.2)
    assert s["to_best_knee"]["accuracy"] == pytest.approx([-10.0, math.sqrt(50)], abs=0.2)
    # best curve at 50 %: l2 at 90; at 70 %: l2 at 0.9 - 0.8 * 0.1 / 0.4 = 0.7
    assert s["best_at_stop"]["accuracy"] == pytest.approx([80.0, math.sqrt(200)])
    assert s["best_at_stop"]["criteria"] == {"l2": 2}
    assert s["to_best_at_stop"]["accuracy"] == pytest.approx([0.0, math.sqrt(50)])
    code = entry["stops"]["bmrs-n-code"]  # stops at (60, 90) twice: the best knee itself
    assert code["to_best_knee"]["compression"] == pytest.approx([0.0, 0.0], abs=0.2)
    assert code["to_own_knee"]["compression"] == pytest.approx([20.0, 0.0], abs=0.2)
    assert code["to_best_at_stop"]["accuracy"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert set(entry["stops"]) == {"bmrs-n", "bmrs-n-code"}  # no stop, no entry
    assert entry["per_sweep"][1]["stops"]["bmrs-n"]["stop"] == pytest.approx([70.0, 75.0])

    md = knees_markdown(analysis)
    assert "Kneedle" in md and "kneed" in md
    assert "**`l2`**" in md  # the best criterion is marked
    stops = md.split("### Stopping points", 1)[1]
    row = next(line for line in stops.splitlines() if line.startswith("| `bmrs-n` "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["60.00 ± 14.14", "80.00 ± 7.07", "40.00 / 90.00"]
    assert cells[4] == "+20.00 ± 14.14" and cells[5] == "-10.00 ± 7.07"
    assert cells[8].startswith("80.00 ± 14.14 (l2 ×2)")


def test_knee_is_kneedles_and_a_curve_without_one_keeps_its_mean_accuracy():
    # the kink of a flat-then-falling curve, with repeated levels averaged first
    assert knee([0.0, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0], [0.9, 0.9, 0.89, 0.91, 0.7, 0.4, 0.1]) == pytest.approx((0.4, 0.9))
    assert knee([0.0, 0.5, 1.0], [0.8, 0.5, 0.2]) is None  # a straight line has no knee
    with pytest.raises(ValueError, match="three distinct"):
        knee([0.0, 1.0, 1.0], [0.9, 0.1, 0.2])
    records = [{"criterion": c, "kind": "level", "parameter_compression": x, "accuracy": f(x)}
               for c, f in (("l2", flat_then_linear(0.6)), ("random", lambda x: 0.9 - 0.8 * x)) for x in LEVELS]
    sweep = SweepResult(path=Path("s"), data={"records": records, "run_config": {"dataset": "digits", "model": "mlp", "seed": 0}})
    curves = knee_analysis([sweep])["models"]["mlp"]["curves"]
    assert curves["random"]["knee"] is None and curves["random"]["auc"] == pytest.approx([50.0, 0.0])
    assert curves["l2"]["knee"]["compression"] == pytest.approx([60.0, 0.0])


def test_knee_keys_with_several_datasets(tmp_path):
    write_sweep(tmp_path / "a", "mlp", 0, dataset="fashion-mnist")
    write_sweep(tmp_path / "b", "mlp", 0, dataset="digits")
    analysis = knee_analysis(collect([tmp_path]).sweeps)
    assert set(analysis["models"]) == {"fashion-mnist/mlp", "digits/mlp"}
    assert analysis["models"]["digits/mlp"]["stops"]["bmrs-n"]["n"] == 1


# --- gate diagnostics of a real (tiny) run -----------------------------------------------------

RELAXED = (-4.0, 5.0)   # prior-like: exact N keeps (a tie just below 0), code N and n-rel prune
STRONG = (-0.5, -3.0)   # theta ~ 0.6, confident: nobody prunes
AT_ZERO = (-19.5, 0.0)  # mass at theta ~ e^-20: every BMRS_N prunes; BMRS_U's interval lies above it
SMALL = (-10.0, -1.0)   # theta ~ e^-10: inside BMRS_U's interval, far from BMRS_N's spike
GATE2 = [RELAXED, RELAXED, RELAXED, STRONG, STRONG, AT_ZERO, AT_ZERO, SMALL]


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def _z(mu, sigma, a=-20.0, b=0.0):
    return _phi((b - mu) / sigma) - _phi((a - mu) / sigma)


def delta_f_n(mu, log_sigma, a=-20.0, b=0.0):
    """Savage-Dickey limit of the exact BMRS_N (spike at a): log[(b - a) q(a)]."""
    sigma = math.exp(log_sigma)
    log_density = -0.5 * ((a - mu) / sigma) ** 2 - math.log(math.sqrt(2 * math.pi) * sigma * _z(mu, sigma))
    return math.log(b - a) + log_density


def delta_f_u(mu, log_sigma, bits, a=-20.0, b=0.0):
    sigma = math.exp(log_sigma)
    lo, hi = math.log(2.0 ** -23), math.log(2.0 ** -bits)
    mass = (_phi((hi - mu) / sigma) - _phi((lo - mu) / sigma)) / _z(mu, sigma)
    return (math.log(mass) if mass > 0 else -math.inf) - math.log((hi - lo) / (b - a))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A digits MLP (width 8) trained for 2 epochs, its gate posteriors then set by hand."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    run = root / "train" / "mlp" / "bmrs-n-code" / "seed-0"
    train_run(RunConfig(dataset="digits", model="mlp", method="bmrs-n-code", epochs=2, finetune_epochs=0,
                        kl_reduction="mean", model_options={"width": 8}), run, progress=False)
    state = torch.load(run / "model.pt", weights_only=True)
    state["act1.bmrs_gate.loc"] = torch.tensor([mu for mu, _ in GATE2])
    state["act1.bmrs_gate.log_scale"] = torch.tensor([s for _, s in GATE2])
    state["act1.bmrs_gate.mask"] = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1])  # the run removed two
    state["act2.bmrs_gate.loc"] = torch.full((8,), STRONG[0])
    state["act2.bmrs_gate.log_scale"] = torch.full((8,), STRONG[1])
    state["act2.bmrs_gate.mask"] = torch.ones(8)
    torch.save(state, run / "model.pt")
    # edited on purpose: record the new contents, as bmrs does for a model.pt it writes
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["checksums"]["model.pt"] = state_checksum(state)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return root, run


def test_the_hand_set_cases_are_what_they_claim():
    """The expectations below follow from docs/math.md's closed forms, computed independently."""
    assert -0.05 < delta_f_n(*RELAXED) < 0 < delta_f_n(*RELAXED) + 0.5 * math.log(2 * math.pi)
    assert delta_f_n(*STRONG) < -100 and delta_f_u(*STRONG, 8) < -100 and delta_f_u(*STRONG, 4) < -1
    assert delta_f_n(*AT_ZERO) > 1 and delta_f_u(*AT_ZERO, 8) < -1 and delta_f_u(*AT_ZERO, 4) < -1
    assert delta_f_n(*SMALL) < -100 and delta_f_u(*SMALL, 8) > 0.5 and delta_f_u(*SMALL, 4) > 0.3


def test_diagnostics_of_hand_set_posteriors(tiny_run, tmp_path):
    _, run = tiny_run
    diag = run_diagnostics(run)
    assert (diag.model, diag.dataset, diag.label, diag.seed) == ("mlp", "digits", "bmrs-n-code", 0)
    assert diag.layers == ["fc1", "fc2"]  # the layers the gates prune
    gate2 = diag.layer("fc1")
    for r, (mu, log_sigma) in zip(gate2, GATE2):
        assert r["mu"] == pytest.approx(mu) and r["log_sigma_clamped"] == pytest.approx(log_sigma)
        assert r["delta_f[bmrs-n]"] == pytest.approx(delta_f_n(mu, log_sigma), abs=1e-4, rel=1e-6)
        # delta_f[c] is the true delta F under c's reduced prior; margin[c] what it must reach
        for c in ("bmrs-n-code", "bmrs-n-kr", "bmrs-n-rel"):
            assert r[f"delta_f[{c}]"] == r["delta_f[bmrs-n]"]
        assert r["margin[bmrs-n]"] == 0.0 and r["margin[bmrs-u8]"] == 0.0
        assert r["margin[bmrs-n-code]"] == -0.5 * math.log(2 * math.pi)
        assert r["margin[bmrs-n-kr]"] == -1.0
        if delta_f_u(mu, log_sigma, 8) > -700:
            assert r["delta_f[bmrs-u8]"] == pytest.approx(delta_f_u(mu, log_sigma, 8), abs=1e-6, rel=1e-6)
    assert [r["delta_f[bmrs-n-rel]"] - r["margin[bmrs-n-rel]"] for r in gate2[:3]] == [0.0, 0.0, 0.0]  # the tie, exactly

    expected_u8 = sum(delta_f_u(*p, 8) >= 0 for p in GATE2)
    expected_u4 = sum(delta_f_u(*p, 4) >= 0 for p in GATE2)
    assert expected_u8 == expected_u4 == 4  # SMALL and the three relaxed ones (ties broken upward)
    median_relaxed = delta_f_n(*RELAXED)

    _, files, notes = diagnose_runs([run], tmp_path / "out")
    assert notes == []
    md = (tmp_path / "out" / "diagnostics.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| mlp / digits")]
    assert len(rows) == 2
    # run, layer, structures, masked, bmrs-n, bmrs-n-code, bmrs-n-rel, bmrs-n-kr, bmrs-u8, bmrs-u4, relaxed, median
    assert rows[0][1:11] == ["`fc1`", "8", "2", "2", "5", "5", "5", str(expected_u8), str(expected_u4), "3"]
    assert float(rows[0][11]) == pytest.approx(median_relaxed, rel=1e-3)
    assert rows[1][1:] == ["`fc2`", "8", "0", "0", "0", "0", "0", "0", "0", "0", "—"]

    with open(tmp_path / "out" / "diagnostics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 16 and {r["run"] for r in table} == {str(run)}
    first = table[0]
    assert (first["gate"], first["index"], first["method"], first["relaxed"], first["masked"]) == ("fc1", "0", "bmrs-n-code", "1", "1")
    assert [int(r["pruned[bmrs-n]"]) for r in table[:8]] == [0, 0, 0, 0, 0, 1, 1, 0]
    assert [int(r["pruned[bmrs-n-code]"]) for r in table[:8]] == [1, 1, 1, 0, 0, 1, 1, 0]
    for name in ("posteriors_digits_mlp_bmrs-n-code_seed-0.png", "delta-f_digits_mlp_bmrs-n-code_seed-0.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10000
        assert f"]({name})" in md and files[name] == tmp_path / "out" / name


def test_write_diagnostics_notes_runs_without_a_model(tmp_path):
    make_suite(tmp_path, {"mlp": {"none": ((0.0, 0.0), (88.0, 0.3))}})
    diags, files, notes = diagnose_runs([tmp_path / "train/mlp/none/seed-0"], tmp_path / "out")
    assert diags == [] and files == {} and len(notes) == 1 and "model.pt" in notes[0]


def test_select_runs_takes_the_lowest_seed_of_each_method(tmp_path):
    make_suite(tmp_path)
    chosen = select_runs(collect([tmp_path]).runs)
    assert [(r.model, r.label, r.seed) for r in chosen] == [
        ("lenet5", "none", 0), ("lenet5", "bmrs-n-code", 0),
        ("mlp", "none", 0), ("mlp", "bmrs-n", 0), ("mlp", "bmrs-n-code", 0), ("mlp", "bmrs-n-rel", 0),
        ("mlp", "bmrs-u8", 0)]


# --- the report --------------------------------------------------------------------------------


def test_write_report_with_paper_and_analysis(tmp_path, tiny_run):
    suite = make_suite(tmp_path / "suite")
    for seed in (0, 1):
        write_sweep(suite / "sweep" / "mlp" / f"seed-{seed}", "mlp", seed)
    out = tmp_path / "report"
    collection = collect([suite, tiny_run[0]])
    report = write_report(collection, out, paper="fashion-mnist", analysis=True)
    _, _, diagnostic_notes = diagnose_runs(select_runs(collection.runs), out)  # what bmrs reproduce adds
    names = {p.name for p in out.iterdir()}
    assert {"results.md", "results.json", "accuracy_vs_compression.png", "widths.png", "comparison.md",
            "comparison.json", "paper-fmnist.json", "knees.md", "knees.json", "diagnostics.md",
            "diagnostics.csv"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary files left
    paper = json.loads((out / "paper-fmnist.json").read_text())
    assert set(paper) == {"mlp", "lenet5"}  # the digits run is not part of it
    assert paper["mlp"]["bmrs-n-code"] == {"param_compression": pytest.approx([90.0, 1.0]),
                                           "accuracy": pytest.approx([84.0, 0.4]), "seeds": 3}
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["lenet5"]["bmrs-n-code"]["difference"]["accuracy"] == pytest.approx(80.0 - 77.90)
    assert json.loads((out / "knees.json").read_text())["models"]["mlp"]["best_criterion"] == "l2"
    # diagnostics: the digits run is rebuilt; the synthetic runs have no model.pt and are noted
    md = (out / "diagnostics.md").read_text()
    assert "mlp / digits, bmrs-n-code, seed 0" in md and "fashion-mnist" not in md.split("## Figures")[0]
    assert any("model.pt" in n for n in report.notes + diagnostic_notes)
    assert "posteriors_digits_mlp_bmrs-n-code_seed-0.png" in names
    # without the options the report is as before
    plain = write_report([suite], tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "accuracy_vs_compression.png", "results.json", "results.md", "widths.png"]
    assert set(plain.summary) == {"mlp", "lenet5"} and set(report.summary) == {
        "fashion-mnist/mlp", "fashion-mnist/lenet5", "digits/mlp"}
    with pytest.raises(ValueError, match="no published numbers"):
        write_report([suite], tmp_path / "bad", paper="cifar10")
    assert not (tmp_path / "bad").exists()


def test_cli_report_paper_option(tmp_path, capsys):
    suite = make_suite(tmp_path / "suite")
    out = tmp_path / "report"
    assert main(["report", str(suite), "--out", str(out), "--paper", "fashion-mnist"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "comparison.md") in printed and str(out / "paper-fmnist.json") in printed
    assert "## lenet5" in (out / "comparison.md").read_text()
    assert not (out / "knees.md").exists() and not (out / "diagnostics.md").exists()
    # --analysis adds what 'bmrs reproduce' writes
    assert main(["report", str(suite), "--out", str(out), "--paper", "fashion-mnist", "--analysis"]) == 0
    # (this suite holds result files only: no sweeps to take knees of, no models to diagnose)
    assert "diagnostics: " in capsys.readouterr().err and not (out / "knees.md").exists()
    assert main(["report", str(suite), "--out", str(tmp_path / "r2"), "--paper", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no published numbers" in err


def test_cli_reproduce_writes_the_paper_sections(tmp_path, capsys, monkeypatch, tiny_run):
    """reproduce's report, with the suite itself replaced by files already in place."""
    import bmrs.experiments.suites as suites

    suite = make_suite(tmp_path / "suite")
    for seed in (0, 1):
        write_sweep(suite / "sweep" / "mlp" / f"seed-{seed}", "mlp", seed)
    calls = []
    monkeypatch.setattr(suites, "run_suite", lambda name, out, **kw: calls.append(name) or [])
    assert main(["reproduce", "paper-fmnist", "--out", str(suite), "--no-progress"]) == 0
    assert calls == ["paper-fmnist"]
    report = suite / "report"
    for name in ("comparison.md", "paper-fmnist.json", "knees.md", "knees.json", "results.md"):
        assert (report / name).is_file(), name
    printed = capsys.readouterr().out
    assert str(report / "knees.md") in printed
    # the quick suite has no published numbers: no comparison, but knees and diagnostics
    quick = tmp_path / "quick"
    root = tiny_run[0]
    import shutil

    shutil.copytree(root, quick)
    for seed in (0, 1):
        write_sweep(quick / "sweep" / "mlp" / f"seed-{seed}", "mlp", seed, dataset="digits")
    assert main(["reproduce", "quick", "--out", str(quick), "--no-progress"]) == 0
    names = {p.name for p in (quick / "report").iterdir()}
    assert "comparison.md" not in names and "paper-fmnist.json" not in names
    assert {"knees.md", "knees.json", "diagnostics.md", "diagnostics.csv"} <= names
