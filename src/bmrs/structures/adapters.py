"""Model adapters: how bmrs finds and removes structures in model families whose layers the
generic analysis of :mod:`bmrs.structures.sites` cannot see (e.g. Hugging Face transformers, whose
attention keeps its head count in plain attributes).

An adapter is an object of the :class:`Adapter` protocol:

* ``handles(model) -> bool``;
* ``layout(model, example_input, *, exclude, heads) -> (sites, families, skipped)``: the
  gate sites of ``model`` (it may add parameter-free site modules in place, such as
  :class:`InputGroups`), their families and the layers left ungated with why;
* ``compact(net, sites, masks, scales) -> None``: on a copy whose gates were detached,
  delete the masked structures of its sites, fold the gates' eval factors into the
  weights and make the model's attributes and configuration follow;
* ``input_weights(model, site) -> Tensor``: each structure's incoming weights, one row per
  structure (the L2 criterion);
* ``architecture(model) -> dict``: what :func:`bmrs.load_compact` rebuilds the model from,
  with the name of an architecture the adapter registered.

Adapters live in optional integration modules, which import their library. The library
never imports them: :func:`find_adapter` imports the integration module named in
:data:`INTEGRATIONS` for a model's top-level package only when it is given such a model
(so that library is already imported), and the module registers its adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import BMRSError

__all__ = [
    "ADAPTERS", "Adapter", "BranchSite", "INTEGRATIONS", "InputGroups", "find_adapter", "integration_of",
    "register_adapter", "remove_branch_sites", "remove_hooked", "remove_input_groups",
]


@runtime_checkable
class Adapter(Protocol):
    """What bmrs asks of the adapter of a model family (see the module's docstring)."""

    def handles(self, model: nn.Module) -> bool:
        """Whether this adapter finds the structures of ``model``."""

    def layout(self, model: nn.Module, example_input, *, exclude: Sequence[nn.Module],
               heads: bool) -> tuple[list, list, list[tuple[str, str]]]:
        """The gate sites of ``model`` (:class:`~bmrs.structures.kinds.GateSite`), their
        families (:class:`~bmrs.structures.kinds.Family`), and the layers left ungated with why."""

    def compact(self, net: nn.Module, sites: list, masks: dict, scales: dict) -> None:
        """Delete the masked structures of ``sites`` from ``net`` (a copy, gates detached) in place."""

    def input_weights(self, model: nn.Module, site) -> Tensor:
        """Each structure's incoming weights at ``site``, one row per structure."""

    def architecture(self, model: nn.Module) -> dict:
        """What :func:`bmrs.load_compact` rebuilds ``model`` from."""


#: Registered adapters, asked in order.
ADAPTERS: list[Adapter] = []

#: Integration modules by the top-level package of the models they handle.
INTEGRATIONS: dict[str, str] = {"transformers": "bmrs.integrations.transformers"}


def register_adapter(adapter: Adapter) -> None:
    """Add ``adapter`` (an :class:`Adapter`) unless it is registered already.

    Raises:
        BMRSError: ``adapter`` lacks a method of the protocol.
    """
    if not isinstance(adapter, Adapter):
        missing = [name for name in ("handles", "layout", "compact", "input_weights", "architecture")
                   if not callable(getattr(adapter, name, None))]
        raise BMRSError(f"{adapter!r} is not a model adapter: it has no {', '.join(missing)} (see bmrs.structures.adapters.Adapter)")
    if adapter not in ADAPTERS:
        ADAPTERS.append(adapter)


def find_adapter(model: nn.Module) -> Adapter | None:
    """The adapter that handles ``model``, or None (the generic analysis applies)."""
    package = type(model).__module__.partition(".")[0]
    if package in INTEGRATIONS:
        importlib.import_module(INTEGRATIONS[package])
    return next((a for a in ADAPTERS if a.handles(model)), None)


def integration_of(architecture_name: str) -> None:
    """Import the integration that registers ``architecture_name`` for loading, if any."""
    package = architecture_name.partition(".")[0]
    if package in INTEGRATIONS:
        importlib.import_module(INTEGRATIONS[package])


class InputGroups(nn.Module):
    """A gate site on the input of a projection: its last axis viewed as ``groups`` groups
    of ``width`` consecutive features.

    Installed on a layer (a child ``bmrs_input``) with a forward pre-hook, it hands the
    layer's input ``(..., groups * width)`` to its own forward as ``(..., groups, width)``
    and merges the result back, so a :class:`~bmrs.NoiseGate` on it (``dim=-2``) multiplies
    each group by one factor: the heads of an attention module at the input of its output
    projection (``width`` = head dimension), or the hidden neurons of a feed-forward block
    at the input of its second layer (``width`` = 1). Without a gate it changes nothing.
    """

    def __init__(self, groups: int, width: int) -> None:
        super().__init__()
        self.groups, self.width = int(groups), int(width)
        #: The handle of the pre-hook on the layer it belongs to (set by :meth:`install`,
        #: used by :func:`remove_input_groups` to remove the hook).
        self.hook_handle: RemovableHandle | None = None

    def extra_repr(self) -> str:
        return f"groups={self.groups}, width={self.width}"

    def forward(self, x: Tensor) -> Tensor:
        return x

    def _pre_hook(self, module: nn.Module, args: tuple):
        x = args[0]
        if x.shape[-1] != self.groups * self.width:
            raise BMRSError(
                f"InputGroups expects {self.groups} x {self.width} input features, got input of shape {tuple(x.shape)}"
            )
        out = self(x.unflatten(-1, (self.groups, self.width)))
        return (out.flatten(-2), *args[1:])

    @classmethod
    def install(cls, layer: nn.Module, groups: int, width: int) -> InputGroups:
        """Put a site on ``layer``'s input (in place) and return it."""
        site = cls(groups, width)
        layer.add_module(INPUT_ATTR, site)
        site.hook_handle = layer.register_forward_pre_hook(site._pre_hook)
        return site


INPUT_ATTR = "bmrs_input"


def remove_input_groups(model: nn.Module) -> None:
    """Remove every :class:`InputGroups` site and its pre-hook from ``model`` (in place)."""
    remove_hooked(model, INPUT_ATTR, InputGroups)


class BranchSite(nn.Module):
    """A gate site on the output of the last layer of a residual branch (``y = x + f(x)``):
    the whole output, one structure per example.

    Installed on that layer (a child ``bmrs_branch``) with a forward hook, it hands the
    layer's output ``(N, ...)`` to its own forward as ``(N, 1, ...)`` and squeezes the result
    back, so a :class:`~bmrs.NoiseGate` on it with one structure (``dim=1``) multiplies each
    example's branch by one theta. Without a gate it changes nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        #: The handle of the hook on its layer (set by :meth:`install`).
        self.hook_handle: RemovableHandle | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self(output.unsqueeze(1)).squeeze(1)

    @classmethod
    def install(cls, layer: nn.Module) -> BranchSite:
        """Put a site on ``layer``'s output (in place) and return it."""
        site = cls()
        layer.add_module(BRANCH_ATTR, site)
        site.hook_handle = layer.register_forward_hook(site._hook)
        return site


BRANCH_ATTR = "bmrs_branch"


def remove_branch_sites(model: nn.Module) -> None:
    """Remove every :class:`BranchSite` and its hook from ``model`` (in place)."""
    remove_hooked(model, BRANCH_ATTR, BranchSite)


def remove_hooked(model: nn.Module, attr: str, kind: type) -> None:
    """Remove from every module of ``model`` its child ``attr`` of type ``kind`` (a gate or
    an input site) and the hook that applies it, by the handle the child keeps
    (``hook_handle``), in place."""
    for module in model.modules():
        child = getattr(module, attr, None)
        if isinstance(child, kind):
            if child.hook_handle is not None:
                child.hook_handle.remove()
                child.hook_handle = None
            delattr(module, attr)
