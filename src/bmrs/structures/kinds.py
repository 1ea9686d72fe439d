"""What a gate is placed on and what it removes: gate sites, families of coupled structures,
the layout of a gated model, and the structure kinds (channels, attention heads, packed-qkv
heads, residual blocks, an adapter's kinds) behind one interface, with their registry.

:mod:`bmrs.structures.sites` finds the sites and families of a network; compaction removes
each kind (:func:`bmrs.compaction.core.remove_structures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import BMRSError
from .adapters import BRANCH_ATTR, INPUT_ATTR, find_adapter
from .attention import head_input_weights, packed_head_input_weights, params_per_head, params_per_packed_head

__all__ = [
    "GateSite", "Family", "GateLayout", "StructureKind", "Channels", "Heads", "PackedHeads", "Blocks", "AdapterKind",
    "STRUCTURE_KINDS", "register_structure_kind", "structure_kind",
]


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
            if s.site.endswith(f".{BRANCH_ATTR}"):
                where = f" (on its branch, at the output of {s.site.removesuffix(f'.{BRANCH_ATTR}')})"
            lines.append(f"  gate {s.site}: {s.num_structures} {s.kind} of {s.producer}{where}")
        coupled = [f for f in self.families if len(f.members) > 1]
        for f in coupled:
            names = list(dict.fromkeys(n for n, _ in f.members))  # a gate may be a member several times
            if len(names) == 1:  # structures of one gate removed in slots (a key/value head's query heads)
                lines.append(f"  pruned {len(f.members)} at a time: {names[0]}")
            else:
                lines.append(f"  coupled, pruned together: {', '.join(names)}")
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


def _one_family_per_head(site, per_head: int) -> Family:
    """The heads of ``site`` as one family whose slots are its heads, each removing
    ``per_head`` parameters and its gate's two (loc and log_scale)."""
    return Family(members=[(site.site, list(range(site.num_structures)))], slot_params=[per_head + 2] * site.num_structures)


class Heads(StructureKind):
    """Attention heads of an attention module; each head is a family of its own, whose slot
    removes the head's q, k, v rows, its output-projection columns and its gate's two
    parameters."""

    name = "heads"

    def family(self, site, modules):
        return _one_family_per_head(site, params_per_head(modules[site.producer]))

    def input_weights(self, model, site):
        return head_input_weights(model.get_submodule(site.producer))


class PackedHeads(StructureKind):
    """Attention heads of a packed-qkv attention module (timm's ``Attention``: ``qkv``,
    ``proj``, ``num_heads``, ``head_dim``; see :func:`bmrs.structures.attention.is_packed_attention`),
    gated at the input of ``proj``. Each head is a family of its own, whose slot removes its
    rows in the q, k and v parts of ``qkv``, its ``proj`` columns and its gate's two
    parameters."""

    name = "packed-heads"

    def family(self, site, modules):
        return _one_family_per_head(site, params_per_packed_head(modules[site.producer]))

    def input_weights(self, model, site):
        return packed_head_input_weights(model.get_submodule(site.producer))


class Blocks(StructureKind):
    """Whole residual blocks ``y = x + f(x)``: one structure per block, gated on the branch
    ``f`` (one theta per example). Each block is a family of its own, whose slot removes
    every parameter of the block (:attr:`GateSite.producer` is the block) and its gate's
    two."""

    name = "blocks"
    removal_order = -1  # before anything inside the block

    def family(self, site, modules):
        block = modules[site.producer]
        params = sum(p.numel() for p in block.parameters() if p.requires_grad)
        return Family(members=[(site.site, [0])], slot_params=[params + 2])

    def input_weights(self, model, site):
        last = model.get_submodule(site.site.removesuffix(f".{BRANCH_ATTR}"))
        return last.weight.detach().reshape(1, -1)


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
register_structure_kind(PackedHeads())
register_structure_kind(Blocks())


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
