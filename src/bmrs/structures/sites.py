"""Where the prunable structures of a network are, and which must go together.

Two analyses of a plain (ungated) network, both from one forward pass of an example input:

* a trace of module calls and of the autograd graph, to find for each ``Linear``/``Conv``
  (a *producer*) the module after which its gate belongs (its BatchNorm and activation,
  when they consume its output alone), and which producers are final (nothing learnable
  downstream: the classifier);
* Torch-Pruning's dependency graph, to find channels coupled across layers (residual
  additions): such channels form a *family* and can only be removed together.

Attention heads (:mod:`bmrs.structures.attention`) are structures too: each attention module gets
one gate over its heads, coupled to nothing.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .adapters import INPUT_ATTR, find_adapter
from .attention import HEAD_MODULES, expose_heads, head_input_weights, params_per_head
from ..errors import BMRSError

__all__ = [
    "GateSite", "Family", "GateLayout", "StructureKind", "Channels", "Heads", "AdapterKind", "STRUCTURE_KINDS",
    "register_structure_kind", "structure_kind",
]

#: The layers whose outputs are gated structures (output neurons and channels).
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Per-channel normalisation that a gate may follow and compaction folds.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
# Activations whose value at 0 is not 0 would leave a constant behind a pruned structure.
_NOT_ZERO_AT_ZERO = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid)
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)
# Pooling per channel commutes with multiplying each channel by a positive number.
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)


@dataclass
class GateSite:
    """One gate: the structures it gates and where it sits.

    Attributes:
        producer: name of the module whose output channels (or heads) are the structures.
        site: name of the module that holds the gate, the last BatchNorm, activation or
            dropout module that consumes the producer's output alone (the gate's key).
        dim: the gated axis of that output.
        num_structures: number of structures.
        kind: the name of its :class:`StructureKind`: ``"channels"`` or ``"heads"``, or a
            kind of a model adapter (:mod:`bmrs.structures.adapters`), such as ``"attention-heads"``
            and ``"ffn-neurons"`` of Hugging Face transformers (:func:`structure_kind`
            resolves it).
    """

    producer: str
    site: str
    dim: int
    num_structures: int
    kind: str = "channels"
    #: Where pooling follows ``site`` alone (max or average, per channel), the last such
    #: pooling module: the gate multiplies its smaller output instead, which gives the same
    #: network, since theta is positive and constant over the pooled axes. Empty otherwise.
    applied_at: str = ""

    @property
    def hook_module(self) -> str:
        """Name of the module whose output the gate multiplies."""
        return self.applied_at or self.site


@dataclass
class Family:
    """Structures that can only be removed together (channels tied by residual additions).

    ``members[k] = (gate name, indices)``: slot ``j`` of the family is structure
    ``indices[j]`` of every member gate. An uncoupled gate is a family of one member.
    ``slot_params[j]`` is the number of trainable parameters that removing slot ``j``
    alone deletes: incoming and outgoing weights, biases, norm parameters and the gates' own
    two parameters per structure. Removing several slots of consecutive layers deletes
    less than the sum (the weight between two removed units is counted once):
    ``effects`` lists, per affected module, the side (``"out"``: rows/filters/norm
    entries, ``"in"``: input columns) and the indices each slot removes there, from which
    :func:`bmrs.pruning.parameter_compression` counts exactly. A family without ``effects``
    (attention heads) has disjoint per-slot parameters and is counted by ``slot_params``.
    """

    members: list[tuple[str, list[int]]]
    slot_params: list[int] = field(default_factory=list)
    effects: list[tuple[str, str, list[list[int]]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.members[0][1])


@dataclass
class GateLayout:
    """What :func:`bmrs.attach_gates` did: the gates, their families, what it skipped and why."""

    sites: dict[str, GateSite] = field(default_factory=dict)
    families: list[Family] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """A readable table of gates and skipped layers."""
        lines = [f"{len(self.sites)} gates, {sum(s.num_structures for s in self.sites.values())} structures"]
        for s in self.sites.values():
            where = "" if s.site == s.producer else f" (after {s.site})"
            if s.applied_at:
                where = f" (after {s.site}, applied after {s.applied_at})"
            if s.site.endswith(f".{INPUT_ATTR}"):
                where = f" (at the input of {s.site.removesuffix(f'.{INPUT_ATTR}')})"
            lines.append(f"  gate {s.site}: {s.num_structures} {s.kind} of {s.producer}{where}")
        coupled = [f for f in self.families if len(f.members) > 1]
        for f in coupled:
            lines.append(f"  coupled, pruned together: {', '.join(n for n, _ in f.members)}")
        for name, why in self.skipped.items():
            lines.append(f"  not gated: {name}: {why}")
        return "\n".join(lines)


class StructureKind:
    """A kind of prunable structure: what one of a gate's ``num_structures`` is, and how
    structures of the kind are coupled and weighed.

    One instance per kind, registered by its ``name`` (:func:`register_structure_kind`);
    :attr:`GateSite.kind` holds the name, so layouts stay plain data. How the kind's
    structures leave the network is registered with compaction
    (:func:`bmrs.compaction.remove_structures`), beside the rest of compaction.
    """

    #: the kind's name, as in :attr:`GateSite.kind`
    name: str = ""
    #: kinds are removed in this order: kinds whose structures leave one module first,
    #: channels (whose removal traces the whole network) last
    removal_order: int = 0

    def family(self, site: GateSite, modules: dict[str, nn.Module]) -> Family | None:
        """The family of ``site`` when its structures are coupled to nothing else, or None
        when the dependency analysis of the network decides (channels)."""
        return None

    def input_weights(self, model: nn.Module, site: GateSite) -> Tensor:
        """Each structure's incoming weights, one row (or more axes) per structure."""
        raise NotImplementedError(f"structure kind {self.name!r} has no input weights")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Channels(StructureKind):
    """Output channels of a linear or convolutional producer (neurons, filters), coupled
    with other channels through residual additions and concatenations."""

    name = "channels"
    removal_order = 2

    def input_weights(self, model, site):
        return model.get_submodule(site.producer).weight


class Heads(StructureKind):
    """Attention heads of an attention module; each head is a family of its own, whose slot
    removes the head's q, k, v rows, its output-projection columns and its gate's two
    parameters."""

    name = "heads"

    def family(self, site, modules):
        per_head = params_per_head(modules[site.producer]) + 2  # + the gate's loc and log_scale
        return Family(members=[(site.site, list(range(site.num_structures)))], slot_params=[per_head] * site.num_structures)

    def input_weights(self, model, site):
        return head_input_weights(model.get_submodule(site.producer))


class AdapterKind(StructureKind):
    """A kind of a model adapter (:mod:`bmrs.structures.adapters`, e.g. ``"attention-heads"`` of Hugging
    Face transformers): the adapter lays out, weighs and removes its structures."""

    removal_order = 1

    def __init__(self, name: str, adapter):
        self.name, self.adapter = name, adapter

    def input_weights(self, model, site):
        return self.adapter.input_weights(model, site)

    def __eq__(self, other) -> bool:
        return isinstance(other, AdapterKind) and (other.name, other.adapter) == (self.name, self.adapter)

    def __hash__(self) -> int:
        return hash((self.name, id(self.adapter)))

    def __repr__(self) -> str:
        return f"AdapterKind({self.name!r}, {type(self.adapter).__name__})"


#: The structure kinds of the generic analysis, by name.
STRUCTURE_KINDS: dict[str, StructureKind] = {}


def register_structure_kind(kind: StructureKind) -> StructureKind:
    """Register ``kind`` under its name (a new kind, or a replacement)."""
    if not isinstance(kind, StructureKind) or not kind.name:
        raise TypeError(f"register_structure_kind takes a named StructureKind, got {kind!r}")
    STRUCTURE_KINDS[kind.name] = kind
    return kind


register_structure_kind(Channels())
register_structure_kind(Heads())


def structure_kind(site: GateSite, model: nn.Module | None = None) -> StructureKind:
    """The :class:`StructureKind` of ``site``: a registered kind, else the kind of the
    adapter that handles ``model``."""
    if site.kind in STRUCTURE_KINDS:
        return STRUCTURE_KINDS[site.kind]
    adapter = find_adapter(model) if model is not None else None
    if adapter is None:
        raise BMRSError(f"gate {site.site!r} has kind {site.kind!r}, which is not registered and no adapter handles this model")
    return AdapterKind(site.kind, adapter)


# --- tracing ----------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of a leaf module in a traced forward pass."""

    module: nn.Module
    name: str
    order: int  # position in execution order
    in_fns: list  # grad_fns of its tensor inputs, as they were when it was called
    out_fn: object = None
    out_shape: tuple = ()


def with_grad_enabled(fn):
    """Run ``fn(model, example_input, ...)`` with autograd on and inference mode off, as tracing
    needs (it follows ``grad_fn``s, and so does Torch-Pruning's dependency graph), so that it
    works when called inside ``torch.no_grad()`` or ``torch.inference_mode()``. Inference-mode
    tensors of ``example_input`` (a tensor, tuple or dict) are cloned into normal ones; the
    caller's modes are restored."""

    def normal(x):
        return x.clone() if isinstance(x, Tensor) and x.is_inference() else x

    @functools.wraps(fn)
    def wrapper(model, example_input, *args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            if isinstance(example_input, dict):
                example_input = {k: normal(x) for k, x in example_input.items()}
            elif isinstance(example_input, Tensor):
                example_input = normal(example_input)
            else:
                example_input = tuple(normal(x) for x in example_input)
            return fn(model, example_input, *args, **kwargs)

    return wrapper


def _as_inputs(example_input) -> tuple | dict:
    """The example input as positional inputs (a tuple) or keyword inputs (a dict), with
    every floating-point tensor given a grad_fn of its own (so every op downstream has one)."""
    def traced(x):
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.detach().requires_grad_(True).clone()
        return x

    if isinstance(example_input, dict):
        return {k: traced(x) for k, x in example_input.items()}
    if isinstance(example_input, Tensor):
        example_input = (example_input,)
    return tuple(traced(x) for x in example_input)


def call_model(model: nn.Module, example_input):
    """``model`` called on an example input: a tensor, a tuple of positional inputs, or a
    dict of keyword inputs (such as ``input_ids`` and ``attention_mask``)."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, Tensor):
        return model(example_input)
    return model(*example_input)


def _shapes(example_input) -> str:
    """What an example input is, in words: ``float32 (2, 5)``, one per tensor."""
    def one(x):
        return f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__

    if isinstance(example_input, dict):
        return "{" + ", ".join(f"{k}: {one(x)}" for k, x in example_input.items()) + "}"
    if isinstance(example_input, (tuple, list)) and len(example_input) == 1:
        return one(example_input[0])
    if isinstance(example_input, (tuple, list)):
        return "(" + ", ".join(one(x) for x in example_input) + ")"
    return one(example_input)


def call_example(model: nn.Module, example_input):
    """:func:`call_model` on the example input a user gave: an input the model cannot take
    (a wrong shape, dtype or number of inputs) is a ``BMRSError`` naming the model's class
    and the input's shapes, not the error from deep inside the model."""
    try:
        return call_model(model, example_input)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        if isinstance(err, BMRSError):
            raise
        detail = " ".join(str(err).split())[:200]
        raise BMRSError(f"the example input {_shapes(example_input)} does not fit {type(model).__name__}: "
                        f"{type(err).__name__}: {detail}") from None


def trace(model: nn.Module, example_input, leaf_types: tuple = ()) -> tuple[list[Call], dict, list]:
    """One forward pass in eval mode (the mode is restored): the leaf modules' calls in
    execution order, the consumers of every grad_fn, and the outputs' grad_fns."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[Call] = []
    open_calls: dict[int, list[Call]] = {}
    handles = []

    def pre(module, args):
        call = Call(module, names[module], len(calls), [a.grad_fn for a in args if isinstance(a, Tensor)])
        open_calls.setdefault(id(module), []).append(call)
        calls.append(call)

    def post(module, args, output):
        call = open_calls[id(module)].pop()
        if isinstance(output, tuple):
            output = output[0]
        if isinstance(output, Tensor):
            call.out_fn, call.out_shape = output.grad_fn, tuple(output.shape)

    for module in model.modules():
        if next(module.children(), None) is None or isinstance(module, leaf_types):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = call_example(model, _as_inputs(example_input))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    outputs = [o.grad_fn for o in output_tensors(out) if isinstance(o, Tensor) and o.grad_fn is not None]
    consumers: dict = {}
    stack, seen = list(outputs), set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                consumers.setdefault(nxt, []).append(fn)
                stack.append(nxt)
    return calls, consumers, outputs


def output_tensors(out) -> list[Tensor]:
    """The tensors of a model's output (a tensor, or nested lists, tuples and dicts of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _upstream(fns: Iterable) -> set:
    seen, stack = set(), [f for f in fns if f is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        stack += [n for n, _ in fn.next_functions if n is not None]
    return seen


def _matches(module: nn.Module, name: str, exclude: Sequence) -> bool:
    for e in exclude:
        if isinstance(e, str) and (name == e or name.startswith(e + ".")):
            return True
        if isinstance(e, nn.Module) and module is e:
            return True
        if isinstance(e, type) and isinstance(module, e):
            return True
    return False


def _channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_sites(
    model: nn.Module, example_input, exclude: Sequence = (), heads: bool = True,
) -> tuple[list[GateSite], dict[str, str]]:
    """For every producer (and attention module), its gate site; and what cannot be gated, with why.

    With ``heads``, every ``nn.MultiheadAttention`` of ``model`` that is not excluded is
    first turned in place into a :class:`~bmrs.structures.attention.HeadedMultiheadAttention` (same
    parameters and outputs), and each attention module with a ``heads`` site gets a site
    of kind ``"heads"`` on it (``dim=1`` of its ``(N, H, T, D)`` per-head outputs). The
    linear layers inside attention modules are never gated as channels: their outputs are
    head dimensions, which are removed together with their head.
    """
    skipped: dict[str, str] = {}
    if heads:
        _expose_attention_heads(model, exclude, skipped)
    calls, consumers, outputs = trace(model, example_input)
    by_in_fn: dict = {}
    for call in calls:
        for fn in call.in_fns:
            by_in_fn.setdefault(fn, []).append(call)
    attention = {
        name: m for name, m in model.named_modules() if isinstance(m, (*HEAD_MODULES, nn.MultiheadAttention))
    }
    head_hosts = {
        f"{name}.heads" if name else "heads": name
        for name, m in attention.items() if heads and isinstance(m, HEAD_MODULES)
    }
    all_producer_calls = [c for c in calls if isinstance(c.module, PRODUCERS)]
    # the linear layers inside attention modules are not channel structures
    producer_calls = [
        c for c in all_producer_calls if not any(a == "" or c.name.startswith(a + ".") for a in attention)
    ]
    counts: dict[str, int] = {}
    for c in producer_calls + [c for c in calls if c.name in head_hosts]:
        counts[c.name] = counts.get(c.name, 0) + 1
    # a producer is final when no other producer lies downstream of it
    upstream_of_some_producer = set()
    for c in all_producer_calls:
        upstream_of_some_producer |= _upstream(c.in_fns)

    sites = []
    for call in calls:
        if call.name in head_hosts:
            _head_site(call, head_hosts[call.name], attention, counts, exclude, sites, skipped)
            continue
        module, name = call.module, call.name
        if name not in counts or name in skipped or any(s.producer == name for s in sites):
            continue
        if _matches(module, name, exclude):
            skipped[name] = "excluded"
            continue
        if call.out_fn not in upstream_of_some_producer:
            skipped[name] = "final layer (its outputs are the network's outputs)"
            continue
        if counts[name] > 1:
            skipped[name] = _SHARED
            continue
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups != 1:
            skipped[name] = "grouped or depthwise convolution"
            continue
        channels = _channels(module)
        site, fn, shape, reason = call, call.out_fn, call.out_shape, None
        while True:
            users = consumers.get(fn, [])
            nxt = [c for c in by_in_fn.get(fn, []) if c is not site]
            if len(users) != 1 or len(nxt) != 1:
                # A batch norm the walk cannot pass (called by a module's own forward, as timm's
                # BatchNormAct2d does): a gate before it would leave a masked channel its shift.
                if any("BatchNorm" in u.name() for u in users if hasattr(u, "name")) or any(
                        isinstance(c.module, BATCH_NORMS) for c in nxt):
                    reason = "followed by a batch norm the gate cannot be placed after (inside a module's own forward)"
                break
            m = nxt[0].module
            if sum(c.module is m for c in calls) > 1:
                break  # a module called twice (e.g. one ReLU reused after a residual addition) cannot host the gate
            if isinstance(m, BATCH_NORMS) and m.num_features == channels or isinstance(m, _CHANNELWISE):
                site, fn, shape = nxt[0], nxt[0].out_fn, nxt[0].out_shape
                continue
            if isinstance(m, _CROSS_CHANNEL_NORMS):
                reason = f"followed by {type(m).__name__}, which normalises across the channels"
            elif isinstance(m, _NOT_ZERO_AT_ZERO):
                reason = f"followed by {type(m).__name__}, which is not 0 at 0"
            break
        if reason is not None:
            skipped[name] = reason
            continue
        dim = 1
        if isinstance(module, nn.Linear) and len(shape) > 2:
            dim = -1
        if len(shape) < 2 or shape[dim] != channels:
            skipped[name] = f"output of shape {shape} has no channel axis of size {channels}"
            continue
        applied = site
        while dim == 1 and len(shape) > 2:  # channels first, pooling over the axes after them
            pool = _sole_consumer(applied, consumers, by_in_fn, calls)
            if pool is None or not isinstance(pool.module, _POOLS) or len(pool.out_shape) != len(shape) \
                    or pool.out_shape[1] != channels:
                break
            applied = pool
        sites.append(GateSite(producer=name, site=site.name, dim=dim, num_structures=channels,
                              applied_at="" if applied is site else applied.name))
    return sites, skipped


_SHARED = "called more than once in a forward pass (shared weights)"


def _sole_consumer(call: Call, consumers: dict, by_in_fn: dict, calls: list[Call]) -> Call | None:
    """The module call that alone consumes ``call``'s output, if that module is called once."""
    users = consumers.get(call.out_fn, [])
    nxt = [c for c in by_in_fn.get(call.out_fn, []) if c is not call]
    if len(users) != 1 or len(nxt) != 1 or sum(c.module is nxt[0].module for c in calls) > 1:
        return None
    return nxt[0]


def _expose_attention_heads(model: nn.Module, exclude: Sequence, skipped: dict[str, str]) -> None:
    """Give every plain ``nn.MultiheadAttention`` a ``heads`` site (in place), or say why not."""
    converted = False
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or isinstance(module, HEAD_MODULES):
            continue
        if _matches(module, name, exclude):
            skipped[name] = "excluded"
            continue
        try:
            expose_heads(module)
        except (TypeError, ValueError) as error:
            skipped[name] = f"heads not gated: {error}"
            continue
        converted = True
    if converted:
        # nested-tensor inputs would route the layers around the gated attention
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False


def _head_site(
    call: Call, name: str, attention: dict, counts: dict, exclude: Sequence,
    sites: list[GateSite], skipped: dict[str, str],
) -> None:
    """Add the head site of attention module ``name`` (its ``heads`` was called in ``call``)."""
    module = attention[name]
    if name in skipped or any(s.producer == name for s in sites):
        return
    if _matches(module, name, exclude) or _matches(call.module, call.name, exclude):
        skipped[name] = "excluded"
    elif counts[call.name] > 1:
        skipped[name] = _SHARED
    elif len(call.out_shape) != 4 or call.out_shape[1] != module.num_heads:
        skipped[name] = f"per-head output of shape {call.out_shape} is not (N, {module.num_heads}, T, D)"
    else:
        sites.append(GateSite(
            producer=name, site=call.name, dim=1, num_structures=module.num_heads, kind=Heads.name,
        ))


# --- coupling ---------------------------------------------------------------------------------


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Each module of ``model`` with its name (``named_modules`` turned around), to name the
    modules Torch-Pruning's dependency graph hands back; an operation Torch-Pruning adds to
    the graph (an addition, a reshape) has no name."""
    return {module: name for name, module in model.named_modules()}


# Torch-Pruning's graph operations that carry channels through unchanged. Torch-Pruning
# exposes their kinds publicly (ops.module2type / ops.OPTYPE), not their classes (private).
_PASS_THROUGH = frozenset({
    tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE,
})


def _passes_channels_through(target) -> bool:
    """Whether a graph node that is no module of the model is one of Torch-Pruning's
    operations that carry channels through (element-wise, reshape, concatenation, split,
    expand, slice). ``module2type`` calls anything it does not know element-wise, so the
    node must also be one Torch-Pruning made (defined in ``torch_pruning.ops``)."""
    return type(target).__module__ == tp.ops.__name__ and tp.ops.module2type(target) in _PASS_THROUGH


def build_dependency_graph(model: nn.Module, example_input) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of a plain model (training mode is restored)."""
    training = model.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=_as_inputs(example_input), verbose=False)
    finally:
        model.train(training)
    return graph


def couple(model: nn.Module, example_input, sites: list[GateSite]) -> tuple[list[GateSite], list[Family], dict[str, str]]:
    """Group the sites' channels into families; drop sites coupled to anything ungatable.

    Head sites are coupled to nothing: each is a family of one member, whose slot removes
    the head's q, k, v rows, its output-projection columns and its gate's two parameters.
    Only channel sites go through Torch-Pruning's dependency analysis.
    """
    graph = build_dependency_graph(model, example_input)
    modules = dict(model.named_modules())
    name_of = module_names(model)
    by_producer = {s.producer: s for s in sites}
    kept, families, skipped, done = [], [], {}, set()
    for site in sites:
        if site.producer in done:
            continue
        own = structure_kind(site).family(site, modules)
        if own is not None:  # coupled to nothing else
            kept.append(site)
            families.append(own)
            continue
        producer = modules[site.producer]
        pruner = graph.get_pruner_of_module(producer)
        group = graph.get_pruning_group(producer, pruner.prune_out_channels, list(range(site.num_structures)))
        members, problem, effects = {}, None, []
        slot_params = [0] * site.num_structures
        for item in group:
            target = item.dep.target.module
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            cost = _params_per_index(target, is_out)
            for j in item.root_idxs:
                slot_params[j] += cost
            if cost:
                per_slot: list[list[int]] = [[] for _ in range(site.num_structures)]
                for j, i in zip(item.root_idxs, item.idxs):
                    per_slot[j].append(int(i))
                effects.append((name_of[target], "out" if is_out else "in", per_slot))
            if not is_out:
                continue
            tname = name_of.get(target)
            if isinstance(target, PRODUCERS):
                if tname not in by_producer:
                    problem = f"its channels are tied to those of {tname}, which is not gated"
                    break
                slot_to_idx = dict(zip(item.root_idxs, item.idxs))
                members[tname] = [slot_to_idx[j] for j in range(site.num_structures)]
            elif isinstance(target, BATCH_NORMS) or (tname is None and _passes_channels_through(target)):
                continue
            elif isinstance(target, nn.Parameter):  # a parameter used outside any module
                label = next((f"the parameter {n}" for n, q in model.named_parameters() if q is target), "a parameter")
                problem = f"its channels are tied to {label}, which cannot be gated"
                break
            else:
                label = tname or type(target).__name__.strip("_")
                problem = f"its channels are tied to {label}, which cannot be gated"
                break
        names = sorted(members) if problem is None else [site.producer]
        done.update(names)
        if problem is not None:
            skipped[site.producer] = problem
            continue
        family_sites = [by_producer[n] for n in names]
        kept += family_sites
        gate_params = 2 * len(names)  # loc and log_scale of every member's gate
        families.append(Family(
            members=[(by_producer[n].site, members[n]) for n in names],
            slot_params=[p + gate_params for p in slot_params],
            effects=effects,
        ))
    return kept, families, skipped


def _params_per_index(module, is_out: bool) -> int:
    """Trainable parameters one pruned index removes from ``module`` (in or out side)."""
    if isinstance(module, nn.Linear):
        return module.in_features + (module.bias is not None) if is_out else module.out_features
    if isinstance(module, PRODUCERS):  # convolutions with groups == 1
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        if is_out:
            return module.in_channels * kernel + (module.bias is not None)
        return module.out_channels * kernel
    if isinstance(module, BATCH_NORMS):
        return 2 if module.affine else 0
    return 0
