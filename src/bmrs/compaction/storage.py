"""Saving a compacted model as tensors plus JSON metadata, and rebuilding it."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import torch
from torch import nn

from .._io import Mapping, Nullable, Number, OptionalKey, parse_json, read_tensors, write_atomic
from ..structures.adapters import find_adapter, integration_of
from ..structures.attention import CompactMultiheadAttention, MultiheadSelfAttention, compact_attention, is_packed_attention
from ..errors import BMRSError
from ..gates import gates

__all__ = ["save_compact", "load_compact", "register_architecture", "architecture_builder", "ARCHITECTURES"]

_FORMAT = "bmrs-compact"
_VERSION = 1
_COUNT = Number(0, integer=True)
#: The shape of the metadata (JSON) a compacted file carries beside its weights.
METADATA = {
    "format": str, "version": Number(integer=True), "layers": Mapping({"type": str}),
    "architecture": OptionalKey(Nullable({"name": str, "input_shape": [Number(1, integer=True)], "num_classes": _COUNT,
                                         "options": dict})),
}
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
# An example input of more elements than this is refused (FLOP counts allocate one example).
_MAX_INPUT_ELEMENTS = 2**26
# load_compact builds the full-width network only if it is at most this many times the size
# of the weights in the file, or at most _SKELETON_MIN_BYTES (a crafted file cannot make it
# allocate terabytes).
_SKELETON_FACTOR = 1000
_SKELETON_MIN_BYTES = 2**30

#: Builders registered with :func:`register_architecture`, by name:
#: ``builder(input_shape, num_classes, **options) -> nn.Module``. The bundled models register
#: theirs when :mod:`bmrs.models` is imported (``import bmrs`` does), an optional integration
#: when a model of its library is first seen or its architecture asked for.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``name`` rebuildable by :func:`load_compact` (and accepted by :func:`save_compact`);
    a later registration of a name replaces the earlier one (a bundled model's included)."""
    ARCHITECTURES[name] = builder


def architecture_builder(name: str) -> Callable[..., nn.Module]:
    """The builder :func:`load_compact` rebuilds architecture ``name`` with, from
    :data:`ARCHITECTURES` (the bundled models, and an optional integration such as
    :mod:`bmrs.integrations.transformers` that registers its own when its name is asked for, see
    :mod:`bmrs.structures.adapters`).

    Raises:
        ValueError: no builder of that name.
    """
    if name not in ARCHITECTURES:
        integration_of(name)  # an optional integration registers its own
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    known = ", ".join(sorted(ARCHITECTURES))
    raise BMRSError(
        f"architecture {name!r} is neither registered nor bundled (known: {known}); "
        "see bmrs.compaction.register_architecture"
    )


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
            model with an adapter (:mod:`bmrs.structures.adapters`; a Hugging Face model: its class
            name and configuration), the adapter gives it.
    """
    if gates(model):
        raise BMRSError("save_compact takes a plain model; compact the gated model first with bmrs.compaction.compact")
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
        else:
            if isinstance(module, nn.Identity) and name:  # e.g. a residual block compaction deleted
                layers[name] = {"type": "Identity"}
            elif is_packed_attention(module):  # timm-style attention: its head count, and inner width if it has one
                attrs = [a for a in ("num_heads", "attn_dim") if isinstance(getattr(module, a, None), int)]
                layers[name] = {"type": type(module).__name__} | {a: getattr(module, a) for a in attrs}
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
    The recorded widths must be those of the saved weights, and a full-width architecture out
    of proportion to the file (measured on the meta device first) is refused: metadata alone
    never makes it allocate memory. Errors are ``ValueError`` naming the file.

    Args:
        path: a file from :func:`save_compact`.
        model: an unpruned plain instance of the architecture, for models saved without
            ``architecture`` (user models); it is not modified.
    """
    data = read_tensors(path, "a file written by bmrs.compaction.save_compact")
    if not isinstance(data, dict) or "metadata" not in data or "state_dict" not in data:
        raise BMRSError(f"{path} is not a file written by bmrs.compaction.save_compact")
    metadata, state = _check_contents(path, data)
    if model is not None:
        if gates(model):
            raise BMRSError("load_compact needs a plain model; pass the architecture without gates")
        net = copy.deepcopy(model)
    elif metadata["architecture"] is not None:
        arch = _check_architecture(metadata["architecture"], path)
        net = _build_skeleton(architecture_builder(arch["name"]), arch, state, path)
    else:
        raise BMRSError(f"{path} was saved without an architecture: pass model=<an unpruned instance of it>")
    layers = metadata["layers"]
    rename = getattr(net, "layer_name", None)  # a bundled network that once numbered its layers
    if callable(rename):
        state = {rename(k): v for k, v in state.items()}
        layers = {rename(k): v for k, v in layers.items()}
    try:
        _resize(net, state, layers)
        net.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise BMRSError(f"{path} does not fit its architecture: {' '.join(str(err).split())[:300]}") from None
    return net.eval()


def _build_skeleton(builder: Callable[..., nn.Module], arch: dict, state: dict, path) -> nn.Module:
    """The full-width network the file's weights are loaded into, refused without allocating
    anything when it would be more than ``_SKELETON_FACTOR`` times (and over
    ``_SKELETON_MIN_BYTES``) the size of the weights the file holds: its size is first
    measured on the meta device. A builder that cannot run on the meta device is not measured."""
    args = (arch["input_shape"], arch["num_classes"])
    try:
        with torch.device("meta"):
            probe = builder(*args, **arch["options"])
        size = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    except Exception:  # the probe is only a measurement: any failure leaves it unmeasured
        size = None
    saved = sum(t.numel() * t.element_size() for t in state.values())
    if size is not None and size > max(_SKELETON_MIN_BYTES, _SKELETON_FACTOR * saved):
        raise BMRSError(f"{path}: its architecture ({json.dumps(arch['options'])[:100]}) asks for a network of "
                         f"{size / 2**20:,.0f} MiB, out of proportion to the {saved / 2**20:,.2f} MiB of weights "
                         "the file holds; refusing to build it")
    try:
        return builder(*args, **arch["options"])
    except (TypeError, ValueError) as err:  # options a builder does not take, or values it refuses
        raise BMRSError(f"{path}: its architecture ({json.dumps(arch['options'])[:100]}) does not build a "
                        f"{arch['name']}: {' '.join(str(err).split())[:200]}") from None


def _check_contents(path, data: dict) -> tuple[dict, dict]:
    """The metadata and state dict of a save_compact file, checked against each other: every
    recorded layer's widths are those of its saved weight (so nothing sized by the metadata
    alone is ever allocated)."""
    state = data["state_dict"]
    if not isinstance(data["metadata"], str):
        raise BMRSError(f"{path}: its metadata is not JSON text")
    metadata = parse_json(data["metadata"], f"{path} (its metadata)", METADATA)
    try:
        if metadata.get("format") != _FORMAT or metadata.get("version") != _VERSION:
            raise BMRSError(f"unsupported format {metadata.get('format')!r} version {metadata.get('version')!r}")
        layers = metadata["layers"]
        if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items())):
            raise BMRSError("its state_dict is not a dict of tensors")
        for name, widths in layers.items():
            weight = state.get(f"{name}.weight" if name else "weight")
            if not isinstance(widths, dict) or not isinstance(widths.get("type"), str):
                raise BMRSError(f"layer {name!r} has no type")
            expected = _expected_widths(widths, weight)
            for attr, size in expected.items():
                if widths.get(attr) != size:
                    raise BMRSError(f"layer {name!r}: {attr} {widths.get(attr)!r} but its weight has {size}")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise BMRSError(f"{path}: {' '.join(str(err).split())[:300]}") from None
    return metadata, state


def _expected_widths(widths: dict, weight) -> dict:
    """The widths a layer's saved weight implies (Linear and Conv; others are not checked)."""
    if weight is None or weight.dim() < 2:
        return {}
    if widths["type"] == "Linear":
        return {"out_features": int(weight.shape[0]), "in_features": int(weight.shape[1])}
    if widths["type"] in ("Conv1d", "Conv2d", "Conv3d"):
        return {"out_channels": int(weight.shape[0])}
    return {}


def _resize(net: nn.Module, state: dict, layers: dict) -> None:
    _compact_attention_modules(net, layers)
    for name, widths in layers.items():  # modules compaction replaced by the identity (deleted blocks)
        if widths["type"] == "Identity" and not isinstance(net.get_submodule(name), nn.Identity):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    modules = dict(net.named_modules())
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise BMRSError(f"the saved weights have {key!r}, which this architecture does not")
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
            raise BMRSError(f"the saved layer {name!r} ({widths['type']}) does not match this architecture")
        for attr, value in widths.items():
            if attr != "type":
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for name, widths in layers.items():  # a packed-qkv attention's head count fits its resized layers
        module = modules[name]
        if "num_heads" in widths and hasattr(module, "qkv") and not is_packed_attention(module):
            raise BMRSError(f"the saved attention {name!r} has {widths['num_heads']} heads, which its qkv and proj do not fit")


def _compact_attention_modules(net: nn.Module, layers: dict) -> None:
    """Where the file holds a compacted ``nn.MultiheadAttention`` (a
    :class:`~bmrs.structures.attention.CompactMultiheadAttention`, whose inner width no longer matches
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


def _check_architecture(architecture: dict, path=None) -> dict:
    where = f"{path}: " if path is not None else ""
    if not isinstance(architecture, dict):
        raise BMRSError(f"{where}architecture must be a dict with keys {sorted(_ARCHITECTURE_KEYS)}")
    missing = _ARCHITECTURE_KEYS - set(architecture)
    if missing:
        raise BMRSError(f"{where}architecture lacks {sorted(missing)}; expected keys {sorted(_ARCHITECTURE_KEYS)}")
    if not isinstance(architecture["name"], str):
        raise BMRSError(f"{where}architecture name must be a string, got {architecture['name']!r}")
    architecture_builder(architecture["name"])  # a clear error for an unknown name
    shape, classes = architecture.get("input_shape"), architecture.get("num_classes")
    if not (isinstance(shape, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            and isinstance(classes, int) and not isinstance(classes, bool) and classes >= 0
            and isinstance(architecture.get("options"), dict)):
        raise BMRSError(f"{where}architecture needs input_shape (positive integers), num_classes (an integer) "
                         f"and options (a dict), got {json.dumps(architecture, default=str)[:200]}")
    if math.prod(shape) > _MAX_INPUT_ELEMENTS:
        raise BMRSError(f"{where}input_shape {shape} has more than {_MAX_INPUT_ELEMENTS} elements per example")
    try:
        return json.loads(json.dumps(architecture))
    except TypeError as err:
        raise BMRSError(f"architecture must be JSON-able: {err}") from None
