"""Folding the gates into the weights and deleting pruned structures: :func:`compact`."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..structures.adapters import BRANCH_ATTR
from ..structures.attention import compact_attention, compact_packed_attention
from ..distributed import unwrap
from ..errors import BMRSError
from ..gates import check_finite_gates, detach_gates, gate_layout, gates
from ..structures.sites import (
    BATCH_NORMS, PRODUCERS, Call, build_dependency_graph, call_example, call_model, is_depthwise, module_names,
    output_tensors, trace, with_grad_enabled,
)
from ..structures.kinds import (
    AdapterKind, Blocks, Channels, Family, GateLayout, GateSite, Heads, PackedHeads, StructureKind, structure_kind,
)

__all__ = ["compact", "remove_structures"]

# Modules f with f(s * x) = s * f(x) for every per-channel s >= 0, acting on each channel
# alone (dropout is the identity in eval mode): a gate's scale may move through them.
_COMMUTING = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.ZeroPad3d,
)
# Reshaping modules: on the way from a gate to its consumers (Torch-Pruning maps the indices).
_RESHAPING = (nn.Flatten, nn.Unflatten)
# The same for functional operations, by the name of their autograd node (digits stripped).
_COMMUTING_FNS = {
    "ReluBackward", "LeakyReluBackward", "ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward",
    "CloneBackward", "PermuteBackward", "TransposeBackward", "SqueezeBackward", "UnsqueezeBackward",
    "MaxPool1DWithIndicesBackward", "MaxPool2DWithIndicesBackward", "MaxPool3DWithIndicesBackward",
    "AvgPool2DBackward", "AvgPool3DBackward", "AdaptiveAvgPool2DBackward", "AdaptiveAvgPool3DBackward",
    "AdaptiveMaxPool2DBackward", "AdaptiveMaxPool3DBackward",
}


@with_grad_enabled
def compact(model: nn.Module, example_input, *, check: bool = True) -> nn.Module:
    """A plain, physically smaller copy of a gated model, with the same eval-mode outputs.

    Every gate's eval-mode factor ``E[theta] * mask`` is folded into neighbouring weights,
    then the pruned structures are deleted with Torch-Pruning (rows and columns of
    ``Linear``, filters and input channels of ``Conv``, BatchNorm entries, and whatever else
    Torch-Pruning's dependency graph ties to them). ``model`` itself is not modified.

    Folding, per gate with scale ``s`` (0 where masked):

    * backward, into the last per-channel affine module before the gate (an affine
      BatchNorm's weight and bias, or the producing Linear/Conv's rows and bias), when every
      module between it and the gate commutes with ``s >= 0`` (ReLU, LeakyReLU, Identity,
      Dropout, pooling);
    * otherwise forward, into the input columns of every consumer (Tanh, GELU, SiLU, ...
      before the gate), when the path to each consumer commutes with ``s``. Only masked
      channels have ``s = 0``, and they are deleted.

    Channels coupled by residual additions (a :class:`~bmrs.structures.kinds.Family`) must fold
    backward, and a family slot is deleted only when every member masks it.

    When every structure of a layer (or every slot of a family) is masked, one structure is
    kept, because a layer of width zero cannot run: its gate is 0, and its outgoing
    weights (the consumers' input columns) are set to zero, so the outputs are unchanged.

    Args:
        model: a model with gates from :func:`bmrs.attach_gates` (possibly wrapped in
            ``DistributedDataParallel``: the network inside is compacted, on its device).
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs,
            to trace the model.
        check: compare the result's outputs with the gated model's (eval mode) on
            ``example_input`` and raise ``RuntimeError`` if they differ by more than
            ``sqrt(eps)`` of the dtype, relative to the largest output.

    Returns:
        A new ``nn.Module`` in eval mode with no gates and no hooks added by bmrs.

    Attention heads are removed whole: each attention module with a head gate is replaced
    by :func:`bmrs.structures.attention.compact_attention`, which keeps the unmasked heads and folds
    their scale into the output projection (one silent head if all are masked). Gates of
    other kinds belong to a model adapter (:mod:`bmrs.structures.adapters`; e.g. heads and
    feed-forward neurons of Hugging Face transformers), which removes them itself.

    Raises:
        ValueError: when a gate cannot be folded exactly (see the rules above).
    """
    model = unwrap(model)
    layout = gate_layout(model)
    by_kind: dict[StructureKind, dict[str, GateSite]] = {}
    for name, site in layout.sites.items():
        by_kind.setdefault(structure_kind(site, model), {})[name] = site
    check_finite_gates(model)
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = call_example(net, example_input) if check else None
    scales = {name: gate.expected_gate().detach().clone() for name, gate in gates(net).items()}
    masks = {name: gate.mask.detach().clone() for name, gate in gates(net).items()}
    detach_gates(net)
    for kind in sorted(by_kind, key=lambda k: k.removal_order):
        # structures inside a deleted block (a masked "blocks" gate) left with it
        present = dict(net.named_modules())
        live = {n: s for n, s in by_kind[kind].items() if s.producer in present}
        if live:
            remove_structures(kind, net, live, masks, scales, example_input, _surviving(layout, present))
    if check:
        with torch.no_grad():
            _check_outputs(reference, call_model(net, example_input))
    return net


# --- removing the structures of each kind ---------------------------------------------------


@functools.singledispatch
def remove_structures(kind: StructureKind, net: nn.Module, sites: dict[str, GateSite], masks: dict[str, Tensor],
                      scales: dict[str, Tensor], example_input, layout) -> None:
    """On ``net`` (a copy whose gates were detached), fold the gates' eval factors ``scales``
    of ``sites`` (all of ``kind``) into the weights and delete the structures their ``masks``
    prune. One implementation per :class:`~bmrs.structures.kinds.StructureKind` class, registered
    with ``@remove_structures.register`` (as :func:`functools.singledispatch` does): a new
    kind of structure is removable once its implementation is registered here.
    """
    raise NotImplementedError(f"no removal is registered for the structure kind {kind!r}")


@remove_structures.register
def _remove_heads(kind: Heads, net, sites, masks, scales, example_input, layout) -> None:
    with torch.no_grad():  # whole heads leave their attention modules
        for name, site in sites.items():
            _replace(net, site.producer, compact_attention(net.get_submodule(site.producer), masks[name] > 0, scales[name]))


@remove_structures.register
def _remove_blocks(kind: Blocks, net, sites, masks, scales, example_input, layout) -> None:
    with torch.no_grad():
        for name, site in sorted(sites.items(), key=lambda item: item[1].producer.count(".")):  # outer blocks first
            if site.producer not in dict(net.named_modules()):
                continue  # inside a block deleted already
            if not bool(masks[name][0] > 0):  # y = x + 0 * f(x): the block is the identity
                _replace(net, site.producer, nn.Identity())
            else:  # the branch's factor goes into its last layer's weight and bias
                _scale_rows(net.get_submodule(site.site.removesuffix(f".{BRANCH_ATTR}")), scales[name])


def _surviving(layout: GateLayout, present: dict) -> GateLayout:
    """``layout`` without the gates whose producer is no longer in the network."""
    live = {n for n, s in layout.sites.items() if s.producer in present}
    families = []
    for f in layout.families:
        members = [(n, idx) for n, idx in f.members if n in live]
        if members:
            families.append(Family(members=members, slot_params=f.slot_params, effects=f.effects))
    return GateLayout(sites={n: s for n, s in layout.sites.items() if n in live}, families=families, skipped=layout.skipped)


@remove_structures.register
def _remove_packed_heads(kind: PackedHeads, net, sites, masks, scales, example_input, layout) -> None:
    with torch.no_grad():  # in place: the module keeps its class, with fewer heads
        for name, site in sites.items():
            compact_packed_attention(net.get_submodule(site.producer), masks[name] > 0, scales[name])


@remove_structures.register
def _remove_adapted(kind: AdapterKind, net, sites, masks, scales, example_input, layout) -> None:
    with torch.no_grad():
        kind.adapter.compact(net, sites, masks, scales)


@remove_structures.register
def _remove_channels(kind: Channels, net, sites, masks, scales, example_input, layout) -> None:
    _compact_channels(net, example_input, layout, sites, masks, scales)


def _compact_channels(net: nn.Module, inputs, layout, channel_sites: dict, masks: dict, scales: dict) -> None:
    """Fold the channel gates' scales into the weights and delete the masked channels (in place)."""
    trace = _Trace(net, inputs)
    graph = build_dependency_graph(net, inputs)
    modules = dict(net.named_modules())
    names = module_names(net)
    families = [f for f in layout.families if f.members[0][0] in channel_sites]
    partners = {
        name: [other for other, _ in family.members if other != name]
        for family in families for name, _ in family.members
    }
    folds = {name: _plan_fold(site, partners[name], trace, graph, modules, names) for name, site in channel_sites.items()}
    with torch.no_grad():
        for name, fold in folds.items():
            fold.apply(scales[name])
        for family in families:
            _remove_family(family, layout.sites, masks, graph, modules, names)


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified name ``name`` of ``net``."""
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


# --- tracing the plain network ----------------------------------------------------------------


class _Trace:
    """One forward pass of a plain model: leaf-module calls and the autograd graph."""

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.calls, self.users, outputs = trace(model, inputs)
        self.outputs = set(outputs)

    def call_of(self, name: str) -> Call:
        found = [c for c in self.calls if c.name == name]
        if len(found) != 1:
            raise BMRSError(
                f"module {name!r} is called {len(found)} times in a forward pass; a gate on it cannot be folded"
            )
        return found[0]

    def predecessor(self, call: Call) -> Call | None:
        """The module call whose output ``call`` reads, when there is exactly one input."""
        if len(call.in_fns) != 1 or call.in_fns[0] is None:
            return None
        for earlier in reversed(self.calls[: call.order]):
            if earlier.out_fn is call.in_fns[0]:
                return earlier
        return None

    def consumers(self, site: Call) -> tuple[set[str], str | None]:
        """Linear/Conv modules reading the output of ``site`` through commuting operations
        only; or the first operation that does not commute, as text."""
        found: set[str] = set()
        stack, seen = [site.out_fn], set()
        while stack:
            fn = stack.pop()
            if fn in seen:
                continue
            seen.add(fn)
            if fn in self.outputs:
                return found, "the network's output"
            covered = set()
            for call in self.calls[site.order + 1:]:
                if fn not in call.in_fns:
                    continue
                if len(call.in_fns) != 1:
                    return found, f"{call.name} ({type(call.module).__name__}) with several inputs"
                if isinstance(call.module, PRODUCERS) and (getattr(call.module, "groups", 1) == 1
                                                           or is_depthwise(call.module)):
                    found.add(call.name)
                elif isinstance(call.module, _COMMUTING + _RESHAPING):
                    if call.out_fn is not fn:
                        stack.append(call.out_fn)
                else:
                    return found, f"{call.name} ({type(call.module).__name__})"
                covered |= _between(call.out_fn, fn)
            for user in self.users.get(fn, []):
                if user in covered:
                    continue
                kind = re.sub(r"\d+$", "", user.name())
                if kind not in _COMMUTING_FNS:
                    return found, f"the operation {user.name()}"
                stack.append(user)
        return found, None


def _between(fn, stop) -> set:
    """Autograd nodes upstream of ``fn`` without going past ``stop``."""
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen or f is stop:
            continue
        seen.add(f)
        stack += [n for n, _ in f.next_functions]
    return seen


# --- folding ---------------------------------------------------------------------------------


@dataclass
class _Fold:
    """How one gate's scale is folded: into ``target``'s rows (backward) or consumer columns."""

    target: nn.Module | None = None
    columns: list[tuple[nn.Module, Tensor, Tensor]] = field(default_factory=list)  # (module, idxs, root idxs)
    #: depthwise convolutions reading the gated channels: filter c reads channel c alone, so
    #: the scale of channel c goes into filter c (not its bias)
    kernels: list[nn.Module] = field(default_factory=list)

    def apply(self, scale: Tensor) -> None:
        if self.target is not None:
            _scale_rows(self.target, scale)
        for module, idxs, roots in self.columns:
            _scale_columns(module, idxs, scale[roots])
        for module in self.kernels:
            _scale_kernels(module, scale)


def _plan_fold(site: GateSite, coupled_to: list[str], trace: _Trace, graph, modules: dict, names: dict) -> _Fold:
    """Where the gate's scale goes; raises ValueError when it cannot be folded exactly."""
    call = trace.call_of(site.site)
    target, reason = _backward_target(site, call, trace)
    if target is not None:
        return _Fold(target=modules[target])
    found, blocker = trace.consumers(call)
    if blocker is not None and coupled_to:
        raise BMRSError(
            f"gate {site.site!r} is tied to {', '.join(coupled_to)} by a residual addition, so it must fold "
            f"into the layer before it, but {reason}; folding it forward through the addition would be wrong"
        )
    if blocker is not None:
        raise BMRSError(
            f"gate {site.site!r} cannot be folded into the weights exactly: {reason}, "
            f"and its output reaches {blocker}"
        )
    # A gate whose output reaches its consumers through commuting operations alone (no
    # addition) folds into them even when its channels are tied to others: the tie is then a
    # depthwise convolution (which reads the channels one to one), not a sum.
    depthwise = sorted(n for n in found if is_depthwise(modules[n]))
    wrong = [n for n in depthwise if modules[n].in_channels != site.num_structures]
    if wrong:
        raise BMRSError(f"gate {site.site!r} cannot be folded into the depthwise convolution {wrong[0]}, "
                        f"which reads {modules[wrong[0]].in_channels} channels, not {site.num_structures}")
    plain = found - set(depthwise)
    group = _out_channel_group(graph, modules[site.producer], list(range(site.num_structures)))
    columns = _input_columns(graph, group, names)
    if coupled_to:  # the group also holds the consumers of the tied layers: keep this gate's own
        columns = [c for c in columns if names[c[0]] in plain]
    if {names[m] for m, _, _ in columns} != plain:
        raise BMRSError(
            f"gate {site.site!r} cannot be folded into the weights exactly: {reason}, and Torch-Pruning's "
            f"consumers of {site.producer} ({sorted(names[m] for m, _, _ in columns)}) are not "
            f"those the trace found ({sorted(plain)})"
        )
    return _Fold(columns=columns, kernels=[modules[n] for n in depthwise])


def _plain_norm(module: nn.Module) -> bool:
    """A BatchNorm whose forward is PyTorch's own: an affine map per channel. A subclass with
    a forward of its own (timm's BatchNormAct2d applies its activation too) is not."""
    return isinstance(module, BATCH_NORMS) and type(module).forward is nn.BatchNorm2d.forward


def _backward_target(site: GateSite, call: Call, trace: _Trace) -> tuple[str | None, str]:
    """The module whose rows absorb the gate, or None and why not."""
    while True:
        module = call.module
        if call.name == site.producer:
            return call.name, ""
        if _plain_norm(module) and module.affine:
            return call.name, ""
        if not isinstance(module, _COMMUTING):
            return None, f"{call.name} ({type(module).__name__}) lies between {site.producer} and the gate"
        previous = trace.predecessor(call)
        if previous is None:
            return None, f"the input of {call.name} could not be traced to {site.producer}"
        call = previous


def _out_channel_group(graph, producer: nn.Module, idxs: list[int]):
    pruner = graph.get_pruner_of_module(producer)
    return graph.get_pruning_group(producer, pruner.prune_out_channels, idxs)


def _input_columns(graph, group, names: dict) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """The Linear/Conv input columns in ``group``: (consumer, column indices, root channel of each)."""
    found: dict[nn.Module, dict[int, int]] = {}
    for item in group:
        target = item.dep.target.module
        if graph.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(target, PRODUCERS) \
                or is_depthwise(target):  # a depthwise convolution's inputs are its outputs' channels
            continue
        mapping = found.setdefault(target, {})
        for idx, root in zip(item.idxs, item.root_idxs):
            if mapping.setdefault(int(idx), int(root)) != int(root):
                raise RuntimeError(f"input {idx} of {names[target]} maps to two channels")
    return [(m, torch.tensor(list(mp)), torch.tensor(list(mp.values()))) for m, mp in found.items()]


def _scale_rows(module: nn.Module, scale: Tensor) -> None:
    """Multiply output channel c of a Linear/Conv/affine BatchNorm by scale[c] (in place)."""
    weight = module.weight
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * scale.double().view(shape)).to(weight.dtype))
    if module.bias is not None:
        module.bias.copy_((module.bias.double() * scale.double()).to(module.bias.dtype))


def _scale_kernels(module: nn.Module, scale: Tensor) -> None:
    """Multiply filter c of a depthwise convolution by scale[c], its bias unchanged (in place):
    the same as multiplying its input channel c by scale[c]."""
    weight = module.weight
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * scale.double().view(shape)).to(weight.dtype))


def _scale_columns(module: nn.Module, idxs: Tensor, scale: Tensor) -> None:
    """Multiply input column idxs[k] of a Linear/Conv by scale[k] (in place)."""
    weight = module.weight
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    columns = weight[:, idxs].double() * scale.double().view(shape)
    weight[:, idxs] = columns.to(weight.dtype)


# --- removal ---------------------------------------------------------------------------------


def _remove_family(family: Family, sites: dict[str, GateSite], masks: dict[str, Tensor], graph, modules: dict,
                   names: dict) -> None:
    """Delete the family's slots that every member masks; keep one if that is all of them."""
    masked = torch.stack([masks[name][idx] == 0 for name, idx in family.members]).all(dim=0)
    slots = torch.nonzero(masked).flatten().tolist()
    if not slots:
        return
    root_gate, root_idx = family.members[0]
    producer = modules[sites[root_gate].producer]
    if len(slots) == family.size:  # a layer cannot have width 0: keep a silent placeholder
        placeholder = slots.pop(0)
        for module, idxs, _ in _input_columns(graph, _out_channel_group(graph, producer, [root_idx[placeholder]]), names):
            module.weight[:, idxs] = 0
        if not slots:
            return
    group = _out_channel_group(graph, producer, [root_idx[j] for j in slots])
    expected = {sites[name].producer for name, _ in family.members}
    pruned = {
        names[item.dep.target.module] for item in group
        if graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, PRODUCERS)
    }
    if pruned != expected:
        raise RuntimeError(f"Torch-Pruning ties {sorted(pruned)} together, but the gates' family is {sorted(expected)}")
    group.prune()


# --- helpers ---------------------------------------------------------------------------------


def _check_outputs(reference, output) -> None:
    for ref, out in zip(output_tensors(reference), output_tensors(output), strict=True):
        if not ref.is_floating_point():
            continue
        tol = torch.finfo(ref.dtype).eps ** 0.5
        bound = tol * float(ref.abs().max()) if ref.numel() else 0.0
        if ref.shape != out.shape or not torch.allclose(out, ref, rtol=tol, atol=bound):
            err = float((out - ref).abs().max()) if ref.shape == out.shape else float("nan")
            raise RuntimeError(
                f"the compacted model's outputs differ from the gated model's (max abs error {err:.3g}, "
                f"largest output {float(ref.abs().max()):.3g}); a gate was folded wrongly, please report this"
            )
