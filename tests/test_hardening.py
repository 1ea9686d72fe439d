"""Hardening: what bmrs does with hostile files, diverging training, user files in the way,
unusual grad modes and non-finite gates. Each test reproduces a case that once misbehaved."""

import json
import math
import pathlib
import shutil

import pytest
import torch

import bmrs
from bmrs.cli import main
from bmrs.datasets import load_dataset
from bmrs.models import build_model
from bmrs.training import Trainer, TrainingDiverged, seed_everything

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "2", "--finetune-epochs", "0",
        "--batch-size", "64", "--lr", "0.02", "--kl-reduction", "elbo", "--threads", "1", "--no-progress"]


class _Touch:
    """Unpickling this object would create ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def one_line_error(capsys, status, code=2):
    err = capsys.readouterr().err
    assert status == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmrs: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert main(["train", *TINY, "--method", "bmrs-n-code", "--out", str(out)]) == 0
    return out


def copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


# --- 1. no code runs from a checkpoint --------------------------------------------------------------


def test_checkpoints_hold_only_tensors_and_plain_containers(run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "history", "rng"}
    assert torch.load(run / "model.pt", weights_only=True)


def test_a_crafted_checkpoint_runs_no_code(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    marker = tmp_path / "code-ran"
    torch.save({"model": _Touch(marker)}, victim / "checkpoint.pt")
    (victim / "metrics.json").unlink()  # an unfinished run, so --resume reads the checkpoint
    for argv in (["info", victim / "checkpoint.pt"], ["compact", victim / "checkpoint.pt", "--out", tmp_path / "c.pt"],
                 ["sweep", "--run", victim / "checkpoint.pt", "--out", tmp_path / "s", "--no-progress"],
                 ["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", victim]):
        line = one_line_error(capsys, main([str(a) for a in argv]))
        assert str(victim / "checkpoint.pt") in line, line
        assert not marker.exists(), argv
    torch.save(_Touch(marker), victim / "model.pt")
    line = one_line_error(capsys, main(["info", str(victim / "model.pt")]))
    assert str(victim / "model.pt") in line and not marker.exists()


# --- 3. divergence stops training ---------------------------------------------------------------------


class _PoisonedLoader:
    """Batches of a data set; from epoch ``poison_epoch`` on, batch ``poison_step`` holds NaN."""

    def __init__(self, dataset, poison_epoch, poison_step):
        self.x, self.y = dataset.tensors
        self.epoch, self.poison_epoch, self.poison_step = 0, poison_epoch, poison_step

    def __iter__(self):
        self.epoch += 1
        for step, start in enumerate(range(0, 320, 64), 1):
            x = self.x[start:start + 64].clone()
            if self.epoch >= self.poison_epoch and step == self.poison_step:
                x[0, 0] = math.nan
            yield x, self.y[start:start + 64]


def test_a_non_finite_loss_stops_training_before_the_checkpoint(tmp_path):
    seed_everything(0)
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes, width=16)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    val = torch.utils.data.DataLoader(data.val, batch_size=500)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        trainer.fit(_PoisonedLoader(data.train, 2, 3), val, 3, checkpoint=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert len(saved["history"]) == 1  # the last good epoch
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_a_diverging_run_exits_3_and_writes_no_model(tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line_error(capsys, main(["train", *TINY, "--method", "none", "--lr", "1e300", "--out", str(out)]), 3)
    assert "diverged" in line and "epoch 1, step" in line
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--threshold", "nan")])
def test_non_finite_options_are_refused(flag, value, tmp_path, capsys):
    method = ["--method", "snr"] if flag == "--threshold" else ["--method", "none"]
    line = one_line_error(capsys, main(["train", *TINY, *method, flag, value, "--out", str(tmp_path / "r")]))
    assert flag in line
    assert not (tmp_path / "r").exists()


def test_json_files_are_strict(tmp_path):
    from bmrs._io import write_json

    with pytest.raises(ValueError, match="x.json"):
        write_json({"loss": math.nan}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# --- 2. no code runs from a CIFAR-10 batch ---------------------------------------------------------


def test_a_crafted_cifar_batch_runs_no_code(tmp_path, capsys):
    import pickle

    import numpy as np

    from bmrs.datasets import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    assert len(load_cifar10(tmp_path, val_fraction=0.0, download=False).train) == 10  # plain batches load
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Touch(marker), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3") as info:
        load_cifar10(tmp_path, val_fraction=0.0, download=False)
    assert "\n" not in str(info.value) and not marker.exists()
    line = one_line_error(capsys, main(["train", *TINY[2:], "--dataset", "cifar10", "--model", "mlp", "--method", "none",
                                        "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]))
    assert "data_batch_3" in line and not marker.exists()


# --- 4. nothing a user owns is overwritten -------------------------------------------------------


def test_compact_never_replaces_an_input_or_an_existing_file(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    for target in ("model.pt", "config.json", "metrics.json", "checkpoint.pt"):
        line = one_line_error(capsys, main(["compact", str(victim), "--out", str(victim / target), "--force"]))
        assert "file of the run" in line
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"user data")
    line = one_line_error(capsys, main(["compact", str(victim), "--out", str(mine)]))
    assert "--force" in line and mine.read_bytes() == b"user data"
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    assert main(["compact", str(victim), "--out", str(mine), "--force"]) == 0
    assert mine.read_bytes() != b"user data"


def test_train_never_replaces_files_of_no_run_in_progress(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("model.pt", "config.json"):
        (out / name).write_text("user data")
    line = one_line_error(capsys, main(["train", *TINY, "--method", "none", "--out", str(out)]))
    assert "--force" in line and "model.pt" in line
    assert all((out / name).read_text() == "user data" for name in ("model.pt", "config.json"))
    assert main(["train", *TINY, "--method", "none", "--force", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("command", [["train", *TINY, "--method", "none"], ["sweep", "--run", "x"], ["report", "x"],
                                     ["compact", "x"], ["reproduce", "quick"]])
def test_an_empty_out_is_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, main([*command, "--out", ""]))
    assert "--out" in line
    assert list(tmp_path.iterdir()) == []


# --- 5. compact and attach_gates in the caller's grad mode -------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_attach_gates_and_compact_work_in_no_grad_and_inference_mode(mode):
    from bmrs.compaction import compact

    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    with context():
        x = torch.randn(4, 6)
        bmrs.attach_gates(model, x)
        assert torch.is_grad_enabled() is False and torch.is_inference_mode_enabled() is (mode == "inference_mode")
    for gate in bmrs.gates(model).values():
        gate.mask[::2] = 0
        assert not gate.loc.is_inference() and gate.loc.requires_grad
    with context():
        small = compact(model.eval(), x)
        assert torch.is_grad_enabled() is False and torch.is_inference_mode_enabled() is (mode == "inference_mode")
        torch.testing.assert_close(small(x), model(x))
    assert small[0].out_features == 4


# --- 6. a masked structure contributes exactly zero -------------------------------------------------


def test_a_masked_structure_with_a_nan_posterior_contributes_zero():
    from bmrs.compaction import compact
    from bmrs.pruning import make_criterion, prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 6)
    bmrs.attach_gates(model, x)
    gate = bmrs.gates(model)["1"]
    gate.mask[[1, 4]] = 0
    model.eval()
    with torch.no_grad():
        clean = model(x)
        gate.loc[1], gate.log_scale[4] = math.nan, math.inf
        assert torch.equal(model(x), clean)
        model.train()
        assert torch.isfinite(model(x)).all()
        model.eval()
    torch.testing.assert_close(compact(model, x)(x), clean)
    with torch.no_grad():
        gate.loc[2] = math.nan  # an unmasked structure
    with pytest.raises(ValueError, match=r"non-finite gate parameters .* 1 \(structures 2\)"):
        compact(model, x)
    with pytest.raises(ValueError, match=r"1 \(structures 2\)"):
        prune(model, make_criterion("bmrs-n"))


# --- 7 and 8. damaged, foreign and nonsensical inputs: one line, exit 2 -------------------------


def test_damaged_or_foreign_checkpoints_on_resume(run, tmp_path, capsys):
    good = (run / "checkpoint.pt").read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    damaged = {
        "truncated": lambda p: p.write_bytes(good[: len(good) // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "garbage": lambda p: p.write_bytes(bytes(range(256)) * 8),
        "foreign": lambda p: torch.save({"weights": torch.zeros(3)}, p),
        "a list": lambda p: torch.save([1, 2, 3], p),
        # without the checksum (as checkpoints written before it), the structure is checked
        "wrong history": lambda p: torch.save({**unchecked, "history": "none"}, p),
        "wrong rng": lambda p: torch.save({**unchecked, "rng": {"python": 3}}, p),
        "other model": lambda p: torch.save({**unchecked, "model": {"w": torch.zeros(2)}}, p),
        # with it, any change of a value: a file that still loads and fits, with one number changed
        "a value changed": lambda p: torch.save({**state, "model": changed}, p),
    }
    unchecked = {k: v for k, v in state.items() if k != "checksum"}
    changed = dict(state["model"])
    name = next(k for k, v in changed.items() if v.is_floating_point() and v.numel() > 1)
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1e-3
    assert isinstance(state["checksum"], str)
    for case, damage in damaged.items():
        victim = copy_run(run, tmp_path / case.replace(" ", "-"))
        (victim / "metrics.json").unlink()
        damage(victim / "checkpoint.pt")
        line = one_line_error(capsys, main(["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", str(victim)]))
        assert str(victim / "checkpoint.pt") in line, (case, line)
        if case == "a value changed":
            assert "is damaged" in line
            for argv in (["info", victim / "checkpoint.pt"], ["compact", victim / "checkpoint.pt", "--out", tmp_path / "c.pt"]):
                line = one_line_error(capsys, main([str(a) for a in argv]))
                assert "is damaged" in line and str(victim / "checkpoint.pt") in line, line
    # a checkpoint written before checksums (none in the file) still resumes
    victim = copy_run(run, tmp_path / "no-checksum")
    (victim / "metrics.json").unlink()
    torch.save(unchecked, victim / "checkpoint.pt")
    assert main(["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", str(victim)]) == 0


def test_a_full_disk_leaves_no_file_and_says_which(run, tmp_path, capsys, monkeypatch):
    import bmrs._io

    def full_disk(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    line = one_line_error(capsys, main(["compact", str(run), "--out", str(out / "small.pt")]))
    assert str(out / "small.pt") in line and "disk" in line
    assert list(out.iterdir()) == []  # no temporary file left
    monkeypatch.undo()

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", no_space)
    with pytest.raises(OSError, match=r"cannot write .*x\.json: No space left on device"):
        bmrs._io.write_json({}, out / "x.json")
    assert list(out.iterdir()) == []


def test_os_errors_name_the_file(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(capsys, main(["compact", str(run), "--out", str(blocker / "small.pt")]))
    assert str(blocker) in line


@pytest.mark.parametrize("file, key, value", [
    ("config.json", "epochs", "ten"), ("config.json", "model_options", [1]), ("config.json", "seed", None),
    ("metrics.json", "test_accuracy", "high"), ("metrics.json", "kept", [3]), ("metrics.json", "history", {}),
])
def test_run_files_with_values_of_the_wrong_kind(run, tmp_path, capsys, file, key, value):
    victim = copy_run(run, tmp_path / "victim")
    data = json.loads((victim / file).read_text())
    data[key] = value
    (victim / file).write_text(json.dumps(data))
    commands = [["report", str(victim), "--out", str(tmp_path / "report")]]
    commands.append(["info", str(victim / "model.pt")] if file == "config.json" else
                    ["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", str(victim)])
    for argv in commands:
        line = one_line_error(capsys, main(argv))
        assert str(victim / file) in line and key in line, (argv, line)


def test_a_bit_flip_in_model_or_compact_files_is_detected(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    state = torch.load(victim / "model.pt", weights_only=True)
    name = next(n for n, t in state.items() if n.endswith("weight"))
    state[name].view(-1).view(torch.int32)[7] ^= 1 << 20  # one bit of one weight
    torch.save(state, victim / "model.pt")
    for argv in (["info", victim / "model.pt"], ["compact", victim, "--out", tmp_path / "c.pt"],
                 ["sweep", "--run", victim, "--epoch", "best", "--out", tmp_path / "s", "--no-progress"]):
        line = one_line_error(capsys, main([str(a) for a in argv]))
        assert f"{victim / 'model.pt'} is damaged" in line
    packed = torch.load(victim / "compact.pt", weights_only=True)
    packed["state_dict"][name].view(-1).view(torch.int32)[0] ^= 1
    torch.save(packed, victim / "compact.pt")
    line = one_line_error(capsys, main(["info", str(victim)]))
    assert f"{victim / 'compact.pt'} is damaged" in line


def test_compact_metadata_cannot_make_bmrs_allocate(run, tmp_path, capsys):
    from bmrs.compaction import count_parameters, load_compact

    packed = torch.load(run / "compact.pt", weights_only=True)
    metadata = json.loads(packed["metadata"])
    first = next(iter(metadata["layers"]))
    lying = json.loads(packed["metadata"])
    lying["layers"][first]["out_features"] = 10**6
    torch.save({**packed, "metadata": json.dumps(lying)}, tmp_path / "lying.pt")
    line = one_line_error(capsys, main(["info", str(tmp_path / "lying.pt")]))
    assert str(tmp_path / "lying.pt") in line and "1000000" in line
    huge = json.loads(packed["metadata"])
    huge["architecture"]["options"]["width"] = 10**6  # the unpruned skeleton: 4 TB if it were allocated
    torch.save({**packed, "metadata": json.dumps(huge)}, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match="huge.pt: its architecture .* out of proportion"):
        load_compact(tmp_path / "huge.pt")  # measured on the meta device, refused before it is built
    line = one_line_error(capsys, main(["info", str(tmp_path / "huge.pt")]))
    assert "huge.pt" in line
    wide_input = json.loads(packed["metadata"])
    wide_input["architecture"]["input_shape"] = [10**9]
    torch.save({**packed, "metadata": json.dumps(wide_input)}, tmp_path / "wide.pt")
    line = one_line_error(capsys, main(["info", str(tmp_path / "wide.pt")]))
    assert "wide.pt" in line and "input_shape" in line
    assert count_parameters(load_compact(run / "compact.pt")) == sum(t.numel() for t in packed["state_dict"].values()
                                                                     if t.is_floating_point())


def test_an_idx_set_without_test_images_is_refused(tmp_path, capsys):
    import numpy as np
    from test_data import make_idx_set, write_idx

    make_idx_set(tmp_path, gz=(False,) * 4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), False)
    line = one_line_error(capsys, main(["train", *TINY[2:], "--dataset", "fashion-mnist", "--method", "none",
                                        "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]))
    assert str(tmp_path / "t10k-images-idx3-ubyte") in line and "no images" in line


# --- a property: whatever the arguments and damage, exit 0 with valid outputs or one line ------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_NUMBERS = st.sampled_from(["0", "-1", "1", "0.5", "1.5", "nan", "inf", "-inf", "1e300", "1e-300", "x", "", "3"])
_RUN_FILES = ["config.json", "metrics.json", "model.pt", "compact.pt", "checkpoint.pt"]


@st.composite
def _damage(draw):
    """(file, how, parameter) of a damage to a run directory, or None."""
    if draw(st.integers(0, 2)) == 0:
        return None
    return (draw(st.sampled_from(_RUN_FILES)), draw(st.sampled_from(["truncate", "flip", "random", "delete", "retype"])),
            draw(st.integers(0, 2**31)))


def _apply(victim: pathlib.Path, damage) -> None:
    import random

    if damage is None:
        return
    name, how, seed = damage
    path, rng = victim / name, random.Random(seed)
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "flip":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif how == "random":
        path.write_bytes(rng.randbytes(rng.randrange(1, 4096)))
    elif how == "delete":
        path.unlink()
    elif name.endswith(".json"):
        content = json.loads(data)
        key = rng.choice(sorted(content))
        content[key] = rng.choice([None, "text", [1], {"a": 1}, -1, 1e308, True])
        path.write_text(json.dumps(content))


@st.composite
def _arguments(draw, run: pathlib.Path, out: pathlib.Path):
    # the first choice of each list is the likeliest sensible one (hypothesis shrinks to it)
    command = draw(st.sampled_from(["info", "compact", "sweep", "report", "train", "info", "compact"]))
    if command == "train":
        method = draw(st.sampled_from(["none", "bmrs-n", "bmrs-u", "snr", "l2"]))
        argv = ["train", "--dataset", "digits", "--model", "mlp", "--width", "8", "--batch-size", "64", "--threads", "1",
                "--no-progress", "--finetune-epochs", "0", "--method", method,
                "--epochs", draw(st.sampled_from(["1", "2", "1", "0", "x"]))]
        for flag in ("--lr", "--threshold", "--target", "--bits", "--seed"):
            if draw(st.integers(0, 3)) == 0:
                argv += [flag, draw(_NUMBERS)]
        target = draw(st.sampled_from([out / "new", run, out / "new", out, run / "model.pt", ""]))
        return argv + ([] if not draw(st.integers(0, 5)) else ["--resume"]) + ["--out", str(target)]
    if command == "sweep":
        argv = ["sweep", "--run", str(draw(st.sampled_from([run, run / "checkpoint.pt", run / "model.pt", out / "none"]))),
                "--criteria", draw(st.sampled_from(["bmrs-n", "bmrs-u8,l2", "snr,bmrs-x", "", "etheta"])), "--no-progress",
                "--levels", draw(st.sampled_from(["0.5", "0,1", "nan", "2", "x", "0.9"]))]
        return argv + ["--out", str(draw(st.sampled_from([out / "sweep", run, out, ""])))]
    if command == "compact":
        source = draw(st.sampled_from([run, run / "model.pt", run / "checkpoint.pt", run / "config.json", out]))
        target = draw(st.sampled_from([out / "small.pt", run / "compact.pt", out / "small.pt", run / "model.pt", out, ""]))
        return ["compact", str(source), "--out", str(target)] + (["--force"] if draw(st.booleans()) else [])
    if command == "info":
        return ["info", str(draw(st.sampled_from([run, run / "model.pt", run / "checkpoint.pt", run / "compact.pt",
                                                  run / "metrics.json", out / "missing"])))]
    return ["report", str(draw(st.sampled_from([run, out, run]))), "--out", str(draw(st.sampled_from([out / "report", run, ""])))]


def _snapshot(root: pathlib.Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_cli_outcomes_are_valid_results_or_one_line(run, data, capsys, monkeypatch):
    import tempfile

    from bmrs.compaction import load_compact

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        victim, out, outside = root / "run", root / "out", root / "outside"
        shutil.copytree(run, victim)
        out.mkdir()
        outside.mkdir()
        (outside / "mine.txt").write_text("a user's file")
        monkeypatch.chdir(outside)
        damage = data.draw(_damage())
        _apply(victim, damage)
        argv = data.draw(_arguments(victim, out))
        before = _snapshot(outside)
        capsys.readouterr()
        status = main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (argv, damage, captured.err)
        if status == 0:
            if argv[0] == "compact":
                load_compact(pathlib.Path(argv[argv.index("--out") + 1]))
            if argv[0] == "train":
                target = pathlib.Path(argv[argv.index("--out") + 1])
                json.loads((target / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        else:
            assert status in (2, 3), (argv, damage, status, captured.err)
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("bmrs: error: "), (argv, damage, captured.err)
        assert _snapshot(outside) == before, (argv, damage)


def test_content_digest_sees_every_value_and_not_the_file_layout(tmp_path):
    from bmrs._io import content_digest

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.float64)},
             "history": [{"epoch": 1, "loss": 0.5}], "rng": (1, 2, [3, 4]), "best": None}
    digest = content_digest(state)
    torch.save(state, tmp_path / "a.pt")
    assert content_digest(torch.load(tmp_path / "a.pt", weights_only=True)) == digest  # survives a round trip
    assert content_digest({**state, "model": {"b": state["model"]["b"], "w": state["model"]["w"]}}) == digest  # key order
    changes = [
        {**state, "model": {**state["model"], "w": state["model"]["w"] + 1e-6}},  # a value
        {**state, "model": {**state["model"], "w": state["model"]["w"].reshape(3, 2)}},  # a shape
        {**state, "model": {**state["model"], "b": state["model"]["b"].float()}},  # a dtype
        {**state, "history": [{"epoch": 1, "loss": 0.5000001}]},  # a number
        {**state, "rng": (1, 2, [3])},  # a length
    ]
    assert len({content_digest(c) for c in changes} | {digest}) == len(changes) + 1


# --- second round (issue 28): each case below once misbehaved ---------------------------------------


@pytest.mark.parametrize("case, text", [
    ("an overflowing number", '{"a": 1e400}'),
    ("nested 100000 deep", "[" * 100_000),
    ("a compression of -5", None),
    ("a NaN literal", None),
    ("a list", "[1, 2]"),
])
def test_malformed_run_json_is_one_line_naming_the_file(run, tmp_path, capsys, case, text):
    victim = copy_run(run, tmp_path / "victim")
    if text is None:
        metrics = json.loads((victim / "metrics.json").read_text())
        metrics["parameter_compression"] = -5 if "-5" in case else "__nan__"
        text = json.dumps(metrics).replace('"__nan__"', "NaN")
    (victim / "metrics.json").write_text(text)
    for argv in (["report", victim, "--out", tmp_path / "report"], ["info", victim],
                 ["compact", victim, "--out", tmp_path / "c.pt"]):
        line = one_line_error(capsys, main([str(a) for a in argv]))
        assert str(victim / "metrics.json") in line, (argv, line)
        if "-5" in case:
            assert "parameter_compression" in line and "[0, 1]" in line
    assert not (tmp_path / "report").exists() and not (tmp_path / "c.pt").exists()


def test_the_json_reader_bounds_depth_size_and_numbers(tmp_path):
    from bmrs._io import MAX_JSON_DEPTH, Number, parse_json, read_json

    assert parse_json('{"a": [1, 2.5, {"b": null}]}', "x.json") == {"a": [1, 2.5, {"b": None}]}
    for text, words in [("[" * 100_000, "nested"), ("[" * 40 + "]" * 40, "nested"), ('{"a": NaN}', "NaN"),
                        ('{"a": -Infinity}', "Infinity"), ('{"a": 1e400}', "1e400"), ("[]", "an object"),
                        ('{"a": 1' + "0" * 5000 + "}", "x.json"), ("{", "not valid JSON")]:
        with pytest.raises(ValueError, match=words) as info:
            parse_json(text, "x.json")
        assert "x.json" in str(info.value) and "\n" not in str(info.value)
    assert MAX_JSON_DEPTH >= 8
    with pytest.raises(ValueError, match=r"x.json: a\[1\].b must be a number in \[0, 1\], got 2"):
        parse_json('{"a": [{"b": 0}, {"b": 2}]}', "x.json", {"a": [{"b": Number(0, 1)}]})
    with pytest.raises(ValueError, match="x.json: no 'b'"):
        parse_json('{"a": 1}', "x.json", {"b": str})
    (tmp_path / "huge.json").write_bytes(b" " * (64 * 2**20 + 1))
    with pytest.raises(ValueError, match="huge.json .* over 64 MiB"):
        read_json(tmp_path / "huge.json")


def test_criterion_names_are_accepted_wherever_a_criterion_is():
    from bmrs.pruning import BMRSNKassRaftery, BMRSU, ContinuousPruning, decide, make_criterion, resolve_criterion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    bmrs.attach_gates(model, torch.randn(2, 6))
    assert bmrs.prune(model, "bmrs-n-kr") == bmrs.prune(model, make_criterion("bmrs-n-kr"))
    assert set(decide(model, "bmrs-u4")) == {"1"}
    assert isinstance(ContinuousPruning("bmrs_n_kr").criterion, BMRSNKassRaftery)
    assert resolve_criterion("bmrs-u4").bits == 4.0 and isinstance(resolve_criterion("bmrs-u", bits=6), BMRSU)
    with pytest.raises(ValueError, match="a criterion is a name"):
        bmrs.prune(model, 3)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        make_criterion("etheta", threshold=math.nan)
    with pytest.raises(ValueError, match="bmrs-n takes no option bogus"):
        make_criterion("bmrs-n", bogus=1)
    pytest.importorskip("lightning")
    from bmrs.integrations.lightning import BMRSPruning

    assert BMRSPruning("bmrs-u4").criterion.bits == 4.0


def test_an_example_input_that_does_not_fit_names_the_model_and_the_shapes():
    from bmrs.compaction import compact, count_flops

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(bmrs.BMRSError, match=r"example input float32 \(2, 7\) does not fit Sequential") as info:
        bmrs.attach_gates(model, torch.randn(2, 7))
    assert "\n" not in str(info.value) and not bmrs.gates(model)
    bmrs.attach_gates(model, torch.randn(2, 6))
    for call in (lambda: compact(model, torch.randn(3, 5)), lambda: count_flops(model, torch.randn(3, 5))):
        with pytest.raises(bmrs.BMRSError, match=r"float32 \(3, 5\) does not fit Sequential"):
            call()


def test_a_model_with_nothing_to_gate_says_why():

    with pytest.warns(UserWarning, match=r"ungated, so nothing in Sequential can be pruned:\n  0: final layer"):
        layout = bmrs.attach_gates(torch.nn.Sequential(torch.nn.Linear(6, 3)), torch.randn(2, 6))
    assert not layout.sites
    with pytest.warns(UserWarning, match="nothing to gate in Sequential.*no Linear, Conv"):
        bmrs.attach_gates(torch.nn.Sequential(torch.nn.ReLU()), torch.randn(2, 6))


def test_float_input_ids_are_refused():

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    with pytest.raises(bmrs.BMRSError, match="input_ids of BertForSequenceClassification are token ids"):
        bmrs.attach_gates(model, {"input_ids": torch.rand(2, 7) * 10, "attention_mask": torch.ones(2, 7)})


def test_round_to_beyond_every_width_says_why_nothing_changed(run, tmp_path, capsys):
    assert main(["compact", str(run), "--round-to", "1000000", "--out", str(tmp_path / "c.pt")]) == 0
    out = capsys.readouterr().out
    assert "multiple already" not in out and "full width" in out, out


def test_nproc_above_the_cores_warns_once(monkeypatch, tmp_path, capsys):
    import bmrs.commands.train as train_command

    launched = []
    monkeypatch.setattr(train_command, "_cores", lambda: 2)
    monkeypatch.setattr(train_command._launcher, "launch", lambda nproc, argv, out: launched.append(nproc))
    assert main(["train", *TINY, "--method", "none", "--nproc", "64", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert launched == [64] and len(err) == 1 and err[0].startswith("bmrs: warning: --nproc 64") and "2 CPU" in err[0]
    threads = [a for a in TINY if a != "1"]
    threads.remove("--threads")
    assert main(["train", *threads, "--threads", "2", "--method", "none", "--nproc", "2", "--out", str(tmp_path / "s")]) == 0
    assert "--nproc 2 x --threads 2" in capsys.readouterr().err
    assert main(["train", *TINY, "--method", "none", "--nproc", "2", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().err == ""


def test_a_file_of_a_run_is_never_an_output(run, tmp_path, capsys):
    victim = copy_run(run, tmp_path / "victim")
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    for argv in (["compact", victim, "--budget", "params=0.5", "--out", victim / "compact.pt", "--force"],
                 ["export", victim / "compact.pt", "--format", "torchscript", "--out", victim / "model.pt", "--force"],
                 ["export", victim, "--format", "torchscript", "--out", victim / "compact.pt", "--force"]):
        line = one_line_error(capsys, main([str(a) for a in argv]))
        assert "is a file of the run" in line, line
    (victim / "link.pt").symlink_to(victim / "compact.pt")
    line = one_line_error(capsys, main(["compact", str(victim), "--out", str(victim / "link.pt"), "--force"]))
    assert "is a file of the run" in line
    (victim / "link.pt").unlink()
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    assert main(["info", str(victim)]) == 0


def test_a_wrecked_model_is_never_saved_as_good(tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line_error(capsys, main(["train", *TINY, "--method", "bmrs-n-kr", "--lr", "1e6", "--out", str(out)]), 3)
    assert "diverged" in line and "bound" in line
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


class _GateBlowUp:
    """Batches of a data set; during epoch ``epoch`` one gate's log scale is made huge (as an
    optimiser step gone wrong would), so that its sigma overflows."""

    def __init__(self, dataset, model, epoch):
        self.x, self.y = dataset.tensors
        self.model, self.count, self.at = model, 0, epoch

    def __iter__(self):
        self.count += 1
        if self.count == self.at:
            with torch.no_grad():
                next(iter(bmrs.gates(self.model).values())).log_scale.fill_(200.0)
        for start in range(0, 320, 64):
            yield self.x[start:start + 64], self.y[start:start + 64]


def test_an_overflowing_gate_or_a_loss_risen_by_orders_of_magnitude_stops_training(tmp_path):
    from bmrs.training import EpochRecord, _check_loss_rise

    seed_everything(0)
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.input_shape, data.num_classes, width=16)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    val = torch.utils.data.DataLoader(data.val, batch_size=500)
    with pytest.raises(TrainingDiverged, match=r"log_scale reaches 200 after epoch 2.*exponential overflows"):
        trainer.fit(_GateBlowUp(data.train, model, 2), val, 3, checkpoint=checkpoint)
    assert len(torch.load(checkpoint, weights_only=True)["history"]) == 1  # the last good epoch
    assert bmrs.gates(model)
    record = EpochRecord(1, "train", 0.5, 0.0, 0.9, 0.5, 0.9, 0.0, 0.0)
    _check_loss_rise(400.0, [record], 2)  # 800 times: not yet
    with pytest.raises(TrainingDiverged, match="rose to 600 at epoch 2"):
        _check_loss_rise(600.0, [record], 2)


def test_bench_refuses_a_batch_beyond_memory_before_allocating(run, capsys):
    line = one_line_error(capsys, main(["bench", str(run), "--batch", "1000000000", "--runtime", "eager",
                                        "--repeats", "1", "--warmup", "0"]))
    assert "--batch" in line and "GiB" in line
    assert not (run / "bench.json").exists()


def test_a_budget_kind_given_twice_is_refused(run, tmp_path, capsys):
    from bmrs.pruning import parse_budget

    with pytest.raises(ValueError, match="flops given twice"):
        parse_budget("flops=0.2,flops=0.3")
    line = one_line_error(capsys, main(["compact", str(run), "--budget", "flops=0.2,flops=0.3",
                                        "--out", str(tmp_path / "c.pt")]))
    assert "given twice" in line and not (tmp_path / "c.pt").exists()


def test_a_refused_report_names_no_temporary_file_and_leaves_no_folder(run, tmp_path, capsys, monkeypatch):
    from bmrs import BMRSError
    from bmrs.commands import report as report_command

    def failing(collection, staged, **kwargs):
        raise BMRSError(f"{staged / 'results.json'}: not written, the data holds a non-finite number")

    out = tmp_path / "new" / "report"
    monkeypatch.setattr(report_command, "write_report", failing)
    line = one_line_error(capsys, main(["report", str(run), "--out", str(out)]))
    monkeypatch.undo()
    assert str(out / "results.json") in line and ".report." not in line, line
    assert list(tmp_path.iterdir()) == []
    victim = copy_run(run, tmp_path / "victim")
    (victim / "metrics.json").write_text('{"test_accuracy": NaN}')
    one_line_error(capsys, main(["report", str(victim), "--out", str(out)]))
    assert not (tmp_path / "new").exists()


def test_a_refused_long_out_leaves_no_folder(run, tmp_path, capsys):
    target = tmp_path / "a" / "b" / ("x" * 400 + ".pt")
    line = one_line_error(capsys, main(["compact", str(run), "--out", str(target)]))
    assert "cannot write" in line
    assert list(tmp_path.iterdir()) == []


def test_a_crafted_protocol_4_pickle_is_one_line_without_warnings(run, tmp_path, capsys):
    import pickle
    import warnings

    victim = copy_run(run, tmp_path / "victim")
    marker = tmp_path / "code-ran"
    with open(victim / "model.pt", "wb") as f:
        pickle.dump({"fc1.weight": _Touch(marker)}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = one_line_error(capsys, main(["info", str(victim / "model.pt")]))
    assert str(victim / "model.pt") in line and not marker.exists()
    assert [str(w.message) for w in caught] == []


# --- a property: JSON documents of the wrong shape, for every kind bmrs reads ------------------------

_JSON_KINDS = ("config.json", "metrics.json", "sweep.json", "bench.json", "compact metadata")
_JSON_EXAMPLES = 60  # per kind: docs/reliability.md reports the total
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**20), st.text(max_size=6),
                  st.floats(allow_nan=False, allow_infinity=False))
_ANY_JSON = st.recursive(_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                         max_leaves=8)


@pytest.fixture(scope="module")
def results(run, tmp_path_factory):
    """(run with bench.json, sweep directory, a compacted file outside any run), made once."""
    root = tmp_path_factory.mktemp("json-kinds")
    benched = copy_run(run, root / "run")
    assert main(["bench", str(benched), "--batch", "1", "--runtime", "eager", "--repeats", "1", "--warmup", "0"]) == 0
    assert main(["sweep", "--run", str(run), "--criteria", "bmrs-n,snr", "--levels", "0.5", "--no-progress",
                 "--out", str(root / "sweep")]) == 0
    shutil.copy(run / "compact.pt", root / "small.pt")
    return benched, root / "sweep", root / "small.pt"


def _paths(value, prefix=()):
    """Every (container path, key) of a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


@st.composite
def _wrong_document(draw, valid):
    """The text of a JSON document of the wrong shape, made from ``valid``: a value replaced by
    any JSON (of another type, or nested), a key deleted, a non-finite literal, the whole
    document replaced, or nesting beyond any bound."""
    import copy

    how = draw(st.sampled_from(["replace", "replace", "delete", "literal", "whole", "deep"]))
    if how == "whole":
        return json.dumps(draw(_ANY_JSON))
    if how == "deep":
        depth = draw(st.sampled_from([40, 1000, 100_000]))
        return "[" * depth + ("]" * depth if draw(st.booleans()) else "")
    doc = copy.deepcopy(valid)
    path = draw(st.sampled_from(sorted(_paths(doc), key=repr)))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
        return json.dumps(doc)
    parent[path[-1]] = "__literal__" if how == "literal" else draw(_ANY_JSON)
    literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-5", "1e308"]))
    return json.dumps(doc).replace('"__literal__"', literal)


def _readers(kind, victim, sweep_dir, small, out):
    """The commands that read a file of ``kind``."""
    bench = ["--batch", "1", "--runtime", "eager", "--repeats", "1", "--warmup", "0"]
    if kind == "sweep.json":
        return [["report", sweep_dir, "--out", out / "report"]]
    if kind == "bench.json":
        return [["info", victim], ["bench", victim, *bench]]
    if kind == "compact metadata":
        return [["info", small], ["export", small, "--format", "torchscript", "--out", out / "m.ts"], ["bench", small, *bench]]
    return [["report", victim, "--out", out / "report"], ["info", victim], ["compact", victim, "--out", out / "c.pt"],
            ["export", victim, "--format", "torchscript", "--out", out / "m.ts"], ["bench", victim, *bench],
            ["sweep", "--run", victim, "--criteria", "bmrs-n", "--levels", "0.5", "--no-progress", "--out", out / "s"],
            ["train", *TINY, "--method", "bmrs-n-code", "--resume", "--out", victim]]


@pytest.mark.parametrize("kind", _JSON_KINDS)
@hypothesis.settings(max_examples=_JSON_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_json_files_of_the_wrong_shape_are_valid_results_or_one_line(results, kind, data, capsys):
    import tempfile

    from bmrs.compaction import load_compact

    benched, sweep_dir, small = results
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        victim, sweep_copy, small_copy, out = root / "run", root / "sweep", root / "small.pt", root / "out"
        shutil.copytree(benched, victim)
        shutil.copytree(sweep_dir, sweep_copy)
        shutil.copy(small, small_copy)
        out.mkdir()
        if kind == "compact metadata":
            packed = torch.load(small_copy, weights_only=True)
            text = data.draw(_wrong_document(json.loads(packed["metadata"])))
            torch.save({**packed, "metadata": text}, small_copy)
        else:
            target = {"sweep.json": sweep_copy / "sweep.json"}.get(kind, victim / kind)
            target.write_text(data.draw(_wrong_document(json.loads(target.read_text()))))
        argv = [str(a) for a in data.draw(st.sampled_from(_readers(kind, victim, sweep_copy, small_copy, out)))]
        capsys.readouterr()
        status = main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (argv, captured.err)
        if status == 0:
            assert captured.out.strip(), argv
            if argv[0] == "compact":
                load_compact(out / "c.pt")
            if argv[0] == "report":
                assert (out / "report" / "results.md").is_file()
        else:
            lines = captured.err.strip().splitlines()
            assert status == 2 and len(lines) == 1 and lines[0].startswith("bmrs: error: "), (argv, status, captured.err)
