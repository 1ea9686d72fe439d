"""The networks the commands work on: a run's gated model, a compacted file's network, and
the full-width network a compacted one is compared with."""

from __future__ import annotations

from pathlib import Path

import torch

from .._io import parse_json, read_json
from ..compaction.storage import METADATA
from ..compaction import ARCHITECTURES, compact, count_flops, count_parameters, load_compact
from ..deploy import full_network
from ..errors import BMRSError
from ..experiments.runs import load_run
from ..rundir import METRICS, load_state_file, verify_checksum

def load_run_model(path: Path, data_dir=None, *, need_data: bool = False):
    """(config, model, architecture, example input, data or None) of a run (see load_run)."""
    loaded = load_run(path, data_dir, need_data=need_data)
    return loaded.config, loaded.model, loaded.architecture, loaded.example, loaded.data


def describe_compact(path: Path) -> dict:

    data = load_state_file(path)
    if not (isinstance(data, dict) and "metadata" in data and "state_dict" in data):
        raise BMRSError(f"{path} is not a compacted model (written by 'bmrs compact' or save_compact)")
    metrics_file = path.parent / "metrics.json"
    if path.name == "compact.pt" and (path.parent / "config.json").is_file() and metrics_file.is_file():
        recorded = read_json(metrics_file, METRICS).get("checksums", {}).get("compact.pt")
        verify_checksum(data["state_dict"], path, recorded)
    if not isinstance(data["metadata"], str):
        raise BMRSError(f"{path}: its metadata is not the JSON object save_compact writes")
    metadata = parse_json(data["metadata"], f"{path} (its metadata)", METADATA)
    layers = metadata.get("layers", {})
    widths = {
        name: layer.get("out_features", layer.get("out_channels", layer.get("num_features")))
        for name, layer in layers.items()
        if layer.get("type") in ("Linear", "Conv1d", "Conv2d", "Conv3d")
    }
    architecture = metadata.get("architecture")
    info = {"file": str(path), "kind": "compacted", "architecture": architecture, "widths": widths, "layers": layers}
    if architecture is not None:
        net = load_compact(path)
        shape = [1, *architecture["input_shape"]]
        info.update(parameters=count_parameters(net), flops=count_flops(net, torch.zeros(shape)), input_shape=shape)
    else:
        info.update(parameters=sum(t.numel() for t in data["state_dict"].values()), flops=None, input_shape=None)
    return info


def networks(path: Path, data_dir, *, need_full: bool):
    """(compacted network, full network or None, architecture, example batch, source) of a
    run (directory, model.pt, checkpoint.pt) or a compacted model file.

    A run's full network is its gated model with E[theta] folded in and nothing removed. A
    compacted file holds no full network: the architecture is built at full width with
    random weights (the same shapes, so the same work), and ``source`` says so.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() or (path.name in ("model.pt", "checkpoint.pt") and (path.parent / "config.json").is_file()):
        _, model, architecture, example, _ = load_run_model(path, data_dir)
        small = compact(model, example)
        full = full_network(model, example) if need_full else None
        return small, full, architecture, example[:4], "the run's gated model, E[theta] folded in, nothing removed"
    info = describe_compact(path)
    architecture = info["architecture"]
    if architecture is None:
        raise BMRSError(f"{path} was saved without an architecture description; it cannot be rebuilt here")
    small = load_compact(path)
    example = torch.randn(4, *architecture["input_shape"], generator=torch.Generator().manual_seed(0))
    full = None
    if need_full:
        torch.manual_seed(0)
        full = ARCHITECTURES[architecture["name"]](architecture["input_shape"], architecture["num_classes"],
                                                  **architecture["options"]).eval()
    return small, full, architecture, example, f"{architecture['name']} at full width with random weights"
