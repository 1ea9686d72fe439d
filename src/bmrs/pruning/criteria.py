"""Pruning criteria: from the state of a gated model to a decision per structure.

Every criterion scores each structure (higher: more worth keeping) and has a rule that turns
scores into keep/prune decisions. Criteria are of two kinds:

* **evidence criteria** (:class:`EvidenceCriterion`): prune a structure where the change in
  log-evidence under a reduced prior reaches a margin, ``delta F >= margin``, with no
  threshold to tune. BMRS_N (margin 0), the paper code's BMRS_N (margin -1/2 log 2 pi),
  Kass and Raftery's reading (margin -1), the relative BMRS_N (margin: delta F of an
  uninformed posterior) and BMRS_U-p (margin 0) are the same rule with different reduced
  priors and margins.
* **ranking baselines**: a score per structure, cut at a threshold or at a target
  compression (see :func:`bmrs.pruning.decide`).

Structures coupled into a family (channels tied by residual additions) are decided together
from one family score (:meth:`Criterion.family_score`): for the evidence criteria the sum of
the members' ``delta F - margin``, which is the delta F of removing them together.

The registry
------------
:data:`CRITERIA` maps each name to its class; :func:`register_criterion` adds one. A class
says everything the rest of bmrs needs to know about it (its name, what it does in one line,
whether it is evidence-based, what a run must give it, the labels it is reported under), so
adding a criterion is one class in one module: ``bmrs train --method``, ``bmrs sweep
--criteria``, the suites, reports and diagnostics all read their lists from here.
Criteria in other packages register through the ``bmrs.criteria`` entry point group
(:func:`load_plugins`, which the ``bmrs`` command calls on start).
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BMRSError
from ..gates import DEFAULT_KL_REDUCTION, NoiseGate, gate_layout, gates
from ..math.distributions import TruncatedLogNormal
from ..math.special import HALF_LOG_2PI
from ..reduction import bmrs_n_prior, bmrs_u_prior, delta_f
from ..structures.kinds import structure_kind

__all__ = [
    "Criterion", "EvidenceCriterion", "BMRSN", "BMRSNCode", "BMRSNRelative", "BMRSNKassRaftery", "BMRSU",
    "SNR", "ExpectedTheta", "L2", "Taylor", "Random",
    "CRITERIA", "CONTEXT", "register_criterion", "make_criterion", "resolve_criterion", "criterion_class", "parse_label",
    "criterion_label", "default_labels", "label_order", "load_plugins", "ENTRY_POINT_GROUP", "RECOMMENDED", "PAPER",
]

#: The settings bmrs uses unless told otherwise (the library's :class:`bmrs.Trainer` and
#: :func:`bmrs.elbo_loss`, ``bmrs train`` and the Lightning callback), chosen from our
#: reproduction (docs/pruning.md, "Recommended settings"): bmrs-n-kr breaks the ties of relaxed
#: gates without a tuned threshold, and a KL weighted per structure does not collapse LeNet5's
#: convolutions as the paper's per-layer mean does.
RECOMMENDED = {"method": "bmrs-n-kr", "kl_reduction": DEFAULT_KL_REDUCTION}
#: The paper's choices for the same settings (BMRS_N as its released code computes it).
PAPER = {"method": "bmrs-n-code", "kl_reduction": "mean"}

#: What a run can give a criterion's constructor (see :attr:`Criterion.needs`): ``data``,
#: an iterable of ``(inputs, targets)`` training batches; ``seed``, the run's seed;
#: ``bits``, the precision of a run's ``--bits``.
CONTEXT = ("data", "seed", "bits")


class Criterion:
    """Base class. Subclasses implement :meth:`structure_scores` and say what they are.

    Class attributes (what the registry reads):
        name: short name: ``bmrs train --method NAME``, ``make_criterion(NAME)``.
        summary: what it does, in one line (``--help``, reports).
        evidence_based: True for the evidence criteria (prune where delta F >= margin,
            no threshold), False for ranking baselines.
        needs: keyword arguments of the constructor that a run supplies from its context,
            among :data:`CONTEXT` (e.g. ``("data",)`` for Taylor, ``("seed",)`` for random).
        variants: the constructor options of its default labels (sweeps, diagnostics,
            suites); ``({},)`` for a criterion without options.
        label_syntax: how its labels are written, for error messages.
        threshold: keep a structure when its (family) score is >= this; ``None`` when the
            criterion has no natural threshold and needs a target compression instead
            (the class attribute is the default; instances may override it).
    """

    name = "criterion"
    summary = ""
    evidence_based = False
    needs: tuple[str, ...] = ()
    variants: tuple[dict, ...] = ({},)
    label_syntax: str | None = None
    threshold: float | None = None

    # --- labels: how runs and sweep points of this criterion are named ------------------
    @classmethod
    def label(cls, **options) -> str:
        """The label of this criterion with ``options`` (default: its name)."""
        return cls.name

    @classmethod
    def parse_label(cls, label: str) -> dict | None:
        """The options a label stands for, or ``None`` when it is not a label of this criterion."""
        return {} if label == cls.name else None

    @classmethod
    def label_order(cls, options: dict) -> float:
        """Order of this criterion's labels among themselves in tables (lower first)."""
        return 0.0

    # --- decisions -----------------------------------------------------------------------
    def structure_scores(self, model: nn.Module) -> dict[str, Tensor]:
        """Per gate, a float64 score per structure (higher: keep)."""
        raise NotImplementedError

    def family_score(self, member_scores: Tensor) -> Tensor:
        """Combine the scores of a family's members, shape ``(members, slots)``, per slot."""
        return member_scores.max(dim=0).values

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


#: Criterion classes by name, in registration order (the order of tables and lists).
CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: add a :class:`Criterion` subclass to :data:`CRITERIA` under its name.

    Raises:
        ValueError: the name is taken, not lower-case ``[a-z0-9-]``, or ``needs`` names
            something a run cannot give (see :data:`CONTEXT`).
    """
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register_criterion takes a Criterion subclass, got {cls!r}")
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise BMRSError(f"criterion name {cls.name!r} must be lower-case words joined by '-'")
    if cls.name in CRITERIA or cls.name == "none":
        raise BMRSError(f"a criterion named {cls.name!r} is already registered")
    unknown = set(cls.needs) - set(CONTEXT)
    if unknown:
        raise BMRSError(f"criterion {cls.name!r} needs {', '.join(sorted(unknown))}: a run gives only {', '.join(CONTEXT)}")
    CRITERIA[cls.name] = cls
    return cls


def _key(name: str) -> str:
    return name.strip().replace("_", "-").lower()


def criterion_class(name: str) -> type[Criterion]:
    """The registered class of ``name`` (underscores work as dashes).

    Raises:
        ValueError: no criterion of that name.
    """
    key = _key(name)
    if key not in CRITERIA:
        raise BMRSError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}")
    return CRITERIA[key]


def make_criterion(name: str, **kwargs) -> Criterion:
    """Build a registered criterion from its name (see :data:`CRITERIA`: ``bmrs-n``,
    ``bmrs-u``, ``l2``, ...); underscores work as dashes; ``kwargs`` go to its constructor.

    Raises:
        ValueError (:class:`~bmrs.BMRSError`): no criterion of that name, an option its
            constructor does not take, or a number option (a threshold, bits) that is not finite.
    """
    cls = criterion_class(name)
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            takes = ", ".join(parameters) or "none"
            raise BMRSError(f"criterion {cls.name} takes no option {', '.join(unknown)} (its options: {takes})")
    for key, value in kwargs.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
            raise BMRSError(f"criterion {cls.name}: {key} must be a finite number, got {value}")
    return cls(**kwargs)


def resolve_criterion(criterion, **options) -> Criterion:
    """``criterion`` as a :class:`Criterion`: one given is returned as it is; a name or label
    (``"bmrs-n-kr"``, ``"bmrs-u4"``, see :func:`parse_label`) is built with ``options``
    (:func:`make_criterion`). Every function of bmrs that takes a criterion takes it through here."""
    if isinstance(criterion, Criterion):
        if options:
            raise BMRSError(f"options ({', '.join(options)}) are for a criterion given by name, not for {criterion!r}")
        return criterion
    if isinstance(criterion, str):
        if _key(criterion) in CRITERIA:
            return make_criterion(criterion, **options)
        name, label_options = parse_label(criterion)
        return make_criterion(name, **{**label_options, **options})
    raise BMRSError(f"a criterion is a name (one of {', '.join(CRITERIA)}) or a Criterion, got {type(criterion).__name__}")


def parse_label(label: str) -> tuple[str, dict]:
    """The criterion name and options a label stands for: ``"bmrs-u4"`` gives
    ``("bmrs-u", {"bits": 4.0})``, ``"l2"`` gives ``("l2", {})``.

    Raises:
        ValueError: no registered criterion has this label (or its options are invalid).
    """
    key = _key(label)
    for name, cls in CRITERIA.items():
        options = cls.parse_label(key)
        if options is not None:
            return name, options
    names = ", ".join(cls.label_syntax or name for name, cls in CRITERIA.items())
    raise BMRSError(f"unknown criterion {label!r}; choose from {names}")


def criterion_label(method: str, options: dict | None = None) -> str:
    """The label of a run of ``method`` with these options (``"bmrs-u"`` with ``bits=8`` gives
    ``"bmrs-u8"``); a method that is not a registered criterion (``"none"``) is its own label."""
    cls = CRITERIA.get(method)
    if cls is None:
        return method
    return cls.label(**{k: v for k, v in (options or {}).items() if k in cls.needs})


def default_labels(evidence_based: bool | None = None) -> tuple[str, ...]:
    """The labels of every registered criterion's :attr:`~Criterion.variants`, in registry
    order; only the evidence criteria (``True``) or only the ranking baselines (``False``)."""
    return tuple(
        cls.label(**options)
        for cls in CRITERIA.values() if evidence_based is None or cls.evidence_based == evidence_based
        for options in cls.variants
    )


def label_order(label: str) -> tuple:
    """Sort key of a label: ``none`` first, then the criteria in registry order (a
    criterion's own labels by :meth:`Criterion.label_order`), then unknown labels."""
    if label == "none":
        return (0, 0.0)
    try:
        name, options = parse_label(label)
    except ValueError:
        return (len(CRITERIA) + 1, 0.0)
    return (1 + list(CRITERIA).index(name), CRITERIA[name].label_order(options))


#: Entry point group through which other packages register criteria.
ENTRY_POINT_GROUP = "bmrs.criteria"


def load_plugins() -> list[str]:
    """Import every module named in the ``bmrs.criteria`` entry point group (its classes
    register themselves with :func:`register_criterion`); return the entry points' names.
    Each module is imported once, however often this is called."""
    from importlib.metadata import entry_points

    loaded = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()
        loaded.append(point.name)
    return loaded


class _PosteriorCriterion(Criterion):
    @torch.no_grad()
    def structure_scores(self, model):
        return {name: self.score_gate(gate) for name, gate in gates(model).items()}

    def score_gate(self, gate: NoiseGate) -> Tensor:
        raise NotImplementedError


class EvidenceCriterion(_PosteriorCriterion):
    """Prune a structure where ``delta F >= margin``: delta F is the change in log-evidence
    when its prior is replaced by :meth:`reduced_prior` (:func:`bmrs.delta_f`).

    Subclasses give the reduced prior and the margin: the class attribute :attr:`margin`, or
    a per-structure margin from :meth:`gate_margin`. The score of a structure is
    ``-(delta F - margin)`` (keep where it is > 0); a family's score is the sum of its
    members', so a family goes where removing all of it together meets the members' margins.
    """

    evidence_based = True
    threshold = 0.0
    #: The margin delta F must reach for a structure to be pruned (nats).
    margin = 0.0

    def reduced_prior(self, prior):
        """The reduced prior that replaces a gate's ``prior`` (a LogUniform)."""
        raise NotImplementedError

    def delta_f(self, gate: NoiseGate) -> Tensor:
        """The delta F of removing each structure of ``gate`` (float64, the true value)."""
        prior = gate.prior()
        return delta_f(gate.posterior(torch.float64), prior, self.reduced_prior(prior))

    def gate_margin(self, gate: NoiseGate) -> float | Tensor:
        """The margin of each structure of ``gate`` (a number when it is the same for all)."""
        return self.margin

    def score_gate(self, gate):
        return -(self.delta_f(gate) - self.gate_margin(gate))

    def family_score(self, member_scores):
        return member_scores.sum(dim=0)  # delta F of removing the members together


@register_criterion
class BMRSN(EvidenceCriterion):
    """BMRS_N: prune when delta F >= 0 under a log-normal spike at theta ~ 0 (the paper's Eq. 8).

    Args:
        scale: the spike's standard deviation in log space (paper: 1e-6).
    """

    name = "bmrs-n"
    summary = "BMRS_N, exact: delta F >= 0 under a log-normal spike at theta ~ 0"

    def __init__(self, scale: float = 1e-6):
        self.scale = scale

    def reduced_prior(self, prior):
        return bmrs_n_prior(prior, scale=self.scale)

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale:g}, margin={self.margin:g})"


@register_criterion
class BMRSNCode(BMRSN):
    """BMRS_N as the paper's released code computes it: margin -1/2 log(2 pi).

    The code leaves the -1/2 log 2 pi of the reduced prior's density out of delta F, so it
    prunes where delta F + 1/2 log 2 pi >= 0; the 0.919 nats break the tie at delta F ~ 0 of
    structures whose posterior relaxed to the prior, and this is what produced the paper's
    BMRS_N numbers (docs/math.md).
    """

    name = "bmrs-n-code"
    summary = "BMRS_N as the paper's code: delta F >= -1/2 log 2 pi"
    margin = -HALF_LOG_2PI


@register_criterion
class BMRSNRelative(BMRSN):
    """BMRS_N measured against an uninformed posterior: a threshold-free treatment of ties.

    A structure the data do not need ends training with a posterior relaxed towards the
    prior; but the variational family cannot reach the log-uniform prior (its scale is
    capped at ``exp(log_scale_bounds[1])``), so such a posterior keeps a delta F slightly
    below 0 that depends on where its location happened to drift, and the exact criterion
    never removes it. Here the margin of each structure is the delta F of the *uninformed*
    member of the family at the same location, ``q0 = TruncatedLogNormal(loc, scale_max)``:
    prune when

        delta F(q) >= delta F(q0),

    i.e. when the spread the data gave the posterior makes removal no worse than no
    information at all would. A relaxed posterior (scale at its cap) ties exactly and is
    removed, as a structure whose evidence is unchanged by removal costs nothing to remove; a
    confident posterior far from 0 has delta F(q) far below delta F(q0) and is kept; one the
    data pushed to theta ~ 0 is removed. Nothing is tuned: ``q0`` follows from the prior,
    the reduced prior and the family's bounds. (If the family could reach the prior,
    delta F(q0) would be 0 and this would be the exact criterion.)
    """

    name = "bmrs-n-rel"
    summary = "BMRS_N relative to an uninformed posterior: delta F >= delta F(q0)"

    def gate_margin(self, gate):
        prior = gate.prior()
        q = gate.posterior(torch.float64)
        uninformed = TruncatedLogNormal(
            q.loc, torch.full_like(q.loc, math.exp(gate.log_scale_bounds[1])), gate.log_low, gate.log_high,
        )
        return delta_f(uninformed, prior, self.reduced_prior(prior))


@register_criterion
class BMRSNKassRaftery(BMRSN):
    """BMRS_N with ties read on Kass and Raftery's scale of evidence: keep a structure only
    when the evidence for keeping it is at least *positive*.

    ``-delta F`` is the log Bayes factor in favour of keeping the structure. Kass & Raftery
    (1995, JASA 90:773) call ``2 ln B < 2`` "not worth more than a bare mention": below one
    nat, the data do not distinguish the two models. Structures the data do not need end
    training with posteriors that relax towards the prior but stop short of it (the
    optimiser's noise balances the KL's vanishing pull), at delta F between about -0.2 and 0
    (docs/results.md); they are such ties, and removing them costs nothing. So this
    criterion prunes where ``delta F >= -1`` (margin -1): a convention about what counts as
    evidence, fixed before seeing any data, not a threshold tuned per model. (The paper's
    code prunes where ``delta F >= -0.919`` by an accident of a missing constant; the two
    agree on every structure in our runs.)
    """

    name = "bmrs-n-kr"
    summary = "BMRS_N on Kass and Raftery's scale: delta F >= -1"
    margin = -1.0


@register_criterion
class BMRSU(EvidenceCriterion):
    """BMRS_U-p: prune when delta F >= 0 under a log-uniform prior on [log 2^-23, log 2^-bits].

    Labelled ``bmrs-uP`` with P its bits (``bmrs-u8``); sweeps and diagnostics use 8 and 4.
    """

    name = "bmrs-u"
    summary = "BMRS_U-p: delta F >= 0 under a log-uniform reduced prior on [2^-23, 2^-p], p bits"
    needs = ("bits",)
    variants = ({"bits": 8.0}, {"bits": 4.0})
    label_syntax = "bmrs-uP (P bits, e.g. bmrs-u8)"

    def __init__(self, bits: float = 8):
        bmrs_u_prior(bits)  # validates
        self.bits = bits

    def reduced_prior(self, prior):
        return bmrs_u_prior(self.bits, prior)

    @classmethod
    def label(cls, bits: float = 8.0, **options) -> str:
        return f"bmrs-u{float(bits):g}"

    @classmethod
    def parse_label(cls, label):
        match = re.fullmatch(r"bmrs-u(\d+(?:\.\d+)?)?", label)
        if match is None:
            return None
        bits = float(match.group(1)) if match.group(1) else 8.0
        bmrs_u_prior(bits)  # checks the range
        return {"bits": bits}

    @classmethod
    def label_order(cls, options):
        return -float(options.get("bits", 8.0))  # by falling precision

    def __repr__(self):
        return f"BMRSU(bits={self.bits})"


@register_criterion
class ExpectedTheta(_PosteriorCriterion):
    """E[theta] of the posterior (what the gate multiplies by); paper threshold 0.1."""

    name = "etheta"
    summary = "E[theta] of the posterior, threshold 0.1"
    threshold = 0.1

    def __init__(self, threshold: float | None = 0.1):
        self.threshold = threshold

    def score_gate(self, gate):
        return gate.posterior(torch.float64).mean


@register_criterion
class SNR(_PosteriorCriterion):
    """Signal-to-noise ratio E[theta]/std[theta] of the posterior; paper threshold 1."""

    name = "snr"
    summary = "signal-to-noise ratio of the posterior, threshold 1"
    threshold = 1.0

    def __init__(self, threshold: float | None = 1.0):
        self.threshold = threshold

    def score_gate(self, gate):
        return gate.posterior(torch.float64).snr


def _producer_weights(model: nn.Module) -> dict[str, Tensor]:
    """Per gate, the incoming weights of its structures, one row (or more axes) per structure."""
    layout = gate_layout(model)
    return {name: structure_kind(site, model).input_weights(model, site) for name, site in layout.sites.items()}


@register_criterion
class L2(Criterion):
    """L2 norm of each structure's incoming weights (no natural threshold).

    For a channel, the producer's weights into it; for an attention head, its rows of the
    q, k and v projections.
    """

    name = "l2"
    summary = "L2 norm of the incoming weights"

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def structure_scores(self, model):
        return {
            name: weight.detach().double().flatten(1).norm(dim=1)
            for name, weight in _producer_weights(model).items()
        }

    def family_score(self, member_scores):
        return member_scores.pow(2).sum(dim=0).sqrt()  # the norm of all their incoming weights


@register_criterion
class Taylor(Criterion):
    """First-order Taylor estimate of the loss change from removing each structure.

    ``|sum over examples and positions of activation * dLoss/dactivation| / examples``,
    averaged over ``batches`` batches of ``data`` (Molchanov et al., 2017), measured at the
    gates' outputs with the model in eval mode.

    Args:
        data: an iterable of ``(inputs, targets)`` batches, e.g. the training loader.
        loss_fn: the data loss (default cross-entropy).
        batches: how many batches to average over.
    """

    name = "taylor"
    summary = "first-order Taylor estimate of the loss change (needs training data)"
    needs = ("data",)

    def __init__(self, data: Iterable, loss_fn: Callable = F.cross_entropy, batches: int = 8, threshold: float | None = None):
        self.data, self.loss_fn, self.batches, self.threshold = data, loss_fn, batches, threshold

    def structure_scores(self, model):
        named = gates(model)
        sums = {name: torch.zeros(g.num_structures, dtype=torch.float64) for name, g in named.items()}
        captured: dict[str, Tensor] = {}
        handles = []

        def capture(name):
            def hook(module, args, output):
                output.retain_grad()
                captured[name] = output
            return hook

        for name, gate in named.items():
            handles.append(gate.register_forward_hook(capture(name)))
        training = model.training
        model.eval()
        device = next(model.parameters()).device
        count = 0
        try:
            for i, (inputs, targets) in enumerate(self.data):
                if i >= self.batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(inputs.to(device)), targets.to(device))
                loss.backward()
                for name, out in captured.items():
                    axis = named[name].dim % out.dim()
                    # the gradient of the batch's mean loss already carries the 1 / examples
                    prod = (out * out.grad).detach().double()
                    sums[name] += prod.sum(dim=[d for d in range(out.dim()) if d != axis]).abs().cpu()
                count += 1
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
            model.train(training)
        if count == 0:
            raise BMRSError("the Taylor criterion got no batches of data")
        scores = {name: s / count for name, s in sums.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the mean over ranks, reduced where the gates live (NCCL reduces GPU tensors only)
            world = torch.distributed.get_world_size()
            for name, s in scores.items():
                total = s.to(named[name].loc.device)
                torch.distributed.all_reduce(total)
                scores[name] = total.cpu() / world
        return scores

    def family_score(self, member_scores):
        return member_scores.sum(dim=0)


@register_criterion
class Random(Criterion):
    """Uniform random scores from a seeded generator (a sanity baseline)."""

    name = "random"
    summary = "seeded uniform random scores (a sanity baseline)"
    needs = ("seed",)

    def __init__(self, seed: int = 0, threshold: float | None = None):
        self.seed, self.threshold = seed, threshold

    def structure_scores(self, model):
        generator = torch.Generator().manual_seed(self.seed)
        return {
            name: torch.rand(g.num_structures, generator=generator, dtype=torch.float64)
            for name, g in gates(model).items()
        }
