"""Starting from a trained network: gates that keep its function, loading it from a run, a
compacted file or a plain state dict (weights only), and ``bmrs train --from``."""

import json

import pytest
import torch
from torch import nn

from bmrs import BMRSError
from bmrs.cli import build_parser, main
from bmrs.commands.train import _config_from_args
from bmrs.compaction import compact, save_compact
from bmrs.datasets import load_dataset
from bmrs.gates import gates
from bmrs.models import build_model, lenet5, resnet, resnet56
from bmrs.training import (
    TRAINED_GATE_INIT, TRAINED_GATE_LR, TRAINED_SCHEDULE, Trainer, gate_trained, load_trained, seed_everything, trained_adam,
)

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--batch-size", "32", "--no-progress"]


def _trained_lenet(steps: int = 60) -> tuple[nn.Module, torch.Tensor]:
    """A LeNet5 trained (briefly, plainly) on Fashion-MNIST-shaped noise with learnable labels:
    the weights have moved well away from their initialisation."""
    seed_everything(0)
    net = lenet5((1, 28, 28), 10)
    x = torch.randn(256, 1, 28, 28)
    y = (x[:, 0, :14].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, :, :14].mean(dim=(1, 2)) > 0).long()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), x[:64]


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_paper_init_changes_a_trained_network_and_the_trained_init_does_not():
    net, x = _trained_lenet()
    with torch.no_grad():
        reference = net(x)
    paper = build_model("lenet5", (1, 28, 28), 10)
    paper.load_state_dict({**paper.state_dict(), **net.state_dict()})
    with torch.no_grad():
        assert _relative(paper.eval()(x), reference) > 1e-3  # E[theta] = 0.9946 per gate
    gate_trained(net, x)
    net.eval()
    with torch.no_grad():
        assert _relative(net(x), reference) <= 1e-3
    for gate in gates(net).values():
        assert torch.all(gate.loc == TRAINED_GATE_INIT["init_loc"])
        assert torch.all(gate.log_scale == TRAINED_GATE_INIT["init_log_scale"])
        assert float((1 - gate.expected_gate().detach()).abs().max()) < 1e-5


def test_a_gated_resnet56_keeps_its_function_and_compacts_exactly(tmp_path):
    torch.manual_seed(0)
    net = resnet56((1, 16, 16), 10)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 1 + 54 + 2  # stem, 27 blocks, 2 projections
    net.train()
    with torch.no_grad():  # BatchNorm statistics of real activations, so eval differs from init
        for _ in range(3):
            net(torch.randn(32, 1, 16, 16))
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        reference = net.eval()(x)
    layout = gate_trained(net, x)
    assert len(layout.sites) == 1 + 27 * 2 + 2
    with torch.no_grad():
        assert _relative(net.eval()(x), reference) <= 1e-3
    for gate in gates(net).values():  # prune a third of every gate
        gate.mask[: gate.num_structures // 3] = 0
    with torch.no_grad():
        gated = net.eval()(x)
    small = compact(net, x)
    with torch.no_grad():
        assert _relative(small(x), gated) < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in resnet56((1, 16, 16), 10).parameters())
    save_compact(small, tmp_path / "r56.pt",
                 architecture={"name": "resnet56", "input_shape": [1, 16, 16], "num_classes": 10, "options": {}})
    again = load_trained(tmp_path / "r56.pt")  # rebuilt by the bundled builder, at the saved widths
    with torch.no_grad():
        assert torch.equal(again(x), small.eval()(x))


def test_gate_trained_refuses_a_network_it_would_change():
    net, x = _trained_lenet()
    with pytest.raises(BMRSError, match="differ"):
        gate_trained(net, x, init_log_scale=-2.0)
    assert not gates(net)  # left as it was


def test_load_trained_reads_plain_state_dicts_and_compacted_files(tmp_path):
    net, x = _trained_lenet()
    with torch.no_grad():
        reference = net(x)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    again = load_trained(tmp_path / "plain.pt", lenet5((1, 28, 28), 10)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), reference)
    with pytest.raises(BMRSError, match="pass the model"):
        load_trained(tmp_path / "plain.pt")
    with pytest.raises(BMRSError, match="does not fit"):
        load_trained(tmp_path / "plain.pt", resnet((1, 28, 28), 10))
    gated = build_model("lenet5", (1, 28, 28), 10)
    torch.save(gated.state_dict(), tmp_path / "gated.pt")
    with pytest.raises(BMRSError, match="gated model"):
        load_trained(tmp_path / "gated.pt", lenet5((1, 28, 28), 10))
    torch.save({"weights": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(BMRSError, match="neither"):
        load_trained(tmp_path / "junk.pt", lenet5((1, 28, 28), 10))
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole module: refused, never unpickled
    with pytest.raises(BMRSError, match="not a state dict"):
        load_trained(tmp_path / "pickled.pt", lenet5((1, 28, 28), 10))
    gate_trained(net, x)
    save_compact(compact(net, x), tmp_path / "small.pt",
                 architecture={"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10, "options": {}})
    small = load_trained(tmp_path / "small.pt")
    with torch.no_grad():
        assert _relative(small(x), reference) <= 1e-3


def test_trainer_fine_tunes_a_trained_network_with_gates_learning_faster():
    net, x = _trained_lenet()
    gate_trained(net, x)
    optimizer = trained_adam(net, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, TRAINED_GATE_LR]
    gate_ids = {id(p) for g in gates(net).values() for p in g.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == gate_ids
    y = torch.zeros(len(x), dtype=torch.long)
    trainer = Trainer(net, optimizer, kl_reduction="structures", progress=False)
    before = {n: g.log_scale.detach().clone() for n, g in gates(net).items()}
    trainer.step(x, y)
    assert all(not torch.equal(before[n], g.log_scale) for n, g in gates(net).items())


def test_from_changes_the_schedule_defaults_and_given_flags_win():
    def parse(argv):
        return build_parser().parse_args([*argv[:1], "--method", "none", *argv[1:]])

    scratch = _config_from_args(parse(["train", *TINY, "--out", "x"]))
    trained = _config_from_args(parse(["train", *TINY, "--from", "net.pt", "--out", "x"]))
    given = _config_from_args(parse(["train", *TINY, "--from", "net.pt", "--epochs", "7", "--out", "x"]))
    assert (scratch.epochs, scratch.prune_every, scratch.finetune_epochs, scratch.start_from) == (50, 1, 10, None)
    assert {k: getattr(trained, k) for k in TRAINED_SCHEDULE} == TRAINED_SCHEDULE and trained.start_from == "net.pt"
    assert (given.epochs, given.finetune_epochs) == (7, TRAINED_SCHEDULE["finetune_epochs"])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A plain (--method none) digits MLP run: the trained bundled model."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", *TINY, "--method", "none", "--epochs", "6", "--finetune-epochs", "0", "--out", str(out)]) == 0
    return out


def _accuracy(run) -> float:
    return json.loads((run / "metrics.json").read_text())["test_accuracy"]


def test_a_trained_bundled_model_gated_computes_what_it_computed(base_run):
    net = load_trained(base_run / "compact.pt")  # the trained MLP of a bmrs run, gates folded in
    x = load_dataset("digits", seed=0).test.tensors[0][:64]
    with torch.no_grad():
        reference = net(x)
    gate_trained(net, x)
    assert len(gates(net)) == 2
    with torch.no_grad():
        assert _relative(net.eval()(x), reference) <= 1e-3


def test_train_from_a_run_directory_starts_at_its_accuracy(base_run, tmp_path, capsys):
    out = tmp_path / "from-run"
    assert main(["train", *TINY, "--from", str(base_run), "--epochs", "2", "--prune-every", "2",
                 "--finetune-epochs", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["start_from"] == str(base_run) and config["epochs"] == 2
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 3 and history[-1]["phase"] == "finetune"
    assert _accuracy(out) > _accuracy(base_run) - 0.15  # a fine-tune, not a restart from random weights
    # resuming the complete run reports it
    assert main(["train", *TINY, "--from", str(base_run), "--epochs", "2", "--prune-every", "2",
                 "--finetune-epochs", "1", "--resume", "--out", str(out)]) == 0


def test_train_from_a_users_plain_state_dict(base_run, tmp_path):
    data = load_dataset("digits", seed=0)
    net = load_trained(base_run / "compact.pt")  # the user's trained network, at full width
    plain = tmp_path / "mine.pt"
    torch.save(net.state_dict(), plain)
    out = tmp_path / "from-plain"
    assert main(["train", *TINY, "--from", str(plain), "--epochs", "2", "--prune-every", "2",
                 "--finetune-epochs", "0", "--out", str(out)]) == 0
    assert _accuracy(out) > _accuracy(base_run) - 0.15
    with torch.no_grad():  # the plain state dict the run started from is untouched
        assert torch.equal(torch.load(plain, weights_only=True)["fc1.weight"], net.state_dict()["fc1.weight"])
    assert data.num_classes == 10


def test_train_from_refuses_what_it_cannot_use(base_run, tmp_path, capsys):
    assert main(["train", *TINY, "--from", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a")]) == 2
    assert "no such file" in capsys.readouterr().err
    other = ["--dataset", "digits", "--model", "mlp", "--width", "24", "--no-progress"]
    assert main(["train", *other, "--from", str(base_run), "--epochs", "1", "--out", str(tmp_path / "b")]) == 2
    assert "options" in capsys.readouterr().err
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")
    assert main(["train", *TINY, "--from", str(tmp_path / "pickled.pt"), "--epochs", "1", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c" / "metrics.json").exists()
