"""Bayesian model reduction: the change in log-evidence when a prior is replaced.

For a posterior ``q`` fitted under prior ``p``, replacing ``p`` by a reduced prior ``p~``
changes the log-evidence (variational free energy) by

    delta_f = log integral q(x) p~(x) / p(x) dx,

and a structure is pruned when ``delta_f`` reaches a margin (0 for BMRS_N and BMRS_U).

Closed forms are registered per pair of (posterior type, reduced-prior type) with
:func:`register_delta_f`, as ``torch.distributions.register_kl`` registers KL divergences:
a truncated log-normal posterior with the two reduced-prior families of BMRS (a truncated
log-normal spike, BMRS_N, and a narrower log-uniform, BMRS_U), and a log-uniform posterior
(e.g. one equal to the prior) with both. :func:`delta_f` uses the closed form of the most
specific registered pair; for a truncated log-normal posterior and any other reduced prior
with a ``log_prob`` it integrates numerically (:func:`delta_f_quadrature`). Everything is
computed in float64, whatever the inputs' dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from .errors import BMRSError
from .math import special as sp
from .math.distributions import LogUniform, TruncatedLogNormal

__all__ = ["delta_f", "delta_f_quadrature", "register_delta_f", "closed_form", "bmrs_n_prior", "bmrs_u_prior", "DEFAULT_PRIOR"]

#: The paper's prior on log theta: uniform on [-20, 0].
DEFAULT_PRIOR = (-20.0, 0.0)
_LOG_2_POW_MINUS_23 = -23.0 * math.log(2.0)

_QUAD_NODES, _QUAD_WEIGHTS = np.polynomial.legendre.leggauss(32)
# Breakpoints of the quadrature, in standard deviations around every known concentration.
_QUAD_SPREAD = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 40.0)
_QUAD_LADDER = range(0, 16)


def _f64(d: Distribution) -> Distribution:
    """The same distribution with float64 parameters."""
    if isinstance(d, TruncatedLogNormal):
        return TruncatedLogNormal(*(t.double() for t in (d.loc, d.scale, d.log_low, d.log_high)), validate_args=False)
    if isinstance(d, LogUniform):
        return LogUniform(d.log_low.double(), d.log_high.double(), validate_args=False)
    return d


def _default_prior(prior):
    return LogUniform(*DEFAULT_PRIOR) if prior is None else prior


def bmrs_n_prior(prior: LogUniform | None = None, *, loc: float | None = None, scale: float = 1e-6) -> TruncatedLogNormal:
    """The BMRS_N reduced prior: a log-normal spike, by default at the prior's lower bound.

    Args:
        prior: the original log-uniform prior (default: the paper's ``[-20, 0]``).
        loc: centre of the spike in log space (default: ``prior.log_low``, i.e. theta ~ 0).
        scale: its standard deviation in log space (paper: ``1e-6``).
    """
    prior = _default_prior(prior)
    if not isinstance(prior, LogUniform):
        raise TypeError(f"prior must be a LogUniform, got {type(prior).__name__}")
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise BMRSError(f"scale of the BMRS_N reduced prior must be a positive number, got {scale!r}")
    centre = prior.log_low.double() if loc is None else torch.as_tensor(loc, dtype=torch.float64)
    if not bool(torch.isfinite(centre).all()):
        raise BMRSError(f"loc of the BMRS_N reduced prior must be finite, got {loc!r}")
    return TruncatedLogNormal(centre, scale, prior.log_low.double(), prior.log_high.double())


def bmrs_u_prior(bits: float = 8, prior: LogUniform | None = None, *, log_low: float = _LOG_2_POW_MINUS_23) -> LogUniform:
    """The BMRS_U-p reduced prior: log-uniform on ``[log 2^-23, log 2^-bits]``.

    ``bits`` is the precision p; fewer bits prune more. The upper bound ``log 2^-bits`` must
    lie above ``log_low`` (so ``bits < 23`` by default) and within the prior.
    """
    prior = _default_prior(prior)
    if not isinstance(prior, LogUniform):
        raise TypeError(f"prior must be a LogUniform, got {type(prior).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not math.isfinite(bits):
        raise BMRSError(f"bits must be a finite number, got {bits!r}")
    high = -float(bits) * math.log(2.0)
    lo_p, hi_p = float(prior.log_low.min()), float(prior.log_high.max())
    if not lo_p <= log_low < hi_p:
        raise BMRSError(f"log_low={log_low:.6g} of the BMRS_U reduced prior lies outside the prior's [{lo_p:.6g}, {hi_p:.6g}]")
    if not log_low < high <= hi_p:
        max_bits = -log_low / math.log(2.0)
        min_bits = -hi_p / math.log(2.0)
        raise BMRSError(
            f"bits={bits} is out of range: the reduced prior's upper bound log 2^-bits must lie in "
            f"(log_low, prior's log_high], i.e. {min_bits:.6g} <= bits < {max_bits:.6g}"
        )
    return LogUniform(torch.tensor(float(log_low), dtype=torch.float64), torch.tensor(high, dtype=torch.float64))


def _check_nested(inner: Distribution, outer: LogUniform, what: str) -> None:
    if isinstance(inner, (TruncatedLogNormal, LogUniform)):
        if not bool(((inner.log_low >= outer.log_low) & (inner.log_high <= outer.log_high)).all()):
            raise BMRSError(
                f"the {what}'s bounds must lie within the prior's [log_low, log_high]; "
                f"delta_f is undefined otherwise"
            )


#: Closed forms of delta F by (posterior type, reduced-prior type).
_CLOSED_FORMS: dict[tuple[type, type], Callable[[Distribution, LogUniform, Distribution], Tensor]] = {}


def register_delta_f(posterior_type: type, reduced_prior_type: type):
    """Decorator that registers a closed form of delta F for a pair of distribution types.

    The function is called as ``fn(posterior, prior, reduced_prior)`` with float64 copies
    of the three (the prior a :class:`LogUniform`, both bounds checked to nest in it) and
    returns delta F per batch element as a float64 tensor. :func:`delta_f` uses the closed
    form of the most specific registered pair (the nearest classes in the two types' method
    resolution orders), as ``torch.distributions.register_kl`` does::

        @register_delta_f(TruncatedLogNormal, MyReducedPrior)
        def _delta_f_mine(q, p, r):
            ...
    """
    if not (isinstance(posterior_type, type) and isinstance(reduced_prior_type, type)):
        raise TypeError(f"register_delta_f takes two classes, got {posterior_type!r} and {reduced_prior_type!r}")

    def decorator(fn):
        _CLOSED_FORMS[posterior_type, reduced_prior_type] = fn
        _dispatch.cache_clear()
        return fn

    return decorator


@lru_cache(maxsize=None)
def _dispatch(posterior_type: type, reduced_prior_type: type):
    matches = [
        (p, r) for p, r in _CLOSED_FORMS if issubclass(posterior_type, p) and issubclass(reduced_prior_type, r)
    ]
    if not matches:
        return None
    rank = lambda m: (posterior_type.__mro__.index(m[0]), reduced_prior_type.__mro__.index(m[1]))  # noqa: E731
    best = min(matches, key=rank)
    if any(m != best and rank(m)[1] < rank(best)[1] for m in matches):
        raise TypeError(
            f"ambiguous closed forms of delta F for ({posterior_type.__name__}, {reduced_prior_type.__name__}): "
            f"{', '.join(f'({p.__name__}, {r.__name__})' for p, r in matches)}; register this pair explicitly"
        )
    return _CLOSED_FORMS[best]


def closed_form(posterior: Distribution, reduced_prior: Distribution):
    """The registered closed form of delta F for these two distributions' types, or None."""
    return _dispatch(type(posterior), type(reduced_prior))


def delta_f(
    posterior: TruncatedLogNormal,
    prior: LogUniform,
    reduced_prior: Distribution,
    *,
    method: str = "auto",
    breakpoints: Sequence[float] = (),
) -> Tensor:
    """Change in log-evidence ``delta_f`` for each element of the posterior's batch.

    Args:
        posterior: the fitted :class:`TruncatedLogNormal` of each structure (or a
            :class:`LogUniform`, e.g. to check that a posterior equal to the prior gives 0).
        prior: the :class:`LogUniform` prior the posterior was fitted under.
        reduced_prior: the candidate prior. A pair of types with a closed form registered
            by :func:`register_delta_f` (a :class:`TruncatedLogNormal`, BMRS_N, or a
            :class:`LogUniform`, BMRS_U) uses it; for a :class:`TruncatedLogNormal`
            posterior, any other reduced prior with a ``log_prob`` over theta is integrated
            numerically.
        method: ``"auto"`` (closed form where one exists), ``"closed"`` or ``"quadrature"``
            (a truncated log-normal posterior only; other posteriors use their closed form).
        breakpoints: discontinuities of a custom reduced prior in ``log theta``, passed to
            :func:`delta_f_quadrature`.

    Returns:
        float64 tensor of the broadcast batch shape. ``delta_f >= 0`` means the reduced
        model is at least as likely.

    Raises:
        BMRSError: bounds that do not nest in the prior's, an unknown ``method``, or
            ``method="closed"`` where no closed form is registered.
        NotImplementedError: no closed form is registered for the pair and the posterior
            is not a truncated log-normal, which quadrature needs.
    """
    if method not in ("auto", "closed", "quadrature"):
        raise BMRSError(f"method must be 'auto', 'closed' or 'quadrature', got {method!r}")
    if not isinstance(prior, LogUniform):
        raise TypeError(f"prior must be a LogUniform, got {type(prior).__name__}")
    _check_nested(posterior, prior, "posterior")
    _check_nested(reduced_prior, prior, "reduced prior")
    form = closed_form(posterior, reduced_prior)  # of the given types (float64 copies are of the base types)
    posterior, prior, reduced_prior = _f64(posterior), _f64(prior), _f64(reduced_prior)
    numerical = isinstance(posterior, TruncatedLogNormal)
    if method == "quadrature" and numerical:
        return delta_f_quadrature(posterior, prior, reduced_prior, breakpoints=breakpoints)
    if form is not None:
        return form(posterior, prior, reduced_prior)
    if method == "closed":
        raise BMRSError(
            f"no closed form for a reduced prior of type {type(reduced_prior).__name__} "
            f"and a posterior of type {type(posterior).__name__}"
        )
    if numerical:
        return delta_f_quadrature(posterior, prior, reduced_prior, breakpoints=breakpoints)
    raise NotImplementedError(
        f"no closed form of delta F is registered for a {type(posterior).__name__} posterior and a "
        f"{type(reduced_prior).__name__} reduced prior (see register_delta_f), and quadrature needs a "
        "TruncatedLogNormal posterior"
    )


def _flat_posterior(q: LogUniform, p: LogUniform, lo: Tensor, hi: Tensor, log_mass: Tensor) -> Tensor:
    """For a log-uniform posterior ``q`` (e.g. one equal to the prior):
    ``log((b - a)/(b_q - a_q)) + log r(a_q <= x <= b_q)``, given the log of that reduced-prior
    mass on the overlap ``[lo, hi]``; 0 when ``q = p``."""
    value = torch.log(p.width) - torch.log(q.width) + log_mass
    return torch.where(lo < hi, value, -math.inf)


@register_delta_f(LogUniform, LogUniform)
def _delta_f_flat_log_uniform(q: LogUniform, p: LogUniform, r: LogUniform) -> Tensor:
    lo, hi = _overlap(q, r)
    return _flat_posterior(q, p, lo, hi, torch.log(torch.clamp(hi - lo, min=0.0)) - torch.log(r.width))


@register_delta_f(LogUniform, TruncatedLogNormal)
def _delta_f_flat_log_normal(q: LogUniform, p: LogUniform, r: TruncatedLogNormal) -> Tensor:
    lo, hi = _overlap(q, r)
    return _flat_posterior(q, p, lo, hi, sp.log_ndtr_diff((lo - r.loc) / r.scale, (hi - r.loc) / r.scale) - r.log_normalizer)


def _overlap(posterior: Distribution, reduced: Distribution) -> tuple[Tensor, Tensor]:
    return torch.maximum(posterior.log_low, reduced.log_low), torch.minimum(posterior.log_high, reduced.log_high)


def _tail_bound(lo: Tensor, hi: Tensor, reg: Tensor) -> Tensor:
    """The bound whose standardised square is the quadratic part of ``log Z`` (0: none)."""
    return torch.where(reg == sp.LOWER, hi, torch.where(reg == sp.UPPER, lo, torch.zeros_like(lo)))


@register_delta_f(TruncatedLogNormal, LogUniform)
def _delta_f_log_uniform(q: TruncatedLogNormal, p: LogUniform, r: LogUniform) -> Tensor:
    """``log q(a' <= x <= b') - log((b' - a') / (b - a))``."""
    mu, sigma = q.loc, q.scale
    lo_x, hi_x = _overlap(q, r)
    lo, hi = (lo_x - mu) / sigma, (hi_x - mu) / sigma
    rest_r, reg_r = sp.log_z_parts(lo, hi)
    rest, reg = q._log_z_parts
    # quad_r - quad with both quadratic parts written around bounds X_r, X:
    # -((X_r - mu)^2 - (X - mu)^2) / (2 sigma^2) = -(X_r - X)(X_r + X - 2 mu) / (2 sigma^2)
    x_r = _tail_bound(lo_x, hi_x, reg_r)
    x_q = _tail_bound(q.log_low, q.log_high, reg)
    both = (reg_r != sp.CENTRAL) & (reg != sp.CENTRAL)
    quad = torch.where(
        both,
        -0.5 * ((x_r - x_q) / sigma) * ((x_r + x_q - 2.0 * mu) / sigma),
        sp.quad_part(lo, hi, reg_r) - sp.quad_part(q.alpha, q.beta, reg),
    )
    value = quad + rest_r - rest + torch.log(p.width) - torch.log(r.width)
    return torch.where(lo_x < hi_x, value, -math.inf)


@register_delta_f(TruncatedLogNormal, TruncatedLogNormal)
def _delta_f_log_normal(q: TruncatedLogNormal, p: LogUniform, r: TruncatedLogNormal) -> Tensor:
    """``log(b - a) + log N(mu; m, v) + log Z~ - log Z - log Z_r`` (docs/math.md, BMRS_N).

    The Gaussian product ``N(x; mu, s^2) N(x; m, s_r^2) = N(mu; m, v) N(x; mu~, s~^2)`` makes the
    integrand a truncated normal; its quadratic parts are recombined with the identity
    ``(X-mu)^2/s^2 + (X-m)^2/s_r^2 = (X-mu~)^2/s~^2 + (mu-m)^2/v`` at the tail bound X, so that
    no two huge numbers are subtracted.
    """
    mu, sigma = q.loc, q.scale
    m, s = r.loc, r.scale
    v = sigma * sigma + s * s
    root_v = torch.sqrt(v)
    lo_x, hi_x = _overlap(q, r)

    def standardised(x: Tensor) -> Tensor:
        # (x - mu~)/s~ = ((x - mu)/sigma) (s/sqrt v) + ((x - m)/s) (sigma/sqrt v): the spike's
        # centre mu~ ~ m is never formed, so a bound at m stays exactly 0.
        return ((x - mu) / sigma) * (s / root_v) + ((x - m) / s) * (sigma / root_v)

    lo_t, hi_t = standardised(lo_x), standardised(hi_x)
    rest_t, reg_t = sp.log_z_parts(lo_t, hi_t)
    rest, reg = q._log_z_parts
    x_t = _tail_bound(lo_x, hi_x, reg_t)
    x_q = _tail_bound(q.log_low, q.log_high, reg)
    q_tail = reg != sp.CENTRAL
    # -(mu - m)^2/(2v) + quad_t - quad, three ways depending on which normalisers are in a tail.
    when_t_tail = -0.5 * ((x_t - m) / s) ** 2 + torch.where(
        q_tail,
        -0.5 * ((x_t - x_q) / sigma) * ((x_t + x_q - 2.0 * mu) / sigma),
        -0.5 * ((x_t - mu) / sigma) ** 2,
    )
    when_t_central = -0.5 * (mu - m) ** 2 / v - sp.quad_part(q.alpha, q.beta, reg)
    quad = torch.where(reg_t != sp.CENTRAL, when_t_tail, when_t_central)
    log_z_r = sp.log_ndtr_diff((r.log_low - m) / s, (r.log_high - m) / s)
    value = torch.log(p.width) - 0.5 * torch.log(2.0 * math.pi * v) + quad + rest_t - rest - log_z_r
    return torch.where(lo_x < hi_x, value, -math.inf)


def _breakpoints(d: Distribution, sigma: Tensor) -> list[Tensor]:
    """Quadrature breakpoints for ``d``: many widths around a log-normal's centre, and a
    geometric ladder (steps ``sigma * 4^-k``) on both sides of every bound, where the
    integrand can be squeezed into a sliver of width ``sigma**2 / distance``."""
    points, bounds = [], []
    if isinstance(d, TruncatedLogNormal):
        points += [d.loc + k * d.scale for k in _QUAD_SPREAD] + [d.loc - k * d.scale for k in _QUAD_SPREAD[1:]]
    if isinstance(d, (TruncatedLogNormal, LogUniform)):
        bounds += [d.log_low, d.log_high]
    else:  # another distribution over theta: the bounds of its support, where it has them
        support = getattr(d, "support", None)
        for name in ("lower_bound", "upper_bound"):
            bound = getattr(support, name, None)
            if bound is not None and bool((torch.as_tensor(bound) > 0).all()):
                bounds.append(torch.log(torch.as_tensor(bound, dtype=torch.float64)))
    return points + _ladder(bounds, sigma)


def _ladder(centres: list[Tensor], sigma: Tensor) -> list[Tensor]:
    points = []
    for centre in centres:
        centre = torch.as_tensor(centre, dtype=torch.float64)
        points.append(centre)
        points += [centre + sign * sigma * 4.0**-k for k in _QUAD_LADDER for sign in (-1.0, 1.0)]
    return points


def delta_f_quadrature(
    posterior: TruncatedLogNormal,
    prior: Distribution,
    reduced_prior: Distribution,
    *,
    breakpoints: Sequence[float] = (),
) -> Tensor:
    """``delta_f`` by composite Gauss-Legendre quadrature in ``x = log theta``.

    Works for any prior and reduced prior with a ``log_prob`` over theta that returns
    ``-inf`` (not an error) outside its support. Panels are split at many standard
    deviations around the posterior and around any truncated log-normal's centre, and on a
    geometric ladder next to every bound, so spikes as narrow as ``1e-9`` in log space and
    mass squeezed against a bound are resolved. A second pass adds the same ladder around
    the integrand's largest node, where a product of two narrow densities may peak between
    them. Sums in log space.

    Args:
        breakpoints: values of ``log theta`` where a custom density jumps or kinks (for
            example the edge of a mixture component). Gauss-Legendre assumes a smooth
            integrand inside each panel; bounds of our own distributions and of a
            ``support`` interval are found automatically.
    """
    posterior = _f64(posterior)
    sigma = posterior.scale
    points = _breakpoints(posterior, sigma) + _breakpoints(prior, sigma) + _breakpoints(reduced_prior, sigma)
    points += _ladder([torch.tensor(float(p), dtype=torch.float64) for p in breakpoints], sigma)
    x, log_terms = _quadrature_terms(posterior, prior, reduced_prior, points)
    peak = torch.gather(x, 0, log_terms.argmax(dim=0, keepdim=True)).squeeze(0)
    points += [peak + k * sigma for k in _QUAD_SPREAD] + [peak - k * sigma for k in _QUAD_SPREAD[1:]]
    points += [peak + sign * sigma * 4.0**-k for k in _QUAD_LADDER for sign in (-1.0, 1.0)]
    _, log_terms = _quadrature_terms(posterior, prior, reduced_prior, points)
    return torch.logsumexp(log_terms, dim=0)


def _quadrature_terms(posterior, prior, reduced_prior, points: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Nodes and log(weight * integrand) of the composite rule on the given breakpoints,
    both shaped ``(nodes, *batch)``."""
    a, b = posterior.log_low, posterior.log_high
    points = torch.stack(torch.broadcast_tensors(*points), dim=0)
    batch = torch.broadcast_shapes(posterior.batch_shape, points.shape[1:])
    points = torch.sort(torch.clamp(points.expand((points.shape[0],) + batch), a, b), dim=0).values
    left, right = points[:-1], points[1:]  # (panels, *batch)
    nodes = torch.as_tensor(_QUAD_NODES, dtype=torch.float64)
    weights = torch.as_tensor(_QUAD_WEIGHTS, dtype=torch.float64)
    view = (1, -1) + (1,) * len(batch)
    half = (0.5 * (right - left)).unsqueeze(1)
    x = (0.5 * (right + left)).unsqueeze(1) + half * nodes.view(view)  # (panels, nodes, *batch)
    log_w = torch.log(half * weights.view(view))
    log_f = _log_density_of_log(posterior, x) + _log_density_of_log(reduced_prior, x) - _log_density_of_log(prior, x)
    return x.flatten(0, 1), (log_w + log_f).flatten(0, 1)


def _log_density_of_log(d: Distribution, x: Tensor) -> Tensor:
    """Log density of ``x = log theta`` under ``d`` (a distribution over theta).

    Our distributions evaluate it directly: going through ``theta = exp(x)`` would round
    ``x`` near 0 to an ulp of 1, far coarser than a posterior squeezed against the bound."""
    if isinstance(d, (TruncatedLogNormal, LogUniform)):
        return d.log_prob_log(x)
    return d.log_prob(torch.exp(x)) + x
