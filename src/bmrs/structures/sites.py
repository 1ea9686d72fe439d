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

import copy
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .adapters import BRANCH_ATTR, INPUT_ATTR, BranchSite, InputGroups
from .attention import (
    HEAD_MODULES, compact_packed_attention, expose_heads, is_packed_attention,
    packed_attention_problem,
)
from ..errors import BMRSError
from .kinds import Blocks, Family, GateSite, Heads, PackedHeads, structure_kind

__all__ = ["PRODUCERS", "BATCH_NORMS", "find_sites", "couple", "trace", "call_model", "is_depthwise", "module_names"]

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


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one group per channel, ``out_channels == in_channels ==
    groups``, so output channel ``c`` reads input channel ``c`` alone. Its channels are tied
    one to one to those of the layer producing its input, and are removed with them (one
    family: Torch-Pruning's dependency graph ties them)."""
    return (isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_sites(
    model: nn.Module, example_input, exclude: Sequence = (), heads: bool = True, blocks: bool = False,
) -> tuple[list[GateSite], dict[str, str]]:
    """For every producer (and attention module), its gate site; and what cannot be gated, with why.

    With ``heads``, every ``nn.MultiheadAttention`` of ``model`` that is not excluded is
    first turned in place into a :class:`~bmrs.structures.attention.HeadedMultiheadAttention` (same
    parameters and outputs), and each attention module with a ``heads`` site gets a site
    of kind ``"heads"`` on it (``dim=1`` of its ``(N, H, T, D)`` per-head outputs). The
    linear layers inside attention modules are never gated as channels: their outputs are
    head dimensions, which are removed together with their head. A packed-qkv attention
    module (:func:`~bmrs.structures.attention.is_packed_attention`) gets a site of kind
    ``"packed-heads"`` at the input of its ``proj``, if a copy of it runs with one head fewer.

    With ``blocks``, every module whose output is its input plus the output of one of its
    layers (``x + f(x)``) gets a site of kind ``"blocks"`` on that layer's output.
    """
    skipped: dict[str, str] = {}
    if heads:
        _expose_attention_heads(model, exclude, skipped)
    packed = {
        name: m for name, m in model.named_modules() if is_packed_attention(m) and not _matches(m, name, exclude)
    } if heads else {}
    graph, seen_inputs, block_calls = _trace_with_hooks(model, example_input, packed, blocks, exclude)
    calls = graph.calls
    attention = {
        name: m for name, m in model.named_modules() if isinstance(m, (*HEAD_MODULES, nn.MultiheadAttention))
    }
    packed_sites = [site for name, m in packed.items()
                    if (site := _packed_site(name, m, calls, seen_inputs.get(name, []), skipped)) is not None]
    attention.update({site.producer: packed[site.producer] for site in packed_sites})
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

    sites = list(packed_sites)
    if blocks:
        sites += _block_sites(model, calls, block_calls, skipped)
    for call in calls:
        if call.name in head_hosts:
            _head_site(call, head_hosts[call.name], attention, counts, exclude, sites, skipped)
            continue
        name = call.name
        if name not in counts or name in skipped or any(s.producer == name for s in sites):
            continue
        found = _channel_site(call, graph, final=call.out_fn not in upstream_of_some_producer, count=counts[name],
                              exclude=exclude)
        if isinstance(found, str):
            skipped[name] = found
        else:
            sites.append(found)
    return sites, skipped


@dataclass
class _Graph:
    """A traced forward pass: the module calls, the autograd consumers of each output, and
    the calls reading each autograd node."""

    calls: list[Call]
    consumers: dict
    by_in_fn: dict


def _trace_with_hooks(model: nn.Module, example_input, packed: dict, blocks: bool, exclude: Sequence):
    """Trace ``model`` once, recording the inputs of the ``packed`` attention modules and, with
    ``blocks``, the calls inside every module that could be a residual block; returns the
    :class:`_Graph`, the packed modules' inputs and the blocks' calls."""
    seen_inputs: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(_recorder(seen_inputs, name), with_kwargs=True) for name, m in packed.items()]
    block_calls: dict[str, list] = {}
    if blocks:
        for name, m in model.named_modules():
            if name and next(m.children(), None) is not None and not _matches(m, name, exclude):
                handles += _block_hooks(m, name, block_calls)
    try:
        calls, consumers, _ = trace(model, example_input)
    finally:
        for h in handles:
            h.remove()
    by_in_fn: dict = {}
    for call in calls:
        for fn in call.in_fns:
            by_in_fn.setdefault(fn, []).append(call)
    return _Graph(calls, consumers, by_in_fn), seen_inputs, block_calls


def _channel_site(call: Call, graph: _Graph, *, final: bool, count: int, exclude: Sequence) -> GateSite | str:
    """The gate site of the producer ``call`` (a Linear or Conv), or why it gets none."""
    module, name = call.module, call.name
    if _matches(module, name, exclude):
        return "excluded"
    if final:
        return "final layer (its outputs are the network's outputs)"
    if count > 1:
        return _SHARED
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups != 1 and not is_depthwise(module):
        return "grouped convolution (other than depthwise)"
    channels = _channels(module)
    site, shape, passed, reason = _walk_to_gate(call, graph, channels)
    if reason is not None:
        return reason
    dim = -1 if isinstance(module, nn.Linear) and len(shape) > 2 else 1
    if len(shape) < 2 or shape[dim] != channels:
        return f"output of shape {shape} has no channel axis of size {channels}"
    applied = site
    while dim == 1 and len(shape) > 2:  # channels first, pooling over the axes after them
        pool = _sole_consumer(applied, graph.consumers, graph.by_in_fn, graph.calls)
        if pool is None or not isinstance(pool.module, _POOLS) or len(pool.out_shape) != len(shape) \
                or pool.out_shape[1] != channels:
            break
        applied = pool
    if is_depthwise(module) and not _folds_backward(passed):
        reader = _sole_consumer(applied, graph.consumers, graph.by_in_fn, graph.calls)
        read_alone = reader is not None and isinstance(reader.module, PRODUCERS) and (
            getattr(reader.module, "groups", 1) == 1 or is_depthwise(reader.module))
        if not read_alone:  # e.g. a squeeze-and-excitation multiplies it (EfficientNet, MobileNetV3)
            return (f"depthwise convolution whose gate, after {type(passed[-1]).__name__}, can be folded "
                    "neither into its BatchNorm nor into one next layer reading it alone")
    return GateSite(producer=name, site=site.name, dim=dim, num_structures=channels,
                    applied_at="" if applied is site else applied.name)


def _walk_to_gate(call: Call, graph: _Graph, channels: int) -> tuple[Call, tuple, list[nn.Module], str | None]:
    """From a producer's output, past the BatchNorm and channel-wise modules that consume it
    alone, to the call after which its gate belongs: (that call, its output shape, the modules
    passed, and the reason there is no gate, or None)."""
    site, fn, shape, reason = call, call.out_fn, call.out_shape, None
    passed: list[nn.Module] = []  # the modules between the producer and the gate
    while True:
        users = graph.consumers.get(fn, [])
        nxt = [c for c in graph.by_in_fn.get(fn, []) if c is not site]
        if len(users) != 1 or len(nxt) != 1:
            # A batch norm the walk cannot pass (called by a module's own forward, as timm's
            # BatchNormAct2d does): a gate before it would leave a masked channel its shift.
            if any("BatchNorm" in u.name() for u in users if hasattr(u, "name")) or any(
                    isinstance(c.module, BATCH_NORMS) for c in nxt):
                reason = "followed by a batch norm the gate cannot be placed after (inside a module's own forward)"
            break
        m = nxt[0].module
        if sum(c.module is m for c in graph.calls) > 1:
            break  # a module called twice (e.g. one ReLU reused after a residual addition) cannot host the gate
        if isinstance(m, BATCH_NORMS) and m.num_features == channels or isinstance(m, _CHANNELWISE):
            site, fn, shape = nxt[0], nxt[0].out_fn, nxt[0].out_shape
            passed.append(m)
            continue
        if isinstance(m, _CROSS_CHANNEL_NORMS):
            reason = f"followed by {type(m).__name__}, which normalises across the channels"
        elif isinstance(m, _NOT_ZERO_AT_ZERO):
            reason = f"followed by {type(m).__name__}, which is not 0 at 0"
        break
    return site, shape, passed, reason


_SHARED = "called more than once in a forward pass (shared weights)"


def _block_hooks(module: nn.Module, name: str, seen: dict) -> list:
    """Hooks recording, for each call of a (non-leaf) module, the grad_fn of its first input
    and of its output."""
    def pre(m, args):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        seen.setdefault(name, []).append([None if first is None else first.grad_fn, None])

    def post(m, args, output):
        if seen.get(name) and isinstance(output, Tensor):
            seen[name][-1][1] = output.grad_fn
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


# The last layer of a residual branch the branch's gate folds into: its output is affine per
# channel, so multiplying its weight and bias by the gate's factor multiplies the branch.
def _branch_end_ok(module: nn.Module) -> bool:
    if isinstance(module, PRODUCERS):
        return True
    if isinstance(module, BATCH_NORMS):
        return module.affine and type(module).forward is nn.BatchNorm2d.forward
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


def _block_sites(model: nn.Module, calls: list[Call], seen: dict, skipped: dict[str, str]) -> list[GateSite]:
    """Sites of the residual blocks: modules called once whose output is an addition of their
    input and of the output of one of their own layers (the branch's last layer), which then
    gets a :class:`~bmrs.structures.adapters.BranchSite` (installed in place). Outer blocks come first;
    a block inside a gated block is gated too."""
    found = []
    for name, records in seen.items():
        if len(records) != 1:
            continue
        in_fn, out_fn = records[0]
        if in_fn is None or out_fn is None or not type(out_fn).__name__.startswith("AddBackward"):
            continue
        parts = [f for f, _ in out_fn.next_functions]
        if len(parts) != 2 or in_fn not in parts:
            continue
        other = parts[1] if parts[0] is in_fn else parts[0]
        ends = [c for c in calls if c.out_fn is other and c.name.startswith(name + ".")]
        if len(ends) != 1:
            skipped[name] = "residual block whose branch does not end in one of its layers: not gated as a block"
            continue
        end = ends[0]
        if sum(c.module is end.module for c in calls) > 1:
            skipped[name] = f"residual block whose last layer {end.name} is called more than once: not gated as a block"
            continue
        if not _branch_end_ok(end.module):
            skipped[name] = (f"residual block whose branch ends in {end.name} ({type(end.module).__name__}), "
                             "which a factor cannot be folded into: not gated as a block")
            continue
        BranchSite.install(end.module)
        where = f"{end.name}.{BRANCH_ATTR}"
        found.append(GateSite(producer=name, site=where, dim=1, num_structures=1, kind=Blocks.name))
    return found


def _recorder(seen: dict, name: str):
    """A forward pre-hook recording the inputs of each call of module ``name`` (detached)."""
    def hook(module, args, kwargs):
        detach = lambda x: x.detach() if isinstance(x, Tensor) else x  # noqa: E731
        seen.setdefault(name, []).append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))
    return hook


def _packed_site(name: str, module: nn.Module, calls: list[Call], inputs: list, skipped: dict[str, str]) -> GateSite | None:
    """The head site of a packed-qkv attention module (a site module on the input of its
    ``proj``, installed in place), or None with the reason in ``skipped``.

    Before installing it, the module's forward is run once on a copy with one head fewer
    (on the input it had in the trace): a forward that takes the merged width from anything
    but ``num_heads`` and ``head_dim`` (an older timm reshapes to the input width) would
    break after compaction, so such a module is left ungated."""
    problem = packed_attention_problem(module)
    counts = [sum(c.module is m for c in calls) for m in (module.qkv, module.proj)]
    if problem is None and (len(inputs) != 1 or counts != [1, 1]):
        problem = _SHARED if len(inputs) > 1 or max(counts) > 1 else "qkv and proj are not called once each"
    if problem is None:
        probe = copy.deepcopy(module).eval()
        keep = torch.arange(module.num_heads) < module.num_heads - 1
        compact_packed_attention(probe, keep, keep.double())
        args, kwargs = inputs[0]
        try:
            with torch.no_grad():
                probe(*args, **kwargs)
        except Exception as error:  # any failure of the user's forward means: not prunable this way
            problem = (f"its forward does not run with fewer heads ({type(error).__name__}: "
                       f"{' '.join(str(error).split())[:120]}); it must split and merge heads by num_heads and head_dim")
    if problem is not None:
        skipped[name] = f"heads not gated: {problem}"
        return None
    InputGroups.install(module.proj, module.num_heads, module.head_dim)
    where = f"{name}.proj.{INPUT_ATTR}" if name else f"proj.{INPUT_ATTR}"
    return GateSite(producer=name, site=where, dim=-2, num_structures=module.num_heads,
                    kind=PackedHeads.name)


# What compaction's backward fold passes between the affine layer and the gate (it commutes
# with a positive per-channel factor).
_BACKWARD_COMMUTING = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


def _folds_backward(passed: list[nn.Module]) -> bool:
    """Whether a gate after ``passed`` (the modules after its producer) folds into the producer
    or its last affine BatchNorm: only modules that commute with a positive scale follow it."""
    last = max((i for i, m in enumerate(passed) if isinstance(m, BATCH_NORMS)), default=-1)
    if last >= 0 and not (passed[last].affine and type(passed[last]).forward is nn.BatchNorm2d.forward):
        return False
    return all(isinstance(m, _BACKWARD_COMMUTING) for m in passed[last + 1:])


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
            if isinstance(target, nn.Conv1d | nn.Conv2d | nn.Conv3d) and target.groups > 1 and not is_depthwise(target):
                # removing some of its input channels would leave its groups unequal
                problem = f"its channels are read by the grouped convolution {name_of.get(target)}, which cannot be gated"
                break
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
        if problem is None and all(is_depthwise(modules[n]) for n in members):
            # nothing but depthwise convolutions: their channels are channels of the network's input
            problem = "a depthwise convolution whose input channels no gated layer produces"
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
    if isinstance(module, PRODUCERS):  # convolutions with groups == 1, or depthwise
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        if is_out:  # a filter reads in_channels / groups channels (one for a depthwise convolution)
            return module.in_channels // module.groups * kernel + (module.bias is not None)
        return module.out_channels // module.groups * kernel
    if isinstance(module, BATCH_NORMS):
        return 2 if module.affine else 0
    return 0
