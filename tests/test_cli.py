"""The bmrs command end to end on tiny digits runs: train, report, sweep, compact, info,
errors, and resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import pytest
import torch

from bmrs.cli import main, parse_criteria
from bmrs.compaction import load_compact
from bmrs.datasets import load_dataset
from bmrs.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "4", "--finetune-epochs", "1",
        "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]
METRIC_KEYS = {
    "test_accuracy", "test_loss", "val_accuracy", "structure_compression", "parameter_compression", "kept",
    "structures", "best_epoch", "train_seconds", "processes", "history", "compaction", "checksums", "provenance",
    "calibration",
}


def bmrs(*args, env=None, timeout=900):  # a guard against hangs, not a speed test
    """Run the real command in a subprocess; return (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "bmrs.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def train(out, *extra):
    assert main(["train", *TINY, *map(str, extra), "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(root / "none", "--method", "none")
    train(root / "code", "--method", "bmrs-n-code")
    train(root / "random", "--method", "random", "--target", "0.4")
    return root


def assert_one_line_error(status, err):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bmrs: error: ")
    assert "Traceback" not in err


# --- train and report ---------------------------------------------------------------------------


def test_train_writes_a_complete_run(runs, capsys):
    run = runs / "random"
    assert {"config.json", "checkpoint.pt", "model.pt", "compact.pt", "metrics.json"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "random" and config["target"] == 0.4 and config["model_options"] == {"width": 16}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS  # a baseline's run: no evidence summary
    assert set(json.loads((runs / "code" / "metrics.json").read_text())) == METRIC_KEYS | {"evidence"}
    assert set(metrics["calibration"]) == {"unpruned", "gated", "compacted", "predictive"}
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # digits learns fast even when tiny
    assert 0.4 <= metrics["parameter_compression"] < 1.0  # the target was reached
    assert 0.0 < metrics["structure_compression"] < 1.0
    assert set(metrics["kept"]) == set(metrics["structures"]) and len(metrics["kept"]) == 2
    assert all(0 <= metrics["kept"][k] <= metrics["structures"][k] == 16 for k in metrics["kept"])
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in metrics["history"]] == ["train"] * 4 + ["finetune"]
    compaction = metrics["compaction"]
    assert compaction["parameters_after"] < compaction["parameters_before"]
    assert 0 < compaction["flops_after"] < compaction["flops_before"]
    assert compaction["input_shape"] == [1, 1, 8, 8]
    assert list(compaction["widths_after"].values())[:2] == list(metrics["kept"].values())
    # the refusal to overwrite a complete run, and --resume only reporting it
    assert main(["train", *TINY, "--method", "random", "--target", "0.4", "--out", str(run)]) == 2
    assert "complete run" in capsys.readouterr().err
    before = (run / "metrics.json").stat().st_mtime_ns
    assert main(["train", *TINY, "--method", "random", "--target", "0.4", "--resume", "--out", str(run)]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (run / "metrics.json").stat().st_mtime_ns == before
    # --resume with other options is refused
    assert main(["train", *TINY, "--method", "random", "--target", "0.5", "--resume", "--out", str(run)]) == 2
    assert "target" in capsys.readouterr().err


def test_report_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "results.md") in printed and str(out / "accuracy_vs_compression.png") in printed
    md = (out / "results.md").read_text()
    labels = ("none+kl-elbo", "bmrs-n-code+kl-elbo", "random+kl-elbo")  # TINY trains with --kl-reduction elbo
    for label in labels:
        assert f"\n| {label} | " in md
    assert "| method | mlp / digits Comp. (%) | mlp / digits Acc. (%) | n |" in md
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"mlp"} and set(results["mlp"]) == set(labels)
    metrics = json.loads((runs / "random" / "metrics.json").read_text())
    entry = results["mlp"]["random+kl-elbo"]
    assert entry == {
        "param_compression": [pytest.approx(100 * metrics["parameter_compression"]), 0.0],
        "accuracy": [pytest.approx(100 * metrics["test_accuracy"]), 0.0],
        "seeds": 1,
    }
    assert results["mlp"]["none+kl-elbo"]["param_compression"] == [0.0, 0.0]
    # one line per run says what it cost and where it ran
    record = metrics["provenance"]
    assert "## What the runs cost" in md
    assert (f"| random+kl-elbo | mlp / digits | 0 | {metrics['train_seconds'] / 60:.1f} | "
            f"{record['processor']}, 1 thread |") in md
    for png in ("accuracy_vs_compression.png", "widths.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
        image = matplotlib.image.imread(out / png)  # decodes: a valid image
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05  # not blank
    # a second report replaces its own files; files of the user's are never replaced
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert ".bmrs-report" in {p.name for p in out.iterdir()}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes\n")
    (mine / "todo.txt").write_text("keep\n")
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(mine)]) == 2
    assert "results.md" in capsys.readouterr().err
    assert (mine / "results.md").read_text() == "my notes\n" and not (mine / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing staged is left
    assert main(["report", str(runs), "--out", str(mine), "--force"]) == 0
    assert "| method |" in (mine / "results.md").read_text() and (mine / "todo.txt").read_text() == "keep\n"


# --- sweep -----------------------------------------------------------------------------------


def test_parse_criteria():
    parsed = parse_criteria("bmrs-n, BMRS_U8,bmrs-u4,bmrs-u2.5,l2")
    assert [label for label, _, _ in parsed] == ["bmrs-n", "bmrs-u8", "bmrs-u4", "bmrs-u2.5", "l2"]
    assert parsed[1] == ("bmrs-u8", "bmrs-u", {"bits": 8.0})
    assert parsed[3] == ("bmrs-u2.5", "bmrs-u", {"bits": 2.5})
    assert parse_criteria("bmrs-u") == [("bmrs-u8", "bmrs-u", {"bits": 8.0})]


def test_parse_criteria_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="twice"):
        parse_criteria("bmrs-u,bmrs-u8")
    with pytest.raises(ValueError, match="unknown criterion"):
        parse_criteria("bmrs-n,magnitude")
    with pytest.raises(ValueError, match="bits"):
        parse_criteria("bmrs-u40")


def test_sweep(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    criteria = ["bmrs-n", "bmrs-n-code", "bmrs-u8", "bmrs-u4", "snr", "l2", "random"]
    levels = [0.0, 0.3, 0.7]
    status = main(["sweep", "--run", str(runs / "none"), "--criteria", ",".join(criteria),
                   "--levels", ",".join(map(str, levels)), "--threads", "1", "--no-progress", "--out", str(out)])
    assert status == 0
    data = json.loads((out / "sweep.json").read_text())
    records = data["records"]
    for criterion in criteria:
        got = [r["target"] for r in records if r["criterion"] == criterion and r["kind"] == "level"]
        assert got == levels, criterion
    stops = {r["criterion"] for r in records if r["kind"] == "stop"}
    assert stops == {"bmrs-n", "bmrs-n-code", "bmrs-u8", "bmrs-u4", "snr"}  # l2 and random have no stopping rule
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["parameter_compression"] <= 1.0
        if r["kind"] == "level":
            assert r["parameter_compression"] >= r["target"] - 1e-9
    level0 = [r["accuracy"] for r in records if r["target"] == 0.0]
    assert level0 == [pytest.approx(data["model_accuracy"])] * len(criteria)  # nothing pruned: the run's accuracy
    assert data["config"]["criteria"] == criteria and data["run_config"]["method"] == "none"
    csv_lines = (out / "sweep.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("criterion,kind,target") and len(csv_lines) == len(records) + 1
    assert "stopping points" in capsys.readouterr().out
    # no overwriting without --force
    assert main(["sweep", "--run", str(runs / "none"), "--criteria", "l2", "--levels", "0", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    # the report of a sweep plots it and lists its stopping points
    report = tmp_path / "report"
    assert main(["report", str(out), str(runs / "none"), "--out", str(report)]) == 0
    md = (report / "results.md").read_text()
    assert "Post-training sweeps" in md and "\n| bmrs-u4 | " in md
    assert (report / "accuracy_vs_compression.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_prunes_the_last_epoch_unless_told(runs, tmp_path, capsys):
    metrics = json.loads((runs / "none" / "metrics.json").read_text())
    epochs = len(metrics["history"])
    common = ["--criteria", "bmrs-n-kr", "--levels", "0", "--threads", "1", "--no-progress"]
    assert main(["sweep", "--run", str(runs / "none"), *common, "--out", str(tmp_path / "last")]) == 0
    last = json.loads((tmp_path / "last" / "sweep.json").read_text())["config"]
    assert last["run"] == str(runs / "none" / "checkpoint.pt") and (last["epoch"], last["epochs"]) == (epochs, epochs)
    assert f"swept model: epoch {epochs} of {epochs}, the last epoch" in capsys.readouterr().out
    assert main(["sweep", "--run", str(runs / "none"), "--epoch", "best", *common, "--out", str(tmp_path / "best")]) == 0
    best = json.loads((tmp_path / "best" / "sweep.json").read_text())
    assert best["config"]["run"] == str(runs / "none" / "model.pt") and best["config"]["epoch"] == metrics["best_epoch"]
    assert best["model_accuracy"] == pytest.approx(metrics["test_accuracy"])  # model.pt is the model tested
    assert f"swept model: epoch {metrics['best_epoch']} of {epochs}, the best validation epoch" in capsys.readouterr().out
    status = main(["sweep", "--run", str(runs / "none" / "model.pt"), "--epoch", "last", *common, "--out", str(tmp_path / "x")])
    assert_one_line_error(status, capsys.readouterr().err)


def test_train_without_method_uses_the_recommended_defaults(tmp_path, capsys):
    tiny = [a for a in TINY if a not in ("--kl-reduction", "elbo")]
    assert main(["train", *tiny, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("recommended defaults: --method bmrs-n-kr, --kl-reduction structures "
                                   "(docs/pruning.md; the paper's: --method bmrs-n-code --kl-reduction mean)")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["method"], config["kl_reduction"]) == ("bmrs-n-kr", "structures")
    # given options are kept, and only the missing one is filled in and named
    assert main(["train", *TINY, "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("recommended defaults: --method bmrs-n-kr (")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["kl_reduction"] == "elbo"


# --- compact and info ------------------------------------------------------------------------


def test_compact_and_info(runs, tmp_path, capsys):
    run = runs / "random"
    out = tmp_path / "small.pt"
    assert main(["compact", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "FLOPs" in printed
    small = load_compact(out)
    config = json.loads((run / "config.json").read_text())
    gated = build_model("mlp", (1, 8, 8), 10, **config["model_options"])
    gated.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    gated.eval()
    x = load_dataset("digits").test.tensors[0][:200]
    with torch.no_grad():
        assert torch.allclose(small(x), gated(x), atol=1e-5, rtol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    widths = [m.out_features for m in small.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [*metrics["kept"].values(), 10]
    assert sum(p.numel() for p in small.parameters()) == metrics["compaction"]["parameters_after"]

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == metrics["compaction"]["parameters_after"]
    assert info["flops"] == metrics["compaction"]["flops_after"]
    assert info["input_shape"] == [1, 1, 8, 8]
    assert list(info["widths"].values()) == widths
    assert main(["info", str(run)]) == 0  # a run directory: its compact.pt
    assert f"parameters    {metrics['compaction']['parameters_after']:,}" in capsys.readouterr().out
    assert main(["info", str(run / "model.pt"), "--json"]) == 0  # the gated model
    gated_info = json.loads(capsys.readouterr().out)
    assert gated_info["parameters"] == metrics["compaction"]["parameters_before"]
    assert gated_info["kept"] == {k: f"{v}/16" for k, v in metrics["kept"].items()}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--method", "prune-it-all"], "invalid choice"),
    (["--method", "none", "--model", "transformer9"], "invalid choice"),
    (["--method", "none", "--dataset", "imagenet"], "invalid choice"),
    (["--method", "bmrs-u", "--bits", "30"], "bits"),
    (["--method", "bmrs-u", "--bits", "eight"], "--bits"),
    (["--method", "bmrs-n", "--bits", "4"], "--bits"),
    (["--method", "l2", "--target", "1.5"], "--target"),
    (["--method", "l2", "--target", "-0.1"], "--target"),
    (["--method", "l2"], "--target or --match"),
    (["--method", "taylor"], "--target or --match"),
    (["--method", "l2", "--match", "/nonexistent/run"], "not a complete run"),
    (["--method", "bmrs-n", "--threshold", "1"], "threshold"),
    (["--method", "none", "--depth", "20"], "--depth"),
    (["--method", "none", "--epochs", "0"], "--epochs"),
])
def test_train_usage_errors(args, message, tmp_path, capsys):
    # the defaults of TINY come first, so the parametrised options override them
    argv = ["train", *TINY, *args, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err)
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_errors_of_the_other_commands(runs, tmp_path, capsys):
    cases = [
        (["sweep", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "s")], "no such file"),
        (["sweep", "--run", str(runs / "none"), "--criteria", "bmrs-x", "--out", str(tmp_path / "s")], "unknown criterion"),
        (["sweep", "--run", str(runs / "none"), "--levels", "0,1.5", "--out", str(tmp_path / "s")], "--levels"),
        (["report", str(tmp_path), "--out", str(tmp_path / "r")], "no runs"),
        (["compact", str(runs / "none" / "config.json"), "--out", str(tmp_path / "c.pt")], "not a model file"),
        (["info", str(runs / "none" / "metrics.json")], "not a model file"),
        (["reproduce", "no-such-suite", "--out", str(tmp_path / "x")], "invalid choice"),
        ([], "required"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert_one_line_error(2, err)
        assert message in err, (argv, err)


def test_missing_data_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "BMRS_DATA": str(empty), "XDG_CACHE_HOME": str(empty / "cache"), "HOME": str(empty),
           # downloads impossible even where the network is reachable
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    out = tmp_path / "run"
    status, stdout, err = bmrs("train", "--dataset", "mnist", "--model", "mlp", "--method", "none",
                               "--data-dir", empty, "--out", out, "--no-progress", env=env)
    assert_one_line_error(status, err)
    assert "mnist" in err and "--data-dir" in err
    assert not out.exists()  # the run directory is not left behind


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("bmrs ")
    for command in ("train", "sweep", "report", "compact", "info", "reproduce"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"usage: bmrs {command}" in text and "example:" in text


# --- resume ----------------------------------------------------------------------------------


def _epochs_done(checkpoint):
    try:
        return len(torch.load(checkpoint, weights_only=True)["history"])
    except Exception:  # not written yet, or being replaced right now
        return 0


def test_resume_after_kill_gives_the_uninterrupted_metrics(tmp_path):
    args = ["train", "--dataset", "digits", "--model", "mlp", "--method", "bmrs-n-code", "--width", "32",
            "--epochs", "40", "--finetune-epochs", "2", "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo",
            "--seed", "3", "--threads", "1", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bmrs.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # generous: CI machines can be busy
        while _epochs_done(killed / "checkpoint.pt") < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _epochs_done(killed / "checkpoint.pt")
    assert 2 <= done < 42, "killed too late to test resuming"
    before_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["history"]
    assert not (killed / "metrics.json").exists()  # no (partial) results of an unfinished run
    json.loads((killed / "config.json").read_text())  # complete, valid

    # an unfinished run is not silently restarted
    status, _, err = bmrs(*args, "--out", killed)
    assert_one_line_error(status, err)
    assert "--resume" in err
    status, out, err = bmrs(*args, "--resume", "--out", killed)
    assert status == 0, err

    # the same run, uninterrupted (in this process: the same code and one thread)
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    resumed = json.loads((killed / "metrics.json").read_text())
    full = json.loads((reference / "metrics.json").read_text())
    assert set(resumed) == set(full)
    for key in set(full) - {"train_seconds", "history", "provenance"}:
        assert resumed[key] == full[key], key
    # what produced them: the same command but for the run directory
    assert resumed["provenance"]["command"].replace(str(killed), "OUT") == full["provenance"]["command"].replace(str(reference), "OUT")
    assert len(resumed["history"]) == len(full["history"]) == 42
    # the epochs done before the kill were not trained again: their records (timings
    # included) are the checkpoint's
    assert resumed["history"][:done] == before_kill
    for a, b in zip(resumed["history"], full["history"]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert 0 < full["parameter_compression"]  # it pruned, so masks were restored too


def test_user_errors_are_one_line_and_defects_keep_their_traceback(monkeypatch, capsys):
    """A BMRSError (or a file error) is one line with exit 2; any other exception, such as an
    internal KeyError, is not disguised as a user error but propagates with its traceback."""
    import bmrs
    import bmrs.cli as cli
    from bmrs.commands import info

    def user_error(args):
        raise bmrs.BMRSError("the run\n   is not what bmrs expects")

    def missing_file(args):
        raise FileNotFoundError("runs/x: no such file or directory")

    def defect(args):
        return {}["layer"]

    for command, message in ((user_error, "the run is not what bmrs expects"),
                             (missing_file, "runs/x: no such file or directory")):
        monkeypatch.setattr(info, "run", command)
        assert cli.main(["info", "runs/x"]) == 2
        assert capsys.readouterr().err == f"bmrs: error: {message}\n"
    monkeypatch.setattr(info, "run", defect)
    with pytest.raises(KeyError, match="layer"):
        cli.main(["info", "runs/x"])
    # the real command: Python's traceback and exit status 1
    script = ("import sys, bmrs.cli as cli, bmrs.commands.info as info\ninfo.run = lambda args: {}['layer']\n"
              "sys.exit(cli.main(['info', 'runs/x']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'layer'" in proc.stderr


def test_library_errors_for_bad_input_are_bmrs_errors_and_value_errors():
    import bmrs

    for bad in (lambda: bmrs.bmrs_u_prior(float("nan")), lambda: bmrs.make_criterion("nope"),
                lambda: bmrs.build_model("nope", (1, 8, 8), 10), lambda: bmrs.NoiseGate(0)):
        with pytest.raises(bmrs.BMRSError) as info:
            bad()
        assert isinstance(info.value, ValueError)
