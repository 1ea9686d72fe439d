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
  and GPT-2 (packed ``c_attn`` and ``c_proj``, both ``Conv1D``) attention; grouped-query
  attention (Llama, Qwen2, Mistral, Gemma: ``num_key_value_groups`` query heads share one
  key/value head) gates the query heads, and each key/value head with its query heads is
  one family, kept or removed as a whole;
* **feed-forward neurons**, at the input of the block's second layer: BERT
  (``intermediate.dense``/``output.dense``), ViT/CLIP (``fc1``/``fc2``), GPT-2
  (``c_fc``/``c_proj``) and gated FFNs (``gate_proj``/``up_proj``/``down_proj``, SwiGLU
  and GeGLU: a neuron leaves all three; Phi-3's packed ``gate_up_proj``: both halves).

One theta per (example, structure), broadcast over tokens (and the head's D features).
The hidden width of the residual stream (embeddings, outputs of the output projections,
norms) is tied through every block and is gated only with ``hidden_width=True``, for
decoders whose every layer is known (Llama, Qwen2, Mistral: a gate on each writer of the
stream, all in one family); the layers after the last block (pooler, classifier,
language-model head) are not gated.

:func:`bmrs.compact` deletes a removed head's rows of q, k and v (its columns of the packed
``c_attn``) and its columns of the output projection, folding the gate's factor into the
kept columns; likewise for neurons. The modules' attributes follow (``num_attention_heads``
or ``num_heads``, ``all_head_size``, GPT-2's ``split_size``, the layers' widths). Hugging
Face configurations hold one head count and one feed-forward width for all layers, so the
compacted model's ``config`` keeps them (they also fix the head dimension,
``hidden_size // num_attention_heads``) and gains two lists, one entry per block:
``layer_num_attention_heads`` and ``layer_intermediate_size``, the widths each block has
now (and ``layer_num_key_value_heads`` for grouped-query attention, whose modules'
``num_key_value_groups`` follow). :func:`bmrs.load_compact` builds the model from that configuration and shrinks each
block to them before loading the weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..structures.adapters import INPUT_ATTR, InputGroups, register_adapter, remove_input_groups
from ..compaction.storage import register_architecture
from ..errors import BMRSError
from ..structures.sites import PRODUCERS, _matches, call_example
from ..structures.kinds import Family, GateSite

__all__ = ["HEADS", "NEURONS", "HIDDEN", "layer_widths"]

HEADS = "attention-heads"
NEURONS = "ffn-neurons"
HIDDEN = "hidden-width"
#: The configuration entry of a compacted model whose hidden width was pruned.
HIDDEN_CONFIG = "compact_hidden_size"
ARCHITECTURE = "transformers"
_HEADS_ATTRS = ("num_attention_heads", "num_heads")
_CONFIG_LISTS = {HEADS: "layer_num_attention_heads", NEURONS: "layer_intermediate_size"}
#: The per-block list of key/value heads, recorded for grouped-query attention only.
KV_HEADS_LIST = "layer_num_key_value_heads"


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
    #: Grouped-query attention (``inputs`` = q, k, v): the number of key/value heads, each
    #: shared by ``groups // kv_heads`` consecutive query heads; 0 for every other block.
    kv_heads: int = 0

    @property
    def per_kv(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.groups // self.kv_heads

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
        elif all(_is_layer(kids.get(a)) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "head_dim") \
                and hasattr(m, "num_key_value_groups"):
            grouped = _grouped_query(name, m, kids)
            if isinstance(grouped, str):
                problems[name] = grouped
                continue
            heads, kv_heads = grouped
            found.append(_Group(HEADS, name, name, [f"{p}q_proj", f"{p}k_proj", f"{p}v_proj"], 1, f"{p}o_proj",
                                heads, m.head_dim, layer, kv_heads=kv_heads))
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
        elif all(isinstance(kids.get(a), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")) and hasattr(m, "act_fn"):
            # gated FFN (SwiGLU, GeGLU): down_proj(act(gate_proj(x)) * up_proj(x)); neuron i is row i
            # of gate_proj and of up_proj and column i of down_proj
            width = _out_features(kids["gate_proj"])
            if _out_features(kids["up_proj"]) != width or _in_features(kids["down_proj"]) != width:
                problems[name] = "gate_proj, up_proj and down_proj do not share one hidden width"
                continue
            found.append(_Group(NEURONS, name, "", [f"{p}gate_proj", f"{p}up_proj"], 1, f"{p}down_proj", width, 1, layer))
        elif isinstance(kids.get("gate_up_proj"), nn.Linear) and isinstance(kids.get("down_proj"), nn.Linear) \
                and hasattr(m, "activation_fn"):
            # Phi-3: gate and up packed in one layer, split in halves by chunk(2)
            width = _in_features(kids["down_proj"])
            if _out_features(kids["gate_up_proj"]) != 2 * width:
                problems[name] = "gate_up_proj is not twice the width of down_proj's input"
                continue
            found.append(_Group(NEURONS, name, "", [f"{p}gate_up_proj"], 2, f"{p}down_proj", width, 1, layer))
        elif _is_layer(kids.get("qkv_proj")) and _is_layer(kids.get("o_proj")):
            problems[name] = ("packed qkv_proj whose forward reads the query width from the configuration shared by "
                              "all layers, so heads cannot be removed per layer: not supported")
        elif _is_layer(kids.get("fc1")) and _is_layer(kids.get("fc2")) and hasattr(m, "activation_fn"):
            found.append(_Group(NEURONS, name, "", [f"{p}fc1"], 1, f"{p}fc2", _out_features(kids["fc1"]), 1, layer))
        elif isinstance(kids.get("c_fc"), Conv1D) and isinstance(kids.get("c_proj"), Conv1D) and hasattr(m, "act"):
            found.append(_Group(NEURONS, name, "", [f"{p}c_fc"], 1, f"{p}c_proj", _out_features(kids["c_fc"]), 1, layer))
    return found, problems


def _grouped_query(name: str, m: nn.Module, kids: dict) -> tuple[int, int] | str:
    """(query heads, key/value heads) of a Llama-style attention module, whose forward infers
    both counts from the projections' widths and repeats each key/value head for
    ``num_key_value_groups`` consecutive query heads; or why its shape is not understood."""
    d, per = m.head_dim, m.num_key_value_groups
    q, k, v = (_out_features(kids[a]) for a in ("q_proj", "k_proj", "v_proj"))
    if not (isinstance(d, int) and isinstance(per, int) and d > 0 and per > 0):
        return "head_dim and num_key_value_groups are not positive integers"
    if q % d or k % d or v != k or _in_features(kids["o_proj"]) != q or q // d != (k // d) * per:
        return (f"q_proj ({q}), k_proj ({k}), v_proj ({v}) and o_proj ({_in_features(kids['o_proj'])} inputs) "
                f"are not {per} query heads per key/value head of width {d}")
    return q // d, k // d


def _find(net: nn.Module, owner: str) -> _Group:
    groups = [g for g in _recognise(net)[0] if g.owner == owner]
    if len(groups) != 1:
        raise BMRSError(f"{owner!r} is no longer an attention module or feed-forward block bmrs recognises")
    return groups[0]


def _params_per_structure(modules: dict, g: _Group) -> int:
    """Parameters one structure of ``g`` holds: for grouped-query attention, one key/value
    head with its query heads (the slot of a family)."""
    if g.kv_heads:
        q, k, v = (modules[n] for n in g.inputs)
        per_q = g.width * (_in_features(q) + (q.bias is not None)) + g.width * _out_features(modules[g.output])
        per_kv = sum(g.width * (_in_features(x) + (x.bias is not None)) for x in (k, v))
        return g.per_kv * per_q + per_kv
    count = 0
    for name in g.inputs:
        layer = modules[name]
        count += g.packed * g.width * (_in_features(layer) + (layer.bias is not None))
    return count + g.width * _out_features(modules[g.output])


class TransformersAdapter:
    """The adapter of :mod:`bmrs.structures.adapters` for Hugging Face models."""

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, transformers.PreTrainedModel)

    def layout(self, model, example_input, *, exclude=(), heads=True, hidden_width=False):
        if isinstance(example_input, dict):
            ids = example_input.get("input_ids")
        else:  # positional: the first is the model's main input
            first = example_input[0] if isinstance(example_input, (tuple, list)) and example_input else example_input
            ids = first if getattr(model, "main_input_name", None) == "input_ids" else None
        if isinstance(ids, Tensor) and (ids.is_floating_point() or ids.is_complex()):
            raise BMRSError(f"input_ids of {type(model).__name__} are token ids, integers; got a {ids.dtype} tensor "
                            "(pass e.g. tokenizer(...)['input_ids'], or ids.long())")
        groups, skipped = _recognise(model)
        unsupported = list(skipped)  # blocks of a known shape left out: their layers are listed under them
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
            families.append(_family(modules, g))
        covered = {n for g in groups for n in (*g.inputs, g.output)}
        if hidden_width:
            stream = _stream(model, groups, skipped, exclude)
            if isinstance(stream, str):
                skipped["hidden width"] = stream
            else:
                hidden_sites, family = _hidden_layout(model, stream, calls)
                sites += hidden_sites
                families.append(family)
                covered |= {name for name, _ in stream.readers} | set(stream.writers)
        last = max((seen[0][1] for g in groups for seen in [calls.get(g.output, [])] if seen), default=-1)
        for name, m in modules.items():
            if name in covered or not isinstance(m, (*PRODUCERS, Conv1D)):
                continue
            if any(name.startswith(f"{owner}.") for owner in unsupported):
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
            if site.kind != HIDDEN:
                _shrink(net, modules, _find(net, site.producer), masks[name] > 0, scales[name])
        hidden = {name: site for name, site in sites.items() if site.kind == HIDDEN}
        if hidden:  # after the blocks: they read their stream modules from the recognised groups
            _shrink_hidden(net, hidden, masks, scales)
        _record_widths(net)

    def input_weights(self, model, site) -> Tensor:
        modules = dict(model.named_modules())
        if site.kind == HIDDEN:  # a writer's rows (the embedding's columns)
            layer = modules[site.producer]
            return layer.weight.t() if isinstance(layer, nn.Embedding) else layer.weight
        g = _find(model, site.producer)
        if g.kv_heads:  # a query head's rows of q, and those of the key/value head it reads
            q, k, v = (modules[n].weight for n in g.inputs)
            shared = [x.reshape(g.kv_heads, -1).repeat_interleave(g.per_kv, 0) for x in (k, v)]
            return torch.cat([q.reshape(g.groups, -1), *shared], dim=1)
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


def _family(modules: dict, g: _Group) -> Family:
    """The family of a block's gate. Heads and neurons: each structure alone. Grouped-query
    attention: one slot per key/value head, holding its query heads (member ``r`` is the
    ``r``-th query head of every group), so a key/value head is kept or removed with its
    whole group, by the group's summed evidence, and every block keeps the same number of
    query heads per key/value head, as its attention code requires."""
    effects = _effects(modules, g)
    if g.kv_heads:
        per = g.per_kv
        members = [(g.site, [j * per + r for j in range(g.kv_heads)]) for r in range(per)]
        slot = _params_per_structure(modules, g) + 2 * per  # + the gates' loc and log_scale
        return Family(members=members, slot_params=[slot] * g.kv_heads, effects=effects)
    per = _params_per_structure(modules, g) + 2  # + the gate's loc and log_scale
    return Family(members=[(g.site, list(range(g.groups)))], slot_params=[per] * g.groups, effects=effects)


def _effects(modules: dict, g: _Group) -> list:
    """What each slot of ``g``'s family removes, per layer (``Family.effects``: rows ``"out"``,
    columns ``"in"``), so that counts of removed parameters overlap correctly with other
    families touching the same layers (the hidden width). Only for ``nn.Linear`` layers
    (GPT-2's ``Conv1D`` keeps its weight transposed): ``[]`` otherwise."""
    if not all(isinstance(modules[n], nn.Linear) for n in (*g.inputs, g.output)):
        return []
    span = lambda heads: [h * g.width + i for h in heads for i in range(g.width)]  # noqa: E731
    if g.kv_heads:
        queries = [list(range(j * g.per_kv, (j + 1) * g.per_kv)) for j in range(g.kv_heads)]
        q, k, v = g.inputs
        return ([(q, "out", [span(qs) for qs in queries])]
                + [(n, "out", [span([j]) for j in range(g.kv_heads)]) for n in (k, v)]
                + [(g.output, "in", [span(qs) for qs in queries])])
    full = g.groups * g.width
    rows = [[i + c * full for c in range(g.packed) for i in span([h])] for h in range(g.groups)]
    return [(n, "out", rows) for n in g.inputs] + [(g.output, "in", [span([h]) for h in range(g.groups)])]


@dataclass
class _Stream:
    """The residual stream of a decoder: the layers writing it (token embedding, each block's
    output projections), those reading it (each block's input projections, the language-model
    head: ``(name, out_features)``) and its RMS norms."""

    width: int
    writers: list[str]
    readers: list[tuple[str, int]]
    norms: list[str]


def _is_rms_norm(m: nn.Module, width: int) -> bool:
    """A Llama-style RMSNorm over ``width`` channels: ``weight * x / sqrt(mean(x^2) + variance_epsilon)``."""
    weight = getattr(m, "weight", None)
    return (isinstance(getattr(m, "variance_epsilon", None), float) and isinstance(weight, nn.Parameter)
            and tuple(weight.shape) == (width,) and getattr(m, "bias", None) is None
            and not any(True for _ in m.children()))


def _stream(model: nn.Module, groups: list[_Group], skipped: dict, exclude) -> _Stream | str:
    """The residual stream of ``model`` if bmrs knows every layer that reads or writes it, else why not."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    if not isinstance(embedding, nn.Embedding):
        return "not gated: the token embedding is not an nn.Embedding"
    width = embedding.embedding_dim
    if head is not None and head.weight is embedding.weight:
        return "not gated: the language-model head shares the token embedding's weight (tied embeddings)"
    if any(g.owner in skipped for g in groups) or any(k for k in skipped if k != "hidden width"):
        left = next(k for k in skipped if k != "hidden width")
        return f"not gated: {left} is left out ({skipped[left]}), and it reads or writes the hidden width"
    writers = [names[embedding]] + [g.output for g in groups]
    readers = [(n, _out_features(model.get_submodule(n))) for g in groups for n in g.inputs]
    if head is not None:
        readers.append((names[head], _out_features(head)))
    known = set(writers) | {n for n, _ in readers}
    for name, m in model.named_modules():
        if _matches(m, name, exclude) and name in known:
            return f"not gated: {name} is excluded, and it reads or writes the hidden width"
        if isinstance(m, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) and name not in known:
            return f"not gated: {name} ({type(m).__name__}) is no layer of a block bmrs recognises"
        if name in known and not isinstance(m, (nn.Linear, nn.Embedding)):
            return f"not gated: {name} is a {type(m).__name__}, not an nn.Linear"
    for name in writers[1:]:
        if _out_features(model.get_submodule(name)) != width:
            return f"not gated: {name} does not write {width} channels"
    for name, _ in readers:
        if _in_features(model.get_submodule(name)) != width:
            return f"not gated: {name} does not read {width} channels"
    norms = []
    for name, m in model.named_modules():
        if "norm" in type(m).__name__.lower() and name:
            if not _is_rms_norm(m, width):
                return (f"not gated: {name} ({type(m).__name__}) is not an RMSNorm weight * x / sqrt(mean(x^2) + eps) "
                        f"over the {width} channels, so removing channels would change its output")
            norms.append(name)
    return _Stream(width, writers, readers, norms)


def _hidden_layout(model: nn.Module, stream: _Stream, calls: dict) -> tuple[list[GateSite], Family]:
    """One gate per writer of the stream, on its output (one theta per example and channel),
    all in one family: channel ``c`` is removed only when every writer masks it."""
    sites = [GateSite(producer=w, site=w, dim=-1, num_structures=stream.width, kind=HIDDEN)
             for w in stream.writers]
    effects = []
    for w in stream.writers:
        layer = model.get_submodule(w)
        effects.append((w, "in" if isinstance(layer, nn.Embedding) else "out", [[c] for c in range(stream.width)]))
    effects += [(r, "in", [[c] for c in range(stream.width)]) for r, _ in stream.readers]
    effects += [(n, "out", [[c] for c in range(stream.width)]) for n in stream.norms]
    per_channel = 2 * len(stream.writers)  # the gates' loc and log_scale
    for w in stream.writers:
        layer = model.get_submodule(w)
        per_channel += layer.num_embeddings if isinstance(layer, nn.Embedding) else _in_features(layer) + (layer.bias is not None)
    per_channel += sum(out for _, out in stream.readers) + len(stream.norms)
    family = Family(members=[(w, list(range(stream.width))) for w in stream.writers],
                    slot_params=[per_channel] * stream.width, effects=effects)
    return sites, family


def _shrink_hidden(net: nn.Module, sites: dict, masks: dict, scales: dict) -> None:
    """Fold each writer's gate into its rows (the embedding's columns), keep the channels some
    writer keeps (one silent channel if none), and remove the others from every writer, reader
    and norm.

    A removed channel is 0 everywhere in the gated model, so the norms' mean of squares over
    ``d`` channels is ``d'/d`` times that over the ``d'`` kept ones: each norm gets
    ``variance_epsilon * d / d'`` and its weight times ``sqrt(d / d')``, which gives exactly
    its former output."""
    groups = _recognise(net)[0]
    stream = _stream(net, groups, {}, ())
    if isinstance(stream, str):
        raise BMRSError(f"the hidden width can no longer be removed: {stream}")
    keep = torch.zeros(stream.width, dtype=torch.bool)
    for name, site in sites.items():
        layer = net.get_submodule(site.producer)
        scale = scales[name].detach().cpu().double()
        keep |= masks[name].detach().cpu() > 0
        w = layer.weight
        if isinstance(layer, nn.Embedding):
            w.copy_((w.double() * scale.to(w.device)[None, :]).to(w.dtype))
        else:
            w.copy_((w.double() * scale.to(w.device)[:, None]).to(w.dtype))
            if layer.bias is not None:
                layer.bias.copy_((layer.bias.double() * scale.to(w.device)).to(layer.bias.dtype))
    kept = keep.nonzero().flatten()
    if len(kept) == 0:  # a stream of width 0 cannot run: one channel, 0 everywhere, stays
        kept = torch.zeros(1, dtype=torch.long)
    d, d_kept = stream.width, len(kept)
    for w in stream.writers:
        layer = net.get_submodule(w)
        if isinstance(layer, nn.Embedding):
            layer.weight = nn.Parameter(layer.weight[:, kept.to(layer.weight.device)].clone(),
                                        requires_grad=layer.weight.requires_grad)
            layer.embedding_dim = d_kept
        else:
            _keep_outputs(layer, kept)
    for r, _ in stream.readers:
        _keep_inputs(net.get_submodule(r), kept, torch.ones(d_kept, dtype=torch.float64))
    for n in stream.norms:
        norm = net.get_submodule(n)
        w = norm.weight
        new = (w[kept.to(w.device)].double() * math.sqrt(d / d_kept)).to(w.dtype)
        norm.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        norm.variance_epsilon = norm.variance_epsilon * d / d_kept
    setattr(net.config, HIDDEN_CONFIG, d_kept)


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
    if g.kv_heads:
        _shrink_grouped(net, modules, g, keep, scale)
        return
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
    owner = net.get_submodule(g.owner)
    if g.kind == NEURONS and hasattr(owner, "down_proj") and isinstance(getattr(owner, "intermediate_size", None), int):
        owner.intermediate_size = count  # gated FFNs keep their width
    if g.kind == HEADS:
        owner = net.get_submodule(g.attrs)  # the module holding the head counts
        for attr in _HEADS_ATTRS:
            if hasattr(owner, attr):
                setattr(owner, attr, count)
        for attr in ("all_head_size", "split_size"):
            if hasattr(owner, attr):
                setattr(owner, attr, count * g.width)


def _grouped_selection(keep: Tensor, kv_heads: int, per_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which heads a grouped-query attention block keeps, given the query heads ``keep``
    leaves unmasked: (kept key/value heads, kept query heads in order, whether each kept
    query head is live).

    A key/value head goes when every query head of its group is masked. Each remaining group
    keeps the same number of query heads, the largest number of live ones in any group (the
    attention code repeats every key/value head equally often): a group with fewer live
    query heads also keeps some masked ones, which stay silent (their output columns are
    zero). With every query head masked, one group of one silent head stays."""
    live = keep.view(kv_heads, per_kv)
    groups = live.any(dim=1).nonzero().flatten()
    if len(groups) == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
    width = int(live[groups].sum(dim=1).max())
    queries, alive = [], []
    for j in groups.tolist():
        order = torch.argsort((~live[j]).to(torch.int8), stable=True)[:width]  # live heads first
        chosen = order.sort().values
        queries += (j * per_kv + chosen).tolist()
        alive += live[j, chosen].tolist()
    return groups, torch.tensor(queries), torch.tensor(alive)


def _shrink_grouped(net, modules, g: _Group, keep: Tensor, scale: Tensor) -> None:
    """:func:`_shrink` for grouped-query attention: rows of the kept query heads in q, of the
    kept key/value heads in k and v, the kept query heads' columns of the output projection
    times ``scale`` (0 for a silent head); the module's ``num_key_value_groups`` follows."""
    groups, queries, alive = _grouped_selection(keep, g.kv_heads, g.per_kv)
    d = g.width
    span = lambda heads: (heads[:, None] * d + torch.arange(d)).flatten()  # noqa: E731
    factor = torch.where(alive, scale[queries], torch.zeros((), dtype=torch.float64))
    q, k, v = (modules[n] for n in g.inputs)
    with torch.no_grad():
        _keep_outputs(q, span(queries))
        for layer in (k, v):
            _keep_outputs(layer, span(groups))
        _keep_inputs(modules[g.output], span(queries), factor.repeat_interleave(d))
    net.get_submodule(g.attrs).num_key_value_groups = len(queries) // len(groups)


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
    now: ``{"layer_num_attention_heads": [...], "layer_intermediate_size": [...]}``, and for
    grouped-query attention the key/value heads, ``"layer_num_key_value_heads"``."""
    config = model.config
    widths = {attr: [None] * config.num_hidden_layers for attr in _CONFIG_LISTS.values()}
    groups = _recognise(model)[0]
    if any(g.kv_heads for g in groups):
        widths[KV_HEADS_LIST] = [None] * config.num_hidden_layers
    for g in groups:
        if g.layer is None or g.layer >= config.num_hidden_layers:
            raise BMRSError(f"{g.owner!r} is not in a numbered block of the model; its width cannot be recorded")
        widths[_CONFIG_LISTS[g.kind]][g.layer] = g.groups
        if g.kv_heads:
            widths[KV_HEADS_LIST][g.layer] = g.kv_heads
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
    kept = getattr(cfg, HIDDEN_CONFIG, None)
    if kept is not None:  # a pruned hidden width: the norms' epsilon follows (the weights come from the file)
        width = model.get_input_embeddings().embedding_dim
        if not (isinstance(kept, int) and 0 < kept <= width):
            raise BMRSError(f"{HIDDEN_CONFIG} {kept!r} is not a width between 1 and {width}")
        for m in model.modules():
            if _is_rms_norm(m, width):
                m.variance_epsilon = m.variance_epsilon * width / kept
        model.get_input_embeddings().embedding_dim = kept
    for g in _recognise(model)[0]:
        values = getattr(cfg, _CONFIG_LISTS[g.kind], None)
        target = values[g.layer] if values and g.layer is not None and values[g.layer] is not None else g.groups
        keep = torch.arange(g.groups) < target
        kv_values = getattr(cfg, KV_HEADS_LIST, None)
        if g.kv_heads and kv_values and g.layer is not None and kv_values[g.layer] is not None:
            kv = kv_values[g.layer]
            if not (isinstance(kv, int) and isinstance(target, int) and 0 < kv <= g.kv_heads
                    and target % kv == 0 and 0 < target // kv <= g.per_kv):
                raise BMRSError(f"{g.owner}: {target} query heads over {kv} key/value heads do not fit "
                                f"{g.kv_heads} key/value heads of {g.per_kv} query heads each")
            keep = ((torch.arange(g.kv_heads)[:, None] < kv) & (torch.arange(g.per_kv)[None, :] < target // kv)).flatten()
        _shrink(model, modules, g, keep, torch.ones(g.groups))
    return model.eval()


register_adapter(TransformersAdapter())
register_architecture(ARCHITECTURE, _build)
