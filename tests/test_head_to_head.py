"""The head-to-head benchmark's checks and its summary, without training anything."""

import importlib.util
import json
from pathlib import Path

import pytest

from bmrs import BMRSError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "head_to_head.py"


@pytest.fixture(scope="module")
def h2h():
    spec = importlib.util.spec_from_file_location("head_to_head", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_are_checked(h2h):
    args = h2h.parse_args(["--out", "x", "--epochs", "10"])
    assert (args.gate_epochs, args.reg_epochs, args.prune_every, args.model) == (2, 2, 1, "resnet56")
    with pytest.raises(BMRSError, match="gate-epochs"):
        h2h.parse_args(["--out", "x", "--epochs", "3", "--gate-epochs", "3"])
    with pytest.raises(BMRSError, match="above 1"):
        h2h.parse_args(["--out", "x", "--targets", "0.5"])
    with pytest.raises(BMRSError, match="--depth"):
        h2h.parse_args(["--out", "x", "--depth", "20"])


def test_files_it_did_not_write_are_not_replaced(h2h, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"a": 1}))
    with pytest.raises(BMRSError, match="not written by this script"):
        h2h._writable(mine, force=False)
    h2h._writable(mine, force=True)
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"format": h2h.FORMAT}))
    h2h._writable(ours, force=False)
    picture = tmp_path / "figure.png"
    picture.write_bytes(b"png")
    with pytest.raises(BMRSError):
        h2h._writable(picture, force=False)


def test_the_summary_has_the_issues_shape(h2h):
    args = h2h.parse_args(["--out", "x", "--model", "resnet", "--depth", "20", "--epochs", "5", "--seeds", "2",
                           "--targets", "2.1", "--methods", "bmrs-n", "tp-l1", "bmrs"])
    timed = {"onnxruntime@256": {"ratio": 2.0}, "onnxruntime@1": {"ratio": 1.5}, "eager@256": {"ratio": 1.8},
             "eager@1": {"ratio": 1.2}}
    rows = {}
    for seed, acc in enumerate((0.8, 0.9)):
        for method, target in (("bmrs-n", 2.1), ("tp-l1", 2.1), ("bmrs", None)):
            row = {"accuracy": acc, "macs_ratio": 2.2, "params_ratio": 2.0, "seconds": 1.0}
            if seed == 0:
                row["latency"] = timed
            rows[(method, target, seed)] = row
    base = {"accuracy": 0.91, "macs": 100, "params": 10, "seconds": 3.0}
    result = h2h.summary(args, base, rows, 5.0)
    assert result["model"] == "resnet20" and result["base_accuracy"] == [0.91, 0.0]
    row = result["targets"]["2.1"]["rows"]["bmrs-n"]
    assert row["accuracy"] == pytest.approx([0.85, 0.0707106781], rel=1e-6)
    assert (row["macs_ratio"], row["latency_ratio_ort"], row["seeds"], row["latency_seeds"]) == (2.2, 2.0, 2, 1)
    assert set(result["targets"]["2.1"]["rows"]) == {"bmrs-n", "tp-l1"}
    assert result["bmrs_stop"]["seeds"] == 2
    json.dumps(result)


def test_the_table_lists_every_row(h2h):
    result = {"base_accuracy": [0.9, 0.0], "targets": {"2.1": {"rows": {
        "bmrs-n": {"accuracy": [0.88, 0.01], "macs_ratio": 2.2, "params_ratio": 2.0, "seeds": 3, "latency_ratio_ort_b1": 1.5},
        "tp-l1": {"accuracy": [0.89, 0.01], "macs_ratio": 2.1, "params_ratio": 1.9, "seeds": 3}}}},
        "bmrs_stop": {"accuracy": [0.9, 0.0], "macs_ratio": 1.3, "params_ratio": 1.2, "seeds": 3, "criterion": "bmrs-n-kr"}}
    lines = h2h.table(result).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 2.1x | tp-l1 | 89.00 ± 1.00 | -1.00 |")  # best first
    assert "| 1.50x |" in lines[3] and lines[4].startswith("| own stop | bmrs (bmrs-n-kr) |")
