"""The multiplicative log-normal noise gate, and putting gates into any network."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .structures.adapters import find_adapter, remove_branch_sites, remove_hooked, remove_input_groups
from .distributed import unwrap
from .errors import BMRSError
from .math import gate_kernel
from .math.distributions import LogUniform, TruncatedLogNormal
from .structures.sites import couple, find_sites, with_grad_enabled
from .structures.kinds import GateLayout

__all__ = [
    "DEFAULT_KL_REDUCTION", "KL_REDUCTIONS", "NoiseGate", "attach_gates", "check_finite_gates", "check_kl_reduction",
    "detach_gates", "gates", "gate_layout", "layer_names", "model_kl",
]

GATE_ATTR = "bmrs_gate"
_LAYOUT_ATTR = "_bmrs_layout"

#: The reductions of the KL term (:func:`model_kl`): name -> what it is, in one line. The
#: library, ``bmrs train`` and the Lightning callback all read their choices from here.
KL_REDUCTIONS: dict[str, str] = {
    "mean": "mean over each gate's structures, then over the gates (the paper's)",
    "structures": "sum / number of gated structures: every structure weighs the same (recommended)",
    "sum": "the sum over every gated structure",
    "elbo": "sum / training-set size: with a mean data loss, the per-example negative ELBO",
}
#: The reduction used unless one is given (the recommended one, see docs/pruning.md).
DEFAULT_KL_REDUCTION = "structures"


def check_kl_reduction(reduction: str, argument: str = "reduction") -> None:
    """Raise :class:`~bmrs.BMRSError` unless ``reduction`` is one of :data:`KL_REDUCTIONS`
    (the message names ``argument``, the caller's name for it)."""
    if reduction not in KL_REDUCTIONS:
        choices = ", ".join(repr(r) for r in KL_REDUCTIONS)
        raise BMRSError(f"{argument} must be one of {choices}, got {reduction!r}")


class NoiseGate(nn.Module):
    """Multiplies each of ``num_structures`` channels by a positive noise variable theta.

    Variational posterior per structure: theta with ``log theta ~ N(loc, scale**2)``
    truncated to ``[log_low, log_high]``; prior: ``log theta`` uniform on the same interval.

    * Training: one theta per (example, structure), drawn by reparameterisation and
      broadcast over every other axis (spatial positions, tokens), as in the paper.
    * Evaluation: multiplies by ``E[theta] * mask``, deterministic.
    * ``mask`` (a 0/1 buffer saved in the state dict) switches structures off in both modes.

    Args:
        num_structures: number of gated channels C.
        dim: the channel axis of the input: 1 for (N, C) and (N, C, H, W), -1 for (N, T, C).
            Axis 0 is the batch and cannot be gated.
        log_low, log_high: bounds of log theta (paper: -20 and 0).
        init_loc, init_log_scale: initial posterior (paper: 0 and -5).
        log_scale_bounds: log scale is clamped to this range in the forward pass (paper: [-20, 5]).
    """

    def __init__(
        self,
        num_structures: int,
        dim: int = 1,
        *,
        log_low: float = -20.0,
        log_high: float = 0.0,
        init_loc: float = 0.0,
        init_log_scale: float = -5.0,
        log_scale_bounds: tuple[float, float] = (-20.0, 5.0),
    ) -> None:
        super().__init__()
        if int(num_structures) < 1:
            raise BMRSError(f"num_structures must be a positive integer, got {num_structures!r}")
        if dim == 0:
            raise BMRSError("dim=0 is the batch axis; pass the channel axis (1 or -1)")
        if not log_low < log_high:
            raise BMRSError(f"log_low must be smaller than log_high, got {log_low} and {log_high}")
        if not log_scale_bounds[0] < log_scale_bounds[1]:
            raise BMRSError(f"log_scale_bounds must be increasing, got {log_scale_bounds}")
        self.num_structures = int(num_structures)
        self.dim = int(dim)
        self.log_low = float(log_low)
        self.log_high = float(log_high)
        self.log_scale_bounds = (float(log_scale_bounds[0]), float(log_scale_bounds[1]))
        self.loc = nn.Parameter(torch.full((self.num_structures,), float(init_loc)))
        self.log_scale = nn.Parameter(torch.full((self.num_structures,), float(init_log_scale)))
        self.register_buffer("mask", torch.ones(self.num_structures))
        self._bank = _Bank([self])  # attach_gates puts all gates of a model in one bank
        #: The handle of the forward hook that applies this gate to the module it follows
        #: (set by :func:`attach_gates`, used by :func:`detach_gates` to remove the hook).
        self.hook_handle: RemovableHandle | None = None

    def extra_repr(self) -> str:
        kept = int(self.mask.sum().item())
        return f"{self.num_structures}, dim={self.dim}, kept={kept}, log_theta in [{self.log_low:g}, {self.log_high:g}]"

    def posterior(self, dtype: torch.dtype | None = None) -> TruncatedLogNormal:
        """The variational posterior q(theta) of every structure (batch shape ``(C,)``).

        ``dtype`` (e.g. ``torch.float64`` for pruning decisions) converts the parameters
        before the scale is exponentiated, so no precision is lost on the way.
        """
        loc, log_scale = self.loc, self.log_scale
        if dtype is not None:
            loc, log_scale = loc.to(dtype), log_scale.to(dtype)
        scale = torch.exp(torch.clamp(log_scale, *self.log_scale_bounds))
        return TruncatedLogNormal(loc, scale, self.log_low, self.log_high, validate_args=False)

    def prior(self) -> LogUniform:
        """The log-uniform prior p(theta), batch shape ``(C,)``."""
        low = torch.full_like(self.loc, self.log_low).detach()
        return LogUniform(low, torch.full_like(low, self.log_high), validate_args=False)

    def kl(self) -> Tensor:
        """``KL(q || p)`` of every structure, shape ``(C,)``."""
        return _Bank([self]).structure_kl()

    def sample(self, batch: int) -> Tensor:
        """Reparameterised theta for ``batch`` examples, shape ``(batch, C)`` (the mask not applied)."""
        thetas, _, _ = _draw([self], batch, masked=False)
        return thetas[0]

    def expected_gate(self) -> Tensor:
        """What the gate multiplies by in evaluation: ``E[theta] * mask``, shape ``(C,)``.

        A masked structure gives exactly 0, whatever its posterior (even NaN).
        """
        return _masked(self.posterior().mean, self.mask)

    def _broadcast_shape(self, x: Tensor, batch: int) -> list[int]:
        dim = self.dim % x.dim()
        if dim == 0 or x.shape[dim] != self.num_structures:
            raise BMRSError(
                f"NoiseGate expects {self.num_structures} channels on axis {self.dim} of a batched input, "
                f"got input of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[0] = batch
        shape[dim] = self.num_structures
        return shape

    def _hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        """Forward hook of the gated module: gate its output."""
        return self(output)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            shape = self._broadcast_shape(x, x.shape[0])
            theta = self._bank.theta(self, x.shape[0])  # (N, C), masked
            if theta.dtype != x.dtype:
                theta = theta.to(x.dtype)
            return x * (theta if len(shape) == 2 else theta.view(shape))
        return x * self._eval_gate().to(x.dtype).reshape(self._broadcast_shape(x, 1))

    def _eval_gate(self) -> Tensor:
        """``expected_gate()``, recomputed only when the parameters or the mask change.

        Evaluation calls the gate on every batch with the same parameters; the truncated
        log-normal mean costs far more than the multiplication, so it is cached, keyed on
        the tensors' identities and in-place version counters (optimizer steps,
        ``load_state_dict`` and mask updates all bump them). With gradients enabled the
        cache is bypassed, so the result stays differentiable.
        """
        if torch.is_grad_enabled() and (self.loc.requires_grad or self.log_scale.requires_grad):
            return self.expected_gate()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (self.loc, self.log_scale, self.mask))
        cached = getattr(self, "_eval_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.expected_gate())
            self._eval_cache = cached
        return cached[1]


def _masked(theta: Tensor, mask: Tensor) -> Tensor:
    """``theta`` where the mask keeps a structure, exactly 0 elsewhere (not ``theta * 0``,
    which is NaN for a NaN or infinite theta)."""
    return torch.where(mask > 0, theta, torch.zeros((), dtype=theta.dtype, device=theta.device))


def check_finite_gates(model: nn.Module, *, masked: bool = False) -> None:
    """Raise ``ValueError`` naming every gate whose posterior parameters are NaN or infinite
    at an unmasked structure (at any structure with ``masked=True``)."""
    bad = []
    for name, gate in gates(model).items():
        broken = ~(torch.isfinite(gate.loc) & torch.isfinite(gate.log_scale))
        if not masked:
            broken &= gate.mask > 0
        if bool(broken.any()):
            where = broken.nonzero().flatten().tolist()
            bad.append(f"{name} (structures {', '.join(map(str, where[:5]))}{', ...' if len(where) > 5 else ''})")
    if bad:
        raise BMRSError(f"non-finite gate parameters (loc or log_scale) in {'; '.join(bad)}")


def _key(gate: NoiseGate) -> tuple:
    """Identifies the current values of a gate's parameters and mask (in-place changes bump
    the version counters; replacing a tensor changes its address)."""
    loc, log_scale, mask = gate.loc, gate.log_scale, gate.mask
    return (loc.data_ptr(), loc._version, log_scale.data_ptr(), log_scale._version, mask.data_ptr(), mask._version)


def _signature(gate: NoiseGate) -> tuple:
    return (gate.loc.dtype, gate.loc.device, gate.log_low, gate.log_high, gate.log_scale_bounds)


def _general(members: list[NoiseGate], u: Tensor, mask: Tensor) -> tuple[list[Tensor], Tensor]:
    """theta at quantiles ``u`` and the KL per structure by the general, tail-safe code."""
    g = members[0]
    loc = torch.cat([m.loc for m in members]) if len(members) > 1 else g.loc
    log_scale = torch.cat([m.log_scale for m in members]) if len(members) > 1 else g.log_scale
    scale = torch.exp(torch.clamp(log_scale, *g.log_scale_bounds))
    q = TruncatedLogNormal(loc, scale, g.log_low, g.log_high, validate_args=False)
    low = torch.full_like(loc, g.log_low).detach()
    kl = torch.distributions.kl_divergence(q, LogUniform(low, torch.full_like(low, g.log_high), validate_args=False))
    theta = _masked(q.icdf(u), mask) if u.shape[0] else u
    return list(theta.split([m.num_structures for m in members], 1)), kl


def _draw(members: list[NoiseGate], batch: int, *, masked: bool = True) -> tuple[list[Tensor], Tensor, bool]:
    """theta for ``batch`` examples (one tensor per gate) and the KL per structure of gates
    that share dtype, device and bounds; the third value says whether the fused kernel
    (:class:`bmrs.math.gate_kernel.GateNoise`) applied (else the general code was used)."""
    g = members[0]
    k = gate_kernel.constants(g.loc.dtype, g.loc.device, g.log_low, g.log_high, g.log_scale_bounds)
    sizes = [m.num_structures for m in members]
    total = sum(sizes)
    u = torch.rand((batch, total), dtype=g.loc.dtype, device=g.loc.device).clamp_(min=k.u_min)
    if masked:
        mask = torch.cat([m.mask for m in members]) if len(members) > 1 else g.mask
    else:
        mask = k.one
    *thetas, kl, tail = gate_kernel.GateNoise.apply(
        u, mask, k, sizes, *(m.loc for m in members), *(m.log_scale for m in members)
    )
    if bool(tail):  # some structure is in a tail of the normal: the exact general code
        thetas, kl = _general(members, u, mask)
        return thetas, kl, False
    return list(thetas), kl, True


class _Draw:
    """One joint draw of theta for every gate of a bank, handed out once per gate."""

    __slots__ = ("keys", "thetas", "kl", "batch", "grad", "pending", "fused")

    def __init__(self, gates: list[NoiseGate], batch: int) -> None:
        self.keys = {id(g): _key(g) for g in gates}
        self.batch, self.grad = batch, torch.is_grad_enabled()
        self.thetas: dict[int, Tensor] = {}
        self.kl: list[tuple[list[NoiseGate], Tensor]] = []
        self.fused = True
        groups: dict[tuple, list[NoiseGate]] = {}
        for g in gates:
            groups.setdefault(_signature(g), []).append(g)
        for members in groups.values():
            thetas, kl, fused = _draw(members, batch)
            self.thetas.update(zip((id(m) for m in members), thetas))
            self.kl.append((members, kl))
            self.fused = self.fused and fused
        self.pending = set(self.thetas)

    def fresh(self, gates: list[NoiseGate]) -> bool:
        return self.grad == torch.is_grad_enabled() and all(self.keys.get(id(g)) == _key(g) for g in gates)


class _Bank:
    """The gates of one model. In training, the first gate called draws theta for all of them
    in one fused computation (which also yields their KL); each gate then takes its own part.
    A gate called a second time, or whose parameters, mask or batch size changed, or a
    change of grad mode, starts a new draw, so every call still gets fresh noise.
    """

    def __init__(self, gates: list[NoiseGate]) -> None:
        self.gates = list(gates)
        self._last: _Draw | None = None
        self._weights: tuple | None = None

    def __getstate__(self) -> dict:  # the last draw is transient (and holds autograd graphs)
        return {"gates": self.gates}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["gates"])

    def theta(self, gate: NoiseGate, batch: int) -> Tensor:
        last = self._last
        if (last is None or id(gate) not in last.pending or last.batch != batch
                or last.grad != torch.is_grad_enabled() or last.keys[id(gate)] != _key(gate)):
            last = self._last = _Draw(self.gates, batch)
        last.pending.discard(id(gate))
        return last.thetas[id(gate)]

    def structure_kl(self) -> Tensor:
        """The KL of every structure of the bank's gates (in bank order), unmasked.

        Reuses the KL computed with the last draw while its parameters are unchanged and
        nothing has been backpropagated through it (a training step: forward, then the
        loss with :func:`model_kl`); otherwise computes it (without drawing noise).
        """
        last = self._last
        if last is None or not last.fused or not last.fresh(self.gates) or self._consumed(last):
            last = _Draw(self.gates, 0)
        parts = [kl for _, kl in last.kl]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def _consumed(draw: _Draw) -> bool:
        """Whether a backward pass already went through the draw (its graph may be freed)."""
        return any(getattr(kl.grad_fn, "consumed", False) for _, kl in draw.kl)

    def weights(self, reduction: str, dataset_size: int | None) -> Tensor:
        """Per-structure weights of the KL for ``reduction``: zero where masked."""
        key = (reduction, dataset_size, tuple(g.mask._version for g in self.gates), tuple(g.mask.data_ptr() for g in self.gates))
        if self._weights is None or self._weights[0] != key:
            with torch.no_grad():
                per_gate = [g.mask.to(g.loc.dtype) for g in self.gates]
                if reduction == "mean":
                    per_gate = [m / (m.numel() * len(per_gate)) for m in per_gate]
                total = torch.cat(per_gate)
                if reduction == "structures":
                    total = total / total.numel()
                elif reduction == "elbo":
                    total = total / dataset_size
            self._weights = (key, total)
        return self._weights[1]


@with_grad_enabled
def attach_gates(
    model: nn.Module,
    example_input,
    *,
    exclude: Sequence = (),
    heads: bool = True,
    blocks: bool = False,
    hidden_width: bool = False,
    log_low: float = -20.0,
    log_high: float = 0.0,
    init_loc: float = 0.0,
    init_log_scale: float = -5.0,
) -> GateLayout:
    """Put a :class:`NoiseGate` on every prunable structure of ``model`` (in place).

    Structures are the output neurons of ``nn.Linear``, the output channels of
    ``nn.Conv1d/2d/3d``, and the heads of attention modules
    (:class:`bmrs.structures.attention.MultiheadSelfAttention`; ``nn.MultiheadAttention``, converted in
    place by :func:`bmrs.structures.attention.expose_heads`, keeping its parameters). Each gate multiplies the output of the last module that consumes
    the layer's output alone among its BatchNorm, activation and dropout modules, so it sits
    after the activation (or BatchNorm) as in the paper. Where max or average pooling follows
    alone, the gate multiplies the pooled output instead: the same network (theta is
    positive and the same at every pooled position), with fewer values to multiply in
    training and evaluation. The final layers (whose outputs
    are the network's outputs, e.g. the classifier) are never gated. Channels tied across
    layers by residual additions are gated in every layer and form a family that is only
    pruned as a whole.

    The gate is registered as a child module ``bmrs_gate`` of the module it follows, and
    applied by a forward hook, so the model's own code and parameter names are unchanged.

    Model families whose structures live in plain attributes (Hugging Face transformers:
    heads and feed-forward neurons) are handled by their adapter (:mod:`bmrs.structures.adapters`),
    which gates at the input of the layer reading the structures instead.

    Args:
        model: any ``nn.Module``; traced once with ``example_input`` in eval mode.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (e.g. ``input_ids`` and ``attention_mask`` of a Hugging Face model).
        exclude: modules to leave ungated, by qualified name (a prefix matches submodules),
            instance or class.
        heads: gate attention heads (``False`` leaves them ungated).
        blocks: also gate whole residual blocks: every module (called once) whose output is
            its input plus a branch, ``x + f(x)``, where ``f`` ends in a Linear, Conv,
            affine BatchNorm or affine LayerNorm, gets a gate with one structure on the
            branch (one theta per example, kind ``"blocks"``); a masked block is deleted by
            :func:`~bmrs.compaction.compact` (replaced by ``nn.Identity``). Not for models
            handled by an adapter.
        hidden_width: also gate the residual stream's channels of a Hugging Face decoder
            (Llama, Qwen2, Mistral): one gate on the output of every layer writing it (token
            embedding, attention and FFN output projections), all in one family, so a channel
            goes from the embedding, every projection reading or writing it, the RMS norms
            and the language-model head when every writer masks it. Only where bmrs knows
            every such layer (else ``layout.skipped["hidden width"]`` says why).
        log_low, log_high, init_loc, init_log_scale: see :class:`NoiseGate`.

    Returns:
        The :class:`~bmrs.structures.kinds.GateLayout`: the gates, their coupled families, and
        every layer left ungated with the reason. A warning lists layers that could not be
        gated for a reason other than being final or excluded.
    """
    if unwrap(model) is not model:
        raise BMRSError("attach gates before wrapping the model in DistributedDataParallel: "
                         "the wrapper only synchronises the parameters it saw when it was built")
    if gates(model):
        raise BMRSError("the model already has gates; call bmrs.detach_gates(model) first")
    sites, families, skipped = _find_layout(model, example_input, exclude, heads=heads, blocks=blocks,
                                            hidden_width=hidden_width)
    _install_gates(model, sites, log_low=log_low, log_high=log_high, init_loc=init_loc, init_log_scale=init_log_scale)
    layout = GateLayout(sites={s.site: s for s in sites}, families=families, skipped=skipped)
    setattr(model, _LAYOUT_ATTR, layout)
    _warn_ungated(model, sites, skipped)
    return layout


def _find_layout(model: nn.Module, example_input, exclude, *, heads: bool, blocks: bool, hidden_width: bool):
    """(sites, families, skipped) of ``model``: its adapter's, or the generic analysis's."""
    adapter = find_adapter(model)
    if adapter is not None and blocks:
        raise BMRSError(f"blocks=True is not supported for {type(model).__name__}, whose structures a model adapter finds")
    if adapter is None and hidden_width:
        raise BMRSError("hidden_width=True is supported for Hugging Face decoders only (bmrs.integrations.transformers)")
    if adapter is not None:  # a model family with its own structures (e.g. Hugging Face transformers)
        options = {"hidden_width": True} if hidden_width else {}
        return adapter.layout(model, example_input, exclude=exclude, heads=heads, **options)
    sites, skipped = find_sites(model, example_input, exclude, heads=heads, blocks=blocks)
    sites, families, coupled_skips = couple(model, example_input, sites)
    skipped.update(coupled_skips)
    return sites, families, skipped


def _install_gates(model: nn.Module, sites: list, **options) -> None:
    """A :class:`NoiseGate` (``options``: its bounds and initial posterior) on every site, on
    the model's device, hooked after its module; all of them sharing one :class:`_Bank`."""
    modules = dict(model.named_modules())
    reference = next(model.parameters(), None)
    for site in sites:
        gate = NoiseGate(site.num_structures, site.dim, **options)
        if reference is not None:
            gate = gate.to(device=reference.device)
        host = modules[site.site]
        host.add_module(GATE_ATTR, gate)
        gate.hook_handle = modules[site.hook_module].register_forward_hook(gate._hook)
    bank = _Bank([modules[site.site].get_submodule(GATE_ATTR) for site in sites])
    for gate in bank.gates:
        gate._bank = bank


def _warn_ungated(model: nn.Module, sites: list, skipped: dict[str, str]) -> None:
    """Warn (at the caller of :func:`attach_gates`) about layers left ungated for a reason other
    than being final or excluded, and about a model with nothing gated at all."""
    stacklevel = 4  # past this function, attach_gates and its with_grad_enabled wrapper
    unexpected = {n: why for n, why in skipped.items() if not why.startswith(("excluded", "final layer"))}
    if not sites and not skipped:
        warnings.warn(f"bmrs.attach_gates found nothing to gate in {type(model).__name__}: it has no Linear, "
                      "Conv1d/2d/3d or attention layer, so nothing can be pruned", stacklevel=stacklevel)
    elif not sites:  # every layer, with why it was skipped
        warnings.warn(f"bmrs.attach_gates left these layers ungated, so nothing in {type(model).__name__} can be pruned:\n"
                      + "\n".join(f"  {n}: {why}" for n, why in skipped.items()), stacklevel=stacklevel)
    elif unexpected:
        warnings.warn("bmrs.attach_gates left these layers ungated:\n"
                      + "\n".join(f"  {n}: {why}" for n, why in unexpected.items()), stacklevel=stacklevel)


def gates(model: nn.Module) -> dict[str, NoiseGate]:
    """The model's gates, keyed by the name of the module each one follows.

    Here and in every other function of bmrs that takes a model, the model may be wrapped in
    ``DistributedDataParallel``: the network inside is used (see :func:`bmrs.distributed.unwrap`).
    """
    model = unwrap(model)
    return {
        name: getattr(module, GATE_ATTR)
        for name, module in model.named_modules()
        if isinstance(getattr(module, GATE_ATTR, None), NoiseGate)
    }


def gate_layout(model: nn.Module) -> GateLayout:
    """The :class:`~bmrs.structures.kinds.GateLayout` recorded by :func:`attach_gates`."""
    layout = getattr(unwrap(model), _LAYOUT_ATTR, None)
    if layout is None:
        raise BMRSError("the model has no gates attached by bmrs.attach_gates")
    return layout


def layer_names(model: nn.Module) -> dict[str, str]:
    """For every gate (by its key in :func:`gates`), the name of the layer whose structures
    it gates: the gate sits after the layer's activation or BatchNorm (gate ``act1``, layer
    ``fc1``), followed by the kind of structure where a model adapter defines it
    (``encoder.layer.0:ffn-neurons``). This is the name bmrs prints and writes into run
    metrics and logs. Every gate keeps its own key where no layout was recorded for it or two
    gates would share a name.
    """
    named = gates(model)
    layout = getattr(unwrap(model), _LAYOUT_ATTR, None)
    names = {}
    for n in named:
        site = layout.sites.get(n) if layout is not None else None
        if site is None:
            names[n] = n
        else:  # structures a model adapter defines carry their kind: "encoder.layer.0:ffn-neurons"
            names[n] = site.producer if site.kind in ("channels", "heads") else f"{site.producer}:{site.kind}"
    if len(set(names.values())) < len(names):
        return {n: n for n in named}
    return names


def detach_gates(model: nn.Module) -> None:
    """Remove every gate and its hook (and the input sites of an adapter), leaving the model
    as it was before attaching."""
    model = unwrap(model)
    remove_hooked(model, GATE_ATTR, NoiseGate)
    remove_input_groups(model)
    remove_branch_sites(model)
    if hasattr(model, _LAYOUT_ATTR):
        delattr(model, _LAYOUT_ATTR)


def model_kl(model: nn.Module, reduction: str = DEFAULT_KL_REDUCTION, dataset_size: int | None = None) -> Tensor:
    """The KL term of the ELBO over every gate's kept (unmasked) structures.

    Args:
        reduction: one of :data:`KL_REDUCTIONS`: ``"structures"`` (the default, recommended:
            total divided by the number of gated structures, so every structure weighs the
            same, as in the ELBO, at the paper's overall strength), ``"mean"`` (the paper's:
            mean over each gate's structures, then over gates), ``"sum"`` (total), or
            ``"elbo"`` (total divided by ``dataset_size``: with a mean data loss, the
            per-example negative ELBO).
        dataset_size: number of training examples, for ``"elbo"``: the whole training set,
            also when each of several processes trains on a shard of it.

    A pruned structure is no longer part of the model, so it contributes nothing; the
    ``"mean"`` still divides by the gate's full number of structures, so that the weight of
    each remaining structure's KL does not grow as its neighbours are pruned (dividing by
    the kept count instead multiplies it by up to C and drives every structure of a layer
    to the prior once pruning starts).
    """
    check_kl_reduction(reduction)
    if reduction == "elbo" and not (isinstance(dataset_size, int) and dataset_size > 0):
        raise BMRSError(f"reduction='elbo' needs the training set size as a positive int, got {dataset_size!r}")
    all_gates = list(gates(model).values())
    if not all_gates:
        return torch.zeros(())
    bank = all_gates[0]._bank
    if len(bank.gates) != len(all_gates) or {id(g) for g in bank.gates} != {id(g) for g in all_gates}:
        bank = _Bank(all_gates)  # gates attached separately: no shared draw to reuse
    return (bank.structure_kl() * bank.weights(reduction, dataset_size)).sum()
