"""bmrs.reporting on synthetic result files: collecting, grouping, statistics, files."""

import json
import math
import statistics

import pytest

from bmrs.reporting import collect, format_mean_std, mean_std, method_label, summarize, write_report
from bmrs.reporting.collect import natural_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, *, method="bmrs-n", bits=8.0, seed=0, acc=0.9, comp=0.5, model="mlp", dataset="digits",
             kept=None, complete=True, **extra):
    """A run directory with the files bmrs train writes (only the fields the report reads)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"dataset": dataset, "model": model, "method": method, "bits": bits, "seed": seed, "epochs": 5,
              "model_options": {"width": 8}, "data_dir": None, "match": None, **extra}
    (run / "config.json").write_text(json.dumps(config))
    kept = kept or {"2": 5, "4": 3}
    if complete:
        metrics = {
            "test_accuracy": acc, "parameter_compression": comp, "structure_compression": comp / 2,
            "kept": kept, "structures": {k: 8 for k in kept}, "train_seconds": 1.0, "history": [],
            "compaction": {"parameters_before": 1000, "parameters_after": 400, "flops_before": 2000,
                           "flops_after": 500, "file": "compact.pt"},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def make_sweep(root, name, *, model="mlp", dataset="digits"):
    folder = root / name
    folder.mkdir(parents=True)
    records = []
    for criterion, stop in (("bmrs-n", (0.42, 0.9)), ("l2", None)):
        for target, acc in ((0.0, 0.95), (0.5, 0.9), (0.9, 0.4)):
            records.append({"criterion": criterion, "kind": "level", "target": target, "structure_compression": target,
                            "parameter_compression": target, "accuracy": acc})
        if stop:
            records.append({"criterion": criterion, "kind": "stop", "target": None, "structure_compression": stop[0],
                            "parameter_compression": stop[0], "accuracy": stop[1]})
    data = {"config": {"split": "test"}, "run_config": {"dataset": dataset, "model": model}, "records": records}
    (folder / "sweep.json").write_text(json.dumps(data))
    return folder


def test_mean_std_is_the_sample_standard_deviation():
    values = [84.99, 85.5, 84.2, 85.1]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_format_mean_std():
    assert format_mean_std(93.2, 0.6612, 10) == "93.20 ± 0.66"
    assert format_mean_std(88.17, 0.0, 1) == "88.17"  # one seed: no spread to show
    assert format_mean_std(1.23456, 0.5, 3, digits=1) == "1.2 ± 0.5"


def test_method_labels():
    assert method_label({"method": "bmrs-u", "bits": 8.0}) == "bmrs-u8"
    assert method_label({"method": "bmrs-u", "bits": 4}) == "bmrs-u4"
    assert method_label({"method": "bmrs-u", "bits": 2.5}) == "bmrs-u2.5"
    assert method_label({"method": "bmrs-n", "bits": 4.0}) == "bmrs-n"  # bits only matter for bmrs-u
    assert method_label({"method": "none", "bits": 8.0}) == "none"


def test_row_order_follows_the_paper():
    from bmrs.reporting.tables import method_order

    labels = ["random", "l2", "bmrs-u4", "none", "bmrs-n-rel", "bmrs-u8", "bmrs-n", "other", "bmrs-n-code", "snr"]
    assert sorted(labels, key=method_order) == [
        "none", "bmrs-n", "bmrs-n-code", "bmrs-n-rel", "bmrs-u8", "bmrs-u4", "snr", "l2", "random", "other"]


def test_natural_order_of_layer_names():
    names = ["10", "2", "blocks.10.relu", "blocks.2.relu", "1"]
    assert sorted(names, key=natural_key) == ["1", "2", "10", "blocks.2.relu", "blocks.10.relu"]


def test_collect_finds_runs_at_any_depth_skips_unfinished_and_reads_each_once(tmp_path):
    make_run(tmp_path, "suite/train/mlp/none/seed-0", method="none")
    make_run(tmp_path, "suite/train/mlp/none/seed-1", method="none", seed=1)
    make_run(tmp_path, "suite/train/mlp/bmrs-n/seed-0", complete=False)
    make_sweep(tmp_path, "suite/sweeps/s0")
    found = collect([tmp_path / "suite", tmp_path / "suite/train/mlp/none/seed-0"])
    assert sorted(str(r.path.relative_to(tmp_path)) for r in found.runs) == [
        "suite/train/mlp/none/seed-0", "suite/train/mlp/none/seed-1"]
    assert len(found.sweeps) == 1 and found.sweeps[0].model == "mlp"
    assert len(found.skipped) == 1 and "bmrs-n/seed-0" in found.skipped[0]
    # a metrics.json given directly stands for its run directory
    assert len(collect([tmp_path / "suite/train/mlp/none/seed-1/metrics.json"]).runs) == 1


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        collect([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs"):
        collect([tmp_path / "empty"])
    run = make_run(tmp_path, "broken")
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        collect([run])


def test_summarize_groups_by_method_label_over_seeds(tmp_path):
    for seed, (acc, comp) in enumerate([(0.90, 0.50), (0.92, 0.60), (0.94, 0.70)]):
        make_run(tmp_path, f"u8/{seed}", method="bmrs-u", bits=8.0, seed=seed, acc=acc, comp=comp)
    make_run(tmp_path, "u4/0", method="bmrs-u", bits=4.0, acc=0.80, comp=0.9)
    make_run(tmp_path, "none/0", method="none", acc=0.97, comp=0.0)
    summary = summarize(collect([tmp_path]).runs)
    assert set(summary) == {"mlp"}
    assert set(summary["mlp"]) == {"bmrs-u8", "bmrs-u4", "none"}
    u8 = summary["mlp"]["bmrs-u8"]
    assert set(u8) == {"param_compression", "accuracy", "seeds"}
    assert u8["seeds"] == 3
    assert u8["accuracy"] == pytest.approx([92.0, 2.0])  # percent; sample std of 90, 92, 94
    assert u8["param_compression"] == pytest.approx([60.0, 10.0])
    assert summary["mlp"]["bmrs-u4"] == {"param_compression": [90.0, 0.0], "accuracy": [80.0, 0.0], "seeds": 1}


def test_summarize_keys_columns_by_dataset_when_there_are_several(tmp_path):
    make_run(tmp_path, "a", dataset="digits")
    make_run(tmp_path, "b", dataset="mnist")
    make_run(tmp_path, "c", dataset="mnist", model="lenet5")
    assert set(summarize(collect([tmp_path]).runs)) == {"digits/mlp", "mnist/mlp", "mnist/lenet5"}


def test_write_report_files(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in enumerate([0.90, 0.91]):
        make_run(runs, f"bmrs-n-code/{seed}", method="bmrs-n-code", seed=seed, acc=acc, comp=0.4 + 0.1 * seed)
    make_run(runs, "none/0", method="none", acc=0.97, comp=0.0, kept={"2": 8, "4": 8})
    make_run(runs, "u4/0", method="bmrs-u", bits=4.0, acc=0.85, comp=0.8)
    out = tmp_path / "report"
    report = write_report([runs], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_compression.png", "results.json", "results.md", "widths.png"]  # no temporary files left
    for png in ("accuracy_vs_compression.png", "widths.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert json.loads((out / "results.json").read_text()) == report.summary
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line for line in table}
    # rows in the paper's order: no pruning, then BMRS
    labels = [line.split(" | ")[0][2:] for line in table[:4]]
    assert labels == ["method", "none", "bmrs-n-code", "bmrs-u4"]
    assert "| bmrs-n-code | 45.00 ± 7.07 | 90.50 ± 0.71 | 2 |" in md
    assert "| none | 0.00 | 97.00 | 1 |" in md
    assert "bmrs-u4" in rows
    assert "5/8 - 3/8" in md  # kept structures per layer
    assert "| 1,000 | 400 | 2,000 | 500 | 4.00x |" in md  # compacted sizes and FLOP reduction
    assert report.runs == 4 and report.sweeps == 0


def test_report_with_sweeps_plots_them_and_lists_stop_points(tmp_path):
    make_sweep(tmp_path, "sweep")
    out = tmp_path / "report"
    report = write_report([tmp_path / "sweep"], out)
    assert "widths_plot" not in report.files  # no training runs, no widths
    assert (out / "accuracy_vs_compression.png").read_bytes().startswith(PNG_MAGIC)
    md = (out / "results.md").read_text()
    assert "| bmrs-n | 42.00 | 42.00 | 90.00 |" in md
    assert report.summary == {}


def test_report_notes_groups_that_mix_configurations(tmp_path):
    make_run(tmp_path, "a", seed=0)
    make_run(tmp_path, "b", seed=1, epochs=50)
    report = write_report([tmp_path], tmp_path / "out")
    assert any("epochs" in note for note in report.notes)
    assert "differ in epochs" in report.markdown


def test_report_of_nothing_is_an_error(tmp_path):
    make_run(tmp_path, "unfinished", complete=False)
    with pytest.raises(ValueError, match="nothing to report"):
        write_report([tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_std_of_identical_seeds_is_zero_not_nan(tmp_path):
    make_run(tmp_path, "a", seed=0, acc=0.5)
    make_run(tmp_path, "b", seed=1, acc=0.5)
    acc = summarize(collect([tmp_path]).runs)["mlp"]["bmrs-n"]["accuracy"]
    assert acc == [50.0, 0.0] and not math.isnan(acc[1])


def test_kl_variant_labels_and_their_paper_row():
    from bmrs.reporting.collect import base_label, method_label
    from bmrs.reporting.paper import compare
    from bmrs.reporting.tables import method_order

    assert method_label({"method": "bmrs-u", "bits": 8.0, "kl_reduction": "structures"}) == "bmrs-u8+kl-structures"
    assert method_label({"method": "bmrs-n-code", "kl_reduction": "mean"}) == "bmrs-n-code"
    assert base_label("bmrs-n-code+kl-structures") == "bmrs-n-code"
    labels = ["bmrs-n-code+kl-structures", "none", "bmrs-n-code", "bmrs-u8"]
    assert sorted(labels, key=method_order) == ["none", "bmrs-n-code", "bmrs-n-code+kl-structures", "bmrs-u8"]
    summary = {"lenet5": {"bmrs-n-code+kl-structures": {"param_compression": [90.0, 1.0], "accuracy": [87.0, 0.5], "seeds": 2}}}
    cell = compare(summary)["lenet5"]["bmrs-n-code+kl-structures"]
    assert cell["paper_row"] == "bmrs-n"
    assert cell["difference"]["accuracy"] == pytest.approx(87.0 - 77.90)


def test_plot_styles_tell_bmrs_from_baselines_and_never_repeat_a_colour():
    from matplotlib.colors import to_rgb

    from bmrs.reporting.plots import _styles

    labels = ["none", "bmrs-n", "bmrs-n-code", "bmrs-n-rel", "bmrs-n-kr", "bmrs-u8", "bmrs-u4", "bmrs-u2",
              "snr", "etheta", "l2", "taylor", "random", "bmrs-n-code+kl-structures"]
    styles = _styles(labels)
    colours = {label: to_rgb(styles[label]["color"]) for label in labels}
    bases = [label for label in labels if "+" not in label]
    assert len({colours[b] for b in bases}) == len(bases)  # one colour per method
    assert colours["bmrs-n-code+kl-structures"] == colours["bmrs-n-code"]  # a KL variant keeps its method's
    for label in bases:
        r, g, b = colours[label]
        grey = r == g == b
        if label.startswith("bmrs"):
            assert not grey and styles[label]["linestyle"] == "-"
        elif label != "none":
            assert grey and styles[label]["linestyle"] == "--"
    assert len({styles[b]["marker"] for b in ("snr", "etheta", "l2", "taylor", "random")}) == 5
    # a method has the same style whatever else a figure shows
    assert _styles(["bmrs-n-kr", "l2"]) == {k: styles[k] for k in ("bmrs-n-kr", "l2")}
