"""Hugging Face transformers: attention heads and feed-forward neurons as structures.

Needs the optional extra ``bmrs[transformers]``. bmrs imports this module only when it is
given a model of the ``transformers`` package (:mod:`bmrs.structures.adapters`); it then handles
:func:`bmrs.attach_gates`, :func:`bmrs.compact`, the L2 criterion and
:func:`bmrs.save_compact` / :func:`bmrs.load_compact` of that model.

What is gated, in every transformer block it recognises:

* **attention heads**, at the input of the attention's output projection (``(N, T, H*D)``
  viewed as ``(N, T, H, D)``): whatever attention function the model runs (eager, sdpa,
  ...), the heads are merged there. Recognised: BERT-style (``query``/``key``/``value``
  and ``output.dense``), Llama/ViT-style (``q_proj``/``k_proj``/``v_proj``/``o_proj``)
  and GPT-2 (packed ``c_attn`` and ``c_proj``, both ``Conv1D``) attention;
* **feed-forward neurons**, at the input of the block's second layer: BERT
  (``intermediate.dense``/``output.dense``), ViT/CLIP (``fc1``/``fc2``) and GPT-2
  (``c_fc``/``c_proj``).

One theta per (example, structure), broadcast over tokens (and the head's D features).
The hidden width of the residual stream (embeddings, outputs of the output projections,
LayerNorm) is tied through every block and is not gated; nor are the layers after the last
block (pooler, classifier, language-model head).

:func:`bmrs.compact` deletes a removed head's rows of q, k and v (its columns of the packed
``c_attn``) and its columns of the output projection, folding the gate's factor into the
kept columns; likewise for neurons. The modules' attributes follow (``num_attention_heads``
or ``num_heads``, ``all_head_size``, GPT-2's ``split_size``, the layers' widths). Hugging
Face configurations hold one head count and one feed-forward width for all layers, so the
compacted model's ``config`` keeps them (they also fix the head dimension,
``hidden_size // num_attention_heads``) and gains two lists, one entry per block:
``layer_num_attention_heads`` and ``layer_intermediate_size``, the widths each block has
now. :func:`bmrs.load_compact` builds the model from that configuration and shrinks each
block to them before loading the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..structures.adapters import INPUT_ATTR, InputGroups, register_adapter, remove_input_groups
from ..compaction.storage import register_architecture
from ..errors import BMRSError
from ..structures.sites import PRODUCERS, Family, GateSite, _matches, call_example

__all__ = ["HEADS", "NEURONS", "layer_widths"]

HEADS = "attention-heads"
NEURONS = "ffn-neurons"
ARCHITECTURE = "transformers"
_HEADS_ATTRS = ("num_attention_heads", "num_heads")
_CONFIG_LISTS = {HEADS: "layer_num_attention_heads", NEURONS: "layer_intermediate_size"}


@dataclass
class _Group:
    """Structures of one block: ``groups`` groups of ``width`` features of the ``inputs``'
    outputs (each split into ``packed`` equal chunks, as GPT-2's q|k|v), read by ``output``."""

    kind: str
    owner: str  # the attention module or feed-forward block
    attrs: str  # the module holding the head-count attributes ("" for neurons)
    inputs: list[str]
    packed: int
    output: str
    groups: int
    width: int
    layer: int | None

    @property
    def site(self) -> str:
        return f"{self.output}.{INPUT_ATTR}"


def _out_features(layer: nn.Module) -> int:
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features


def _in_features(layer: nn.Module) -> int:
    return layer.nx if isinstance(layer, Conv1D) else layer.in_features


def _layer_index(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def _is_layer(m) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def _recognise(model: nn.Module) -> tuple[list[_Group], dict[str, str]]:
    """Every attention module and feed-forward block of a known shape, and the blocks of
    that shape left out with why."""
    found, problems = [], {}
    prefix = lambda name: f"{name}." if name else ""  # noqa: E731
    for name, m in model.named_modules():
        p, layer = prefix(name), _layer_index(name)
        kids = dict(m.named_children())
        attn = kids.get("self")
        if attn is not None and all(_is_layer(getattr(attn, a, None)) for a in ("query", "key", "value")) \
                and _is_layer(getattr(kids.get("output"), "dense", None)) and hasattr(attn, "attention_head_size"):
            heads, width = attn.num_attention_heads, attn.attention_head_size
            found.append(_Group(HEADS, name, f"{p}self", [f"{p}self.query", f"{p}self.key", f"{p}self.value"], 1,
                                f"{p}output.dense", heads, width, layer))
        elif all(_is_layer(kids.get(a)) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "head_dim"):
            heads = next((getattr(m, a) for a in _HEADS_ATTRS if hasattr(m, a)), None)
            if heads is None:
                continue
            if _out_features(kids["k_proj"]) != _out_features(kids["q_proj"]):
                problems[name] = "grouped-query attention (key/value heads shared by several query heads) is not supported"
                continue
            found.append(_Group(HEADS, name, name, [f"{p}q_proj", f"{p}k_proj", f"{p}v_proj"], 1, f"{p}o_proj",
                                heads, m.head_dim, layer))
        elif isinstance(kids.get("c_attn"), Conv1D) and isinstance(kids.get("c_proj"), Conv1D) and hasattr(m, "split_size"):
            if getattr(m, "is_cross_attention", False):
                problems[name] = "cross-attention with a separate q_attn is not supported"
                continue
            found.append(_Group(HEADS, name, name, [f"{p}c_attn"], 3, f"{p}c_proj", m.num_heads, m.head_dim, layer))
        elif _is_layer(getattr(kids.get("intermediate"), "dense", None)) and _is_layer(getattr(kids.get("output"), "dense", None)) \
                and hasattr(kids["intermediate"], "intermediate_act_fn"):
            width = _out_features(kids["intermediate"].dense)
            found.append(_Group(NEURONS, name, "", [f"{p}intermediate.dense"], 1, f"{p}output.dense", width, 1, layer))
        elif _is_layer(kids.get("fc1")) and _is_layer(kids.get("fc2")) and hasattr(m, "activation_fn"):
            found.append(_Group(NEURONS, name, "", [f"{p}fc1"], 1, f"{p}fc2", _out_features(kids["fc1"]), 1, layer))
        elif isinstance(kids.get("c_fc"), Conv1D) and isinstance(kids.get("c_proj"), Conv1D) and hasattr(m, "act"):
            found.append(_Group(NEURONS, name, "", [f"{p}c_fc"], 1, f"{p}c_proj", _out_features(kids["c_fc"]), 1, layer))
    return found, problems


def _find(net: nn.Module, owner: str) -> _Group:
    groups = [g for g in _recognise(net)[0] if g.owner == owner]
    if len(groups) != 1:
        raise BMRSError(f"{owner!r} is no longer an attention module or feed-forward block bmrs recognises")
    return groups[0]


def _params_per_structure(modules: dict, g: _Group) -> int:
    count = 0
    for name in g.inputs:
        layer = modules[name]
        count += g.packed * g.width * (_in_features(layer) + (layer.bias is not None))
    return count + g.width * _out_features(modules[g.output])


class TransformersAdapter:
    """The adapter of :mod:`bmrs.structures.adapters` for Hugging Face models."""

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, transformers.PreTrainedModel)

    def layout(self, model, example_input, *, exclude=(), heads=True):
        if isinstance(example_input, dict):
            ids = example_input.get("input_ids")
        else:  # positional: the first is the model's main input
            first = example_input[0] if isinstance(example_input, (tuple, list)) and example_input else example_input
            ids = first if getattr(model, "main_input_name", None) == "input_ids" else None
        if isinstance(ids, Tensor) and (ids.is_floating_point() or ids.is_complex()):
            raise BMRSError(f"input_ids of {type(model).__name__} are token ids, integers; got a {ids.dtype} tensor "
                            "(pass e.g. tokenizer(...)['input_ids'], or ids.long())")
        groups, skipped = _recognise(model)
        modules = dict(model.named_modules())
        chosen = []
        for g in groups:
            members = [g.owner, *g.inputs, g.output]
            if any(_matches(modules[n], n, exclude) for n in members):
                skipped[g.owner] = "excluded"
            elif g.kind == HEADS and not heads:
                skipped[g.owner] = "excluded (heads=False)"
            else:
                chosen.append(g)
        calls = _calls(model, example_input)
        sites, families = [], []
        for g in sorted(chosen, key=lambda g: [order for _, order in calls.get(g.output, [])]):
            seen = calls.get(g.output, [])
            if len(seen) != 1 or seen[0][0][-1] != g.groups * g.width:
                skipped[g.owner] = (
                    f"{g.output} is called {len(seen)} times or not with {g.groups} x {g.width} input features "
                    "in a forward pass, so the structures cannot be gated at its input"
                )
                continue
            InputGroups.install(modules[g.output], g.groups, g.width)
            sites.append(GateSite(producer=g.owner, site=g.site, dim=-2, num_structures=g.groups, kind=g.kind))
            per = _params_per_structure(modules, g) + 2  # + the gate's loc and log_scale
            families.append(Family(members=[(g.site, list(range(g.groups)))], slot_params=[per] * g.groups))
        covered = {n for g in groups for n in (*g.inputs, g.output)}
        last = max((seen[0][1] for g in groups for seen in [calls.get(g.output, [])] if seen), default=-1)
        for name, m in modules.items():
            if name in covered or not isinstance(m, (*PRODUCERS, Conv1D)):
                continue
            orders = [order for _, order in calls.get(name, [])]
            if orders and min(orders) > last:
                skipped[name] = "final layer (after the last transformer block; only heads and feed-forward neurons are gated)"
            else:
                skipped[name] = "its outputs have the hidden width, tied through every block by residual additions"
        return sites, families, skipped

    def compact(self, net, sites, masks, scales) -> None:
        modules = dict(net.named_modules())
        remove_input_groups(net)
        for name, site in sites.items():
            _shrink(net, modules, _find(net, site.producer), masks[name] > 0, scales[name])
        _record_widths(net)

    def input_weights(self, model, site) -> Tensor:
        modules = dict(model.named_modules())
        g = _find(model, site.producer)
        rows = []
        for name in g.inputs:
            layer = modules[name]
            weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight  # (out, in)
            for chunk in weight.chunk(g.packed):
                rows.append(chunk.reshape(g.groups, -1))
        return torch.cat(rows, dim=1)

    def architecture(self, model) -> dict:
        cls = type(model)
        if getattr(transformers, cls.__name__, None) is not cls:
            raise BMRSError(f"{cls.__name__} is not a class of the transformers package; pass model= to load_compact")
        return {
            "name": ARCHITECTURE, "input_shape": [], "num_classes": 0,
            "options": {"class": cls.__name__, "config": json.loads(model.config.to_json_string(use_diff=False))},
        }


def _calls(model: nn.Module, example_input) -> dict[str, list[tuple[tuple, int]]]:
    """For every linear layer: (input shape, call order) of each call in one eval forward."""
    calls: dict[str, list] = {}
    counter = [0]
    handles = []

    def hook(name):
        def pre(module, args):
            counter[0] += 1
            if args and isinstance(args[0], Tensor):
                calls.setdefault(name, []).append((tuple(args[0].shape), counter[0]))
        return pre

    for name, m in model.named_modules():
        if isinstance(m, (*PRODUCERS, Conv1D)):
            handles.append(m.register_forward_pre_hook(hook(name)))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_example(model, example_input)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return calls


def _shrink(net, modules, g: _Group, keep: Tensor, scale: Tensor) -> None:
    """Keep the groups ``keep`` of ``g`` (one silent group if none), folding ``scale`` into the output layer."""
    keep = keep.detach().cpu().bool()
    scale = scale.detach().cpu().double()
    kept = keep.nonzero().flatten()
    scale = scale[kept]
    if len(kept) == 0:  # a block cannot have width 0: keep one group whose output columns are zero
        kept, scale = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
    idx = (kept[:, None] * g.width + torch.arange(g.width)).flatten()
    full = g.groups * g.width
    with torch.no_grad():
        for name in g.inputs:
            packed = torch.cat([idx + c * full for c in range(g.packed)])
            _keep_outputs(modules[name], packed)
        _keep_inputs(modules[g.output], idx, scale.repeat_interleave(g.width))
    count = len(kept)
    if g.kind == HEADS:
        owner = net.get_submodule(g.attrs)
        for attr in _HEADS_ATTRS:
            if hasattr(owner, attr):
                setattr(owner, attr, count)
        for attr in ("all_head_size", "split_size"):
            if hasattr(owner, attr):
                setattr(owner, attr, count * g.width)


def _keep_outputs(layer: nn.Module, idx: Tensor) -> None:
    if isinstance(layer, Conv1D):
        layer.weight = nn.Parameter(layer.weight[:, idx].clone(), requires_grad=layer.weight.requires_grad)
        layer.nf = len(idx)
    else:
        layer.weight = nn.Parameter(layer.weight[idx].clone(), requires_grad=layer.weight.requires_grad)
        layer.out_features = len(idx)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[idx].clone(), requires_grad=layer.bias.requires_grad)


def _keep_inputs(layer: nn.Module, idx: Tensor, scale: Tensor) -> None:
    w = layer.weight
    if isinstance(layer, Conv1D):  # (in, out)
        new = (w[idx].double() * scale.to(w.device)[:, None]).to(w.dtype)
        layer.nx = len(idx)
    else:  # (out, in)
        new = (w[:, idx].double() * scale.to(w.device)[None, :]).to(w.dtype)
        layer.in_features = len(idx)
    layer.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Per block, the number of attention heads and of feed-forward neurons ``model`` has
    now: ``{"layer_num_attention_heads": [...], "layer_intermediate_size": [...]}``."""
    config = model.config
    widths = {attr: [None] * config.num_hidden_layers for attr in _CONFIG_LISTS.values()}
    for g in _recognise(model)[0]:
        if g.layer is None or g.layer >= config.num_hidden_layers:
            raise BMRSError(f"{g.owner!r} is not in a numbered block of the model; its width cannot be recorded")
        widths[_CONFIG_LISTS[g.kind]][g.layer] = g.groups
    return widths


def _record_widths(net: nn.Module) -> None:
    for attr, values in layer_widths(net).items():
        setattr(net.config, attr, values)


def _build(input_shape, num_classes, *, config: dict, **options) -> nn.Module:
    """``load_compact``'s builder: the class at full width from ``config``, then each block
    shrunk to the widths the configuration lists (weights are loaded afterwards)."""
    cls = getattr(transformers, options.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BMRSError(f"{options.get('class')!r} is not a model class of the transformers package")
    cfg = cls.config_class.from_dict(config)
    model = cls(cfg)
    modules = dict(model.named_modules())
    for g in _recognise(model)[0]:
        values = getattr(cfg, _CONFIG_LISTS[g.kind], None)
        target = values[g.layer] if values and g.layer is not None and values[g.layer] is not None else g.groups
        keep = torch.arange(g.groups) < target
        _shrink(model, modules, g, keep, torch.ones(g.groups))
    return model.eval()


register_adapter(TransformersAdapter())
register_architecture(ARCHITECTURE, _build)
