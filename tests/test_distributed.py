"""bmrs under DistributedDataParallel: the public functions take a wrapped model, two
processes train, prune and compact identically, a killed run resumes, and `bmrs train
--nproc 2` writes one run directory and speaks with one voice: a killed process, an error in
every process or a SIGTERM to the command ends it with one line, the processes' output kept
in OUT/logs/, and --resume gives the uninterrupted run's metrics."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
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


# A --nproc 2 run of the CLI long enough to be killed in the middle (about 5 s of training
# here); no --method, so the recommended defaults are filled in and said.
NPROC_RUN = ["-m", "bmrs", "train", "--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "40",
             "--finetune-epochs", "1", "--batch-size", "32", "--lr", "0.02", "--kl-reduction", "elbo", "--no-progress",
             "--nproc", "2"]
EPOCHS = 41

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes through /proc")


@pytest.fixture(scope="module")
def nproc_run(tmp_path_factory):
    """An uninterrupted `bmrs train --nproc 2` run: (its directory, the finished process)."""
    cwd = tmp_path_factory.mktemp("nproc")
    proc = run([*NPROC_RUN, "--out", cwd / "R"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "R", proc


@pytest.mark.slow
@needs_gloo
def test_cli_nproc_2_writes_one_run_directory(nproc_run):
    out, proc = nproc_run
    assert [p.name for p in out.parent.iterdir()] == ["R"]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "compact.pt", "config.json", "logs", "metrics.json", "model.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["history"]) == EPOCHS
    assert proc.stdout.count(f"run {out}:") == 1  # rank 0 reports, once
    assert proc.stdout.count("recommended defaults") == 1  # the launcher says it; rank 0 does not again
    assert "(2 processes)" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if not line.startswith("bmrs: warning:")] == []
    # the processes' output: a folder per start, torchrun's layout
    (start,) = (out / "logs").iterdir()
    assert sorted(str(p.relative_to(start)) for p in start.rglob("*.log")) == [
        "attempt_0/0/stderr.log", "attempt_0/1/stderr.log", "attempt_0/1/stdout.log"]
    again = run([*NPROC_RUN, "--out", out, "--resume"], cwd=out.parent)  # complete: reported, not retrained
    assert again.returncode == 0 and "is complete" in again.stdout


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the training processes that the process ``launcher`` started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (_ppid_and_state(int(entry.name)) or (0,))[0] == launcher:
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks.update({int(item[5:]): int(entry.name) for item in env if item.startswith(b"RANK=")})
    return ranks


def _alive(pid: int) -> bool:
    found = _ppid_and_state(pid)
    return found is not None and found[1] not in ("Z", "X")  # a zombie is gone, only not reaped yet


def _epochs_done(checkpoint: Path) -> int:
    try:
        return len(torch.load(checkpoint, weights_only=True)["history"])
    except Exception:  # not written yet, or being replaced right now
        return 0


def _start_and_wait(out: Path, epochs: int = 2):
    """Start the --nproc 2 run into ``out``; return (the launcher, {rank: pid}) once its
    checkpoint holds ``epochs`` epochs."""
    proc = subprocess.Popen([sys.executable, *map(str, NPROC_RUN), "--out", str(out)], cwd=out.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 300  # generous: CI machines can be busy
    ranks: dict[int, int] = {}
    while _epochs_done(out / "checkpoint.pt") < epochs or len(ranks) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not get going: {proc.communicate()[1][-4000:]}")
        ranks = ranks if len(ranks) == 2 else _ranks(proc.pid)
        time.sleep(0.05)
    return proc, ranks


def _one_line(stderr: str) -> str:
    """The one line of ``stderr`` but for warnings (--nproc 2 on a 1-core machine warns)."""
    lines = [line for line in stderr.splitlines() if not line.startswith("bmrs: warning:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-4000:]
    return lines[0]


def _logs(line: str) -> Path:
    found = re.search(r"their output is in (\S+?);", line)
    assert found, line
    return Path(found.group(1))


@pytest.mark.slow
@needs_gloo
@needs_proc
def test_a_killed_process_ends_the_run_with_one_line_and_resume_gives_the_uninterrupted_metrics(tmp_path, nproc_run):
    out = tmp_path / "killed"
    proc, ranks = _start_and_wait(out)
    try:
        os.kill(ranks[1], signal.SIGKILL)  # as the out-of-memory killer would
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    line = _one_line(stderr)
    assert line.startswith("bmrs: error: training process 1 of 2 was killed by SIGKILL; the other stopped with it; "), line
    assert line.endswith(f"{out / 'checkpoint.pt'} keeps the last completed epoch: run the same command with --resume "
                         "to continue"), line
    assert not any(_alive(pid) for pid in ranks.values())
    # the processes' output is kept where the line says: rank 0 lost its peer (gloo's error and
    # traceback in its log) or torchrun stopped it first (launcher.log says so)
    logs = _logs(line)
    assert logs.is_relative_to(out / "logs") and (logs / "1" / "stderr.log").is_file()
    rank0 = (logs / "0" / "stderr.log").read_text(errors="replace")
    launcher = (logs / "launcher.log").read_text()
    assert ("Traceback" in rank0 and "gloo" in rank0) or "closing signal SIGTERM" in launcher, (rank0, launcher)
    done = _epochs_done(out / "checkpoint.pt")
    assert 2 <= done < EPOCHS, "killed too late to test resuming"
    assert not (out / "metrics.json").exists()

    resumed = run([*NPROC_RUN, "--out", out, "--resume"], cwd=out.parent)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(list((out / "logs").iterdir())) == 2  # each start keeps its own folder
    full = json.loads((nproc_run[0] / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    assert set(again) == set(full)
    for key in set(full) - {"train_seconds", "history", "provenance"}:
        assert again[key] == full[key], key
    for a, b in zip(again["history"], full["history"], strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b


@pytest.mark.slow
@needs_gloo
@needs_proc
def test_sigterm_to_the_launcher_stops_every_process_with_one_line(tmp_path):
    out = tmp_path / "stopped"
    proc, ranks = _start_and_wait(out, epochs=1)
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    line = _one_line(stderr)
    assert line.startswith("bmrs: stopped by SIGTERM; the 2 training processes stopped with it; their output is in "), line
    assert line.endswith("keeps the last completed epoch: run the same command with --resume to continue"), line
    assert not any(_alive(pid) for pid in ranks.values())
    assert (out / "checkpoint.pt").is_file() and not (out / "metrics.json").exists()


@pytest.mark.slow
@needs_gloo
def test_an_error_in_every_process_is_one_line_and_leaves_no_run(tmp_path):
    out = tmp_path / "R"
    proc = run([*NPROC_RUN, "--from", tmp_path / "missing.pt", "--out", out], cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    # in its own words, as a single process says it; which processes said it before torchrun
    # stopped the rest varies ("all 2 training processes" or "training process 1 of 2; ...")
    assert line.startswith(f"bmrs: error: --from {tmp_path / 'missing.pt'}: no such file or directory ("), line
    assert "training process" in line and f"their output is in {out / 'logs'}" in line, line
    assert [p.name for p in out.iterdir()] == ["logs"]  # no config.json: the same command may run again


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


def test_the_cause_of_a_failure_is_the_process_that_failed_first(tmp_path, monkeypatch):
    """A process killed by a signal, before one that raised, before one that lost its peers,
    before one torchrun stopped with SIGTERM; what a process says of itself is what bmrs wrote
    into torchrun's error file, or else the last line of its log."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from bmrs.cli import _tell_torchrun
    from bmrs.commands._launch import cause

    def failure(rank, code, said=None, log=None):
        error_file = tmp_path / f"{rank}-{len(list(tmp_path.glob('*.json')))}.json"  # a new one each time
        if said is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            _tell_torchrun(said)
        if log is not None:
            (tmp_path / str(rank)).mkdir(exist_ok=True)
            (tmp_path / str(rank) / "stderr.log").write_text(log)
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(error_file))

    lost = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    assert cause({0: failure(0, -15), 1: failure(1, -9)}, tmp_path) == (1, "was killed by SIGKILL", -9, 1)
    assert cause({0: failure(0, 1, lost), 1: failure(1, 1, "ValueError: boom")}, tmp_path)[:3] == \
        (1, "ValueError: boom", 1)
    assert cause({0: failure(0, -15), 1: failure(1, 1, lost)}, tmp_path)[:3] == (1, lost, 1)
    # no error file: the last line of the process's log, without torch's rank prefix
    assert cause({0: failure(0, -15), 1: failure(1, 2, log="[rank1]: bmrs: error: out of disk\n\n")}, tmp_path)[:3] == \
        (1, "bmrs: error: out of disk", 2)
    # every process failed alike
    assert cause({0: failure(0, 2, "no data"), 1: failure(1, 2, "no data")}, tmp_path) == (0, "no data", 2, 2)


def test_only_rank_0s_progress_bar_reaches_the_terminal():
    """The relay of rank 0's stderr log forwards tqdm's redraws, read in any pieces, and
    nothing else: no warning, no traceback after the bar, and a bar left is cleared."""
    from tqdm import tqdm

    from bmrs.commands._launch import ProgressRelay

    log = io.StringIO()
    log.write("[W socket.cpp:697] [c10d] a warning of gloo\n")
    bar = tqdm(range(3), desc="epochs", file=log, leave=False, mininterval=0)
    for _ in bar:
        bar.set_postfix(loss=0.5)
    bar.close()
    bar = tqdm(range(3), desc="epochs", file=log, leave=False, mininterval=0)
    next(iter(bar))  # a bar left on the line when the process died
    log.write("[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: gloo: Connection reset by peer\n")
    text = log.getvalue()
    for size in (1, 7, len(text)):
        shown = io.StringIO()
        relay = ProgressRelay(shown)
        for start in range(0, len(text), size):
            relay.feed(text[start:start + size])
        relay.close()
        redraws = [part for part in shown.getvalue().split("\r") if part.strip()]
        assert redraws and all(re.fullmatch(r"epochs: +\d+%\|.*\] *", part) for part in redraws), shown.getvalue()
        assert "100%" in shown.getvalue() and shown.getvalue().endswith(" \r")  # the last bar is cleared
