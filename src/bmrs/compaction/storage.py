"""Saving a compacted model as tensors plus JSON metadata, and rebuilding it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import torch
from torch import nn

from .._io import write_atomic
from ..adapters import find_adapter, integration_of
from ..attention import CompactMultiheadAttention, MultiheadSelfAttention, compact_attention
from ..gates import gates

__all__ = ["save_compact", "load_compact", "register_architecture", "ARCHITECTURES"]

_FORMAT = "bmrs-compact"
_VERSION = 1
# Width attributes recorded per layer type (the tensors' shapes follow from the state dict).
_WIDTHS = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_channels",)),
    (MultiheadSelfAttention, ("num_heads", "head_dim")),
    (CompactMultiheadAttention, ("num_heads", "head_dim")),
)
_ARCHITECTURE_KEYS = {"name", "input_shape", "num_classes", "options"}

#: Builders that :func:`load_compact` can rebuild an architecture from, by name:
#: ``builder(input_shape, num_classes, **options) -> nn.Module``. The bundled models of
#: :mod:`bmrs.models` register themselves; users may add their own.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``name`` rebuildable by :func:`load_compact` (and accepted by :func:`save_compact`)."""
    ARCHITECTURES[name] = builder


def save_compact(model: nn.Module, path, *, architecture: dict | None = None) -> None:
    """Write a (compacted) plain model to ``path``, loadable with ``weights_only=True``.

    The file is ``torch.save`` of a dict of plain objects: ``"state_dict"`` (name -> tensor)
    and ``"metadata"``, a JSON string holding the format name and version, every layer's
    widths (``{"layers": {name: {"type": "Linear", "in_features": 12, ...}}}``) and
    ``architecture``. It is written to a temporary name and then renamed.

    Args:
        model: a plain model (no gates), e.g. from :func:`~bmrs.compaction.compact`.
        path: the file to write.
        architecture: for a bundled model, what :func:`load_compact` rebuilds it from:
            ``{"name": "mlp" | "lenet5" | "resnet", "input_shape": [...],
            "num_classes": n, "options": {...}}`` (the builder's keyword options). For a
            model with an adapter (:mod:`bmrs.adapters`; a Hugging Face model: its class
            name and configuration), the adapter gives it.
    """
    if gates(model):
        raise ValueError("save_compact takes a plain model; compact the gated model first with bmrs.compaction.compact")
    adapter = find_adapter(model) if architecture is None else None
    if adapter is not None:  # e.g. a Hugging Face model: its class and configuration
        architecture = adapter.architecture(model)
    if architecture is not None:
        architecture = _check_architecture(architecture)
    layers = {}
    for name, module in model.named_modules():
        for kind, attrs in _WIDTHS:
            if isinstance(module, kind):
                layers[name] = {"type": type(module).__name__} | {a: _plain(getattr(module, a)) for a in attrs}
                break
    metadata = {"format": _FORMAT, "version": _VERSION, "layers": layers, "architecture": architecture}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save({"state_dict": state, "metadata": json.dumps(metadata)}, tmp))


def load_compact(path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_compact`, in eval mode.

    The full-width architecture is built (the bundled builder
    ``bmrs.models.MODELS[name]`` from the saved ``architecture``, or a deep copy
    of ``model``), every parameter and buffer is replaced by an empty tensor of the saved
    shape and dtype, the recorded widths are written into the layers' attributes, and the
    weights are loaded with ``torch.load(weights_only=True)`` and a strict ``load_state_dict``.

    Args:
        path: a file from :func:`save_compact`.
        model: an unpruned plain instance of the architecture, for models saved without
            ``architecture`` (user models); it is not modified.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "metadata" not in data or "state_dict" not in data:
        raise ValueError(f"{path} is not a file written by bmrs.compaction.save_compact")
    metadata = json.loads(data["metadata"])
    if metadata.get("format") != _FORMAT or metadata.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported format {metadata.get('format')!r} version {metadata.get('version')!r}")
    if model is not None:
        if gates(model):
            raise ValueError("load_compact needs a plain model; pass the architecture without gates")
        net = copy.deepcopy(model)
    elif metadata["architecture"] is not None:
        arch = _check_architecture(metadata["architecture"])
        net = ARCHITECTURES[arch["name"]](arch["input_shape"], arch["num_classes"], **arch["options"])
    else:
        raise ValueError(f"{path} was saved without an architecture: pass model=<an unpruned instance of it>")
    _resize(net, data["state_dict"], metadata["layers"])
    net.load_state_dict(data["state_dict"], strict=True)
    return net.eval()


def _resize(net: nn.Module, state: dict, layers: dict) -> None:
    _compact_attention_modules(net, layers)
    modules = dict(net.named_modules())
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise ValueError(f"the saved weights have {key!r}, which this architecture does not")
        if attr in module._parameters and module._parameters[attr] is not None:
            old = module._parameters[attr]
            if old.shape == tensor.shape and old.dtype == tensor.dtype:
                continue  # kept as it is, so parameters shared between modules stay shared
            module._parameters[attr] = nn.Parameter(torch.empty_like(tensor), requires_grad=old.requires_grad)
        elif attr in module._buffers and module._buffers[attr] is not None:
            module._buffers[attr] = torch.empty_like(tensor)
    for name, widths in layers.items():
        module = modules.get(name)
        if module is None or type(module).__name__ != widths["type"]:
            raise ValueError(f"the saved layer {name!r} ({widths['type']}) does not match this architecture")
        for attr, value in widths.items():
            if attr != "type":
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)


def _compact_attention_modules(net: nn.Module, layers: dict) -> None:
    """Where the file holds a compacted ``nn.MultiheadAttention`` (a
    :class:`~bmrs.attention.CompactMultiheadAttention`, whose inner width no longer matches
    the embedding), swap the blank model's module for one of that kind with as many heads;
    the weights loaded next overwrite it."""
    for name, widths in layers.items():
        if widths["type"] != CompactMultiheadAttention.__name__:
            continue
        module = net.get_submodule(name)
        if not isinstance(module, nn.MultiheadAttention):
            continue
        keep = torch.arange(module.num_heads) < widths["num_heads"]
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, compact_attention(module, keep, keep.double()))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _check_architecture(architecture: dict) -> dict:
    missing = _ARCHITECTURE_KEYS - set(architecture)
    if missing:
        raise ValueError(f"architecture lacks {sorted(missing)}; expected keys {sorted(_ARCHITECTURE_KEYS)}")
    if architecture["name"] not in ARCHITECTURES:
        integration_of(str(architecture["name"]))  # an optional integration registers its own
    if architecture["name"] not in ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture['name']!r} is not registered (known: {', '.join(ARCHITECTURES) or 'none'}); "
            f"see bmrs.compaction.register_architecture"
        )
    try:
        return json.loads(json.dumps(architecture))
    except TypeError as err:
        raise ValueError(f"architecture must be JSON-able: {err}") from None
