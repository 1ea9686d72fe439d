"""Layer names users recognise: the bundled MLP and LeNet5 name their layers (fc1, conv2), bmrs
prints the layer each gate prunes, and files written while the layers were numbered still load."""

import json

import pytest
import torch
from torch import nn

import bmrs
from bmrs.compaction import compact, load_compact, save_compact
from bmrs.models import build_model
from bmrs.pruning import kept_per_layer

from nets import small_mlp


def numbered(key: str, net: nn.Module) -> str:
    """``key`` as it was when the bundled networks numbered their layers ("fc1.weight" -> "1.weight")."""
    head, dot, rest = key.partition(".")
    return str(list(net._modules).index(head)) + dot + rest


@pytest.mark.parametrize("name,shape,expected", [
    ("mlp", (1, 32, 32), {"act1": "fc1", "act2": "fc2"}),
    ("lenet5", (1, 28, 28), {"act1": "conv1", "act2": "conv2", "act3": "fc1", "act4": "fc2"}),
])
def test_bundled_layers_have_names_and_gates_report_the_layer_they_prune(name, shape, expected):
    model = build_model(name, shape, 10)
    assert bmrs.layer_names(model) == expected
    bmrs.gates(model)["act1"].mask[:2] = 0
    kept = {layer: bmrs.gates(model)[gate].num_structures for gate, layer in expected.items()}
    kept[expected["act1"]] -= 2
    assert kept_per_layer(model) == kept
    assert not any(part.isdigit() for key in model.state_dict() for part in key.split("."))


def test_layer_names_of_other_models():
    model = small_mlp()  # a plain nn.Sequential: its numbers are its names
    bmrs.attach_gates(model, torch.zeros(2, 12))
    assert bmrs.layer_names(model) == {"1": "0", "3": "2"}  # gates after the Tanhs, pruning the Linears
    resnet = build_model("resnet", (3, 32, 32), 10)
    names = bmrs.layer_names(resnet)
    assert names["stem.2"] == "stem.0" and names["blocks.0.relu1"] == "blocks.0.conv1"
    assert len(set(names.values())) == len(names)
    bmrs.gate_layout(model).sites["3"].producer = "0"  # two gates that would print alike keep their own keys
    assert bmrs.layer_names(model) == {"1": "1", "3": "3"}


@pytest.mark.parametrize("name,shape", [("mlp", (1, 32, 32)), ("lenet5", (1, 28, 28))])
def test_a_state_dict_with_numbered_layers_loads(name, shape):
    torch.manual_seed(0)
    old = build_model(name, shape, 10)
    for gate in bmrs.gates(old).values():
        gate.loc.data.normal_()
        gate.mask[0] = 0
    legacy = {numbered(k, old): v for k, v in old.state_dict().items()}
    assert "1.weight" in legacy or "1.bmrs_gate.loc" in legacy
    new = build_model(name, shape, 10)
    new.load_state_dict(legacy, strict=True)
    for (k, a), (k2, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="99.weight"):  # a number past the last layer stays unexpected
        new.load_state_dict({**legacy, "99.weight": torch.zeros(1)}, strict=True)


def test_a_compact_file_with_numbered_layers_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 32, 32), 10).eval()
    for gate in bmrs.gates(model).values():
        gate.mask[: gate.num_structures // 2] = 0
    x = torch.randn(4, 1, 32, 32)
    small = compact(model, x)
    arch = {"name": "lenet5", "input_shape": [1, 32, 32], "num_classes": 10, "options": {}}
    save_compact(small, tmp_path / "new.pt", architecture=arch)
    data = torch.load(tmp_path / "new.pt", weights_only=True)
    meta = json.loads(data["metadata"])
    meta["layers"] = {numbered(k, small): v for k, v in meta["layers"].items()}
    legacy = {"state_dict": {numbered(k, small): v for k, v in data["state_dict"].items()}, "metadata": json.dumps(meta)}
    assert "0" in meta["layers"]  # conv1 was layer 0
    torch.save(legacy, tmp_path / "old.pt")
    loaded = load_compact(tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert loaded.conv1.out_channels == small.conv1.out_channels == 3


@pytest.mark.parametrize("model,shape,numbered_kept,expected", [
    ("mlp", [1, 32, 32], {"2": 15, "4": 28}, {"fc1": 15, "fc2": 28}),
    ("lenet5", [1, 32, 32], {"1": 2, "4": 6, "8": 40, "10": 28}, {"conv1": 2, "conv2": 6, "fc1": 40, "fc2": 28}),
])
def test_reports_read_runs_written_with_numbered_layers_by_layer_name(tmp_path, model, shape, numbered_kept, expected):
    from dataclasses import asdict

    from bmrs.rundir import RunConfig
    from bmrs.reporting.collect import collect

    config = asdict(RunConfig(dataset="fashion-mnist", model=model, method="bmrs-n-code").resolved())
    full = {"mlp": {"2": 150, "4": 150}, "lenet5": {"1": 6, "4": 16, "8": 120, "10": 84}}[model]
    metrics = {"test_accuracy": 0.9, "test_loss": 0.3, "val_accuracy": 0.9, "structure_compression": 0.5,
               "parameter_compression": 0.5, "kept": numbered_kept, "structures": full, "best_epoch": 3,
               "history": [{"epoch": 1, "kept": full}], "compaction": {"architecture": {"name": model, "input_shape": shape,
                                                              "num_classes": 10, "options": {}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    run = collect([tmp_path]).runs[0]
    assert run.metrics["kept"] == expected
    assert set(run.metrics["structures"]) == set(run.metrics["history"][0]["kept"]) == set(expected)
