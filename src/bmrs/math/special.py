"""Log-space special functions for the standard normal truncated to ``[lo, hi]``.

Everything here works on *standardised* bounds ``lo < hi`` (``(bound - mu) / sigma``) and
stays finite, with finite gradients, however far the interval lies in a tail of N(0, 1).

The naive formulas fail because ``Z = Phi(hi) - Phi(lo)`` underflows once the interval is a
few dozen standard deviations from zero. Three regimes are handled separately:

* **lower tail** (``hi <= -1``): work relative to ``log Phi(hi)`` and write
  ``log Phi(x) = -x**2/2 + log(erfcx(-x/sqrt 2)/2)``, so that the huge quadratic parts can
  be cancelled analytically by the caller;
* **upper tail** (``lo >= 1``): mirror to the lower tail (``x -> -x``);
* **central** (otherwise): ``Z`` is not small, direct formulas are accurate.

In the tails the quantities that cancel (``w*h``, the variance of the truncated normal) are
expressed with ``h(w) = 1/(sqrt(pi)*erfcx(w)) - w``, the tail of the Laplace continued
fraction of ``erfc``, which is accurate for every ``w >= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

SQRT2 = math.sqrt(2.0)
SQRT_PI = math.sqrt(math.pi)
LOG_2SQRT_PI = math.log(2.0 * SQRT_PI)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)
LN2 = math.log(2.0)

# Below _W_CF, h(w) comes from erfcx directly (relative error about 2*eps*w**2 <= 2e-14);
# above it from the continued fraction truncated after _CF_TERMS partial fractions, which
# reaches double precision for w >= 6 (checked against mpmath in the tests).
_W_CF = 6.0
_CF_TERMS = 16

_NARROW_NODES, _NARROW_WEIGHTS = (v.tolist() for v in np.polynomial.legendre.leggauss(20))

# Regimes returned by :func:`regime`, and where the tails start.
_TAIL = 1.0
LOWER, CENTRAL, UPPER = -1, 0, 1


def piecewise(
    conditions: Sequence[Tensor],
    functions: Sequence[Callable[..., Tensor | tuple[Tensor, ...]]],
    *args: Tensor,
) -> Tensor | tuple[Tensor, ...]:
    """Evaluate ``functions[i](*args)`` only where ``conditions[i]`` holds.

    The conditions must be disjoint and cover every element. Each function sees just its own
    elements, so a branch that would overflow elsewhere never runs there, and its gradient
    never turns into ``0 * inf = nan``. Functions may return a tensor or a tuple of tensors.
    """
    args = torch.broadcast_tensors(*args)
    shape = args[0].shape
    flat = [a.reshape(-1) for a in args]
    total = flat[0].numel()
    outputs: list[Tensor] | None = None
    single = True
    for cond, fn in zip(conditions, functions):
        cond = cond.expand(shape).reshape(-1)
        count = int(cond.sum())
        if count == 0:
            continue
        if count == total:  # one branch holds everything: no gather or scatter
            result = fn(*flat)
            single = isinstance(result, Tensor)
            outputs = [result] if single else list(result)
            break
        index = cond.nonzero().squeeze(1)
        result = fn(*(a.index_select(0, index) for a in flat))
        single = isinstance(result, Tensor)
        parts = (result,) if single else tuple(result)
        if outputs is None:
            outputs = [flat[0].new_zeros(total, dtype=p.dtype) for p in parts]
        outputs = [o.index_put((index,), p) for o, p in zip(outputs, parts)]
    if outputs is None:  # no elements at all
        outputs = [flat[0].new_zeros(total)]
    outputs = [o.reshape(shape) for o in outputs]
    return outputs[0] if single else tuple(outputs)


def regime(lo: Tensor, hi: Tensor) -> Tensor:
    """``LOWER`` where ``hi <= -1``, ``UPPER`` where ``lo >= 1``, else ``CENTRAL``.

    The tail formulas hold for any ``hi <= 0``; the central ones lose no accuracy while
    ``Z >= Phi(-1)``, and are several times cheaper, so the tails start one unit out.
    """
    return torch.where(hi <= -_TAIL, LOWER, torch.where(lo >= _TAIL, UPPER, CENTRAL))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``."""
    near = x > -LN2
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


def mills_h(w: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(h, g)`` for ``w >= 0`` with ``sqrt(pi)*erfcx(w) = 1/(w + h)``, ``h = 1/(2(w + g))``.

    ``h`` and ``g`` are the tails of the continued fraction
    ``sqrt(pi)*erfcx(w) = 1/(w + (1/2)/(w + 1/(w + (3/2)/(w + ...))))``. For large ``w``,
    ``h ~ 1/(2w)`` and ``g ~ 1/w``; both are computed without cancellation.
    """
    small = w < _W_CF

    def direct(ws: Tensor) -> tuple[Tensor, Tensor]:
        h = 1.0 / (SQRT_PI * torch.special.erfcx(ws)) - ws
        return h, 0.5 / h - ws

    def continued_fraction(wl: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.zeros_like(wl)
        for n in range(_CF_TERMS, 1, -1):
            t = (0.5 * n) / (wl + t)
        return 0.5 / (wl + t), t

    return piecewise((small, ~small), (direct, continued_fraction), w)


def _lower_tail_core(lo: Tensor, hi: Tensor):
    """Shared pieces for an interval in the lower tail (``hi <= 0``).

    Returns ``w, h, g, rest, d, lam, rho, eta`` where ``log Z = -hi**2/2 + rest``,
    ``d = log Phi(lo) - log Phi(hi)``, ``lam = phi(hi)/Phi(hi)``, ``rho = exp(d)`` and
    ``eta = phi(lo)/phi(hi)``.
    """
    w = -hi / SQRT2
    w_lo = -lo / SQRT2
    h, g = mills_h(w)
    h_lo, _ = mills_h(w_lo)
    log_phi_rest_hi = -LOG_2SQRT_PI - torch.log(w + h)
    log_phi_rest_lo = -LOG_2SQRT_PI - torch.log(w_lo + h_lo)
    half_sq_diff = 0.5 * (hi - lo) * (hi + lo)  # (hi**2 - lo**2)/2 <= 0
    d = half_sq_diff + log_phi_rest_lo - log_phi_rest_hi
    rest = log_phi_rest_hi + log1mexp(d)
    lam = SQRT2 * (w + h)
    return w, h, g, rest, d, lam, torch.exp(d), torch.exp(half_sq_diff)


def _central_log_z(lo: Tensor, hi: Tensor) -> Tensor:
    # Z from the kept mass (erf terms of equal sign where lo < 0 < hi) or, when Z is near 1,
    # as log1p of minus the two cut-off tails, so that log Z ~ -1e-7 keeps its digits.
    outside = 0.5 * (torch.special.erfc(-lo / SQRT2) + torch.special.erfc(hi / SQRT2))
    inside = 0.5 * (torch.erf(hi / SQRT2) + torch.erf(-lo / SQRT2))
    return torch.where(outside < 0.5, torch.log1p(-torch.clamp(outside, max=0.5)), torch.log(inside))


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x - HALF_LOG_2PI)


def log_z_parts(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``log(Phi(hi) - Phi(lo)) = quad + rest``; returns ``(rest, regime)``.

    ``quad`` is ``-hi**2/2`` in the lower tail, ``-lo**2/2`` in the upper tail and 0 in the
    centre. Callers combine quadratic parts of several normalisers analytically.
    """
    reg = regime(lo, hi)

    def lower(lo_: Tensor, hi_: Tensor) -> Tensor:
        return _lower_tail_core(lo_, hi_)[3]

    def upper(lo_: Tensor, hi_: Tensor) -> Tensor:
        return _lower_tail_core(-hi_, -lo_)[3]

    rest = piecewise((reg == LOWER, reg == CENTRAL, reg == UPPER), (lower, _central_log_z, upper), lo, hi)
    return rest, reg


def quad_part(lo: Tensor, hi: Tensor, reg: Tensor) -> Tensor:
    """The quadratic part that :func:`log_z_parts` left out."""
    return torch.where(reg == LOWER, -0.5 * hi * hi, torch.where(reg == UPPER, -0.5 * lo * lo, 0.0))


def log_ndtr_diff(lo: Tensor, hi: Tensor) -> Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi``, stable in both tails."""
    rest, reg = log_z_parts(lo, hi)
    return rest + quad_part(lo, hi, reg)


def truncnorm_entropy(lo: Tensor, hi: Tensor) -> Tensor:
    """Differential entropy of N(0, 1) truncated to ``[lo, hi]``.

    ``1/2 log(2 pi e) + log Z + (lo phi(lo) - hi phi(hi)) / (2 Z)``, with the cancelling
    ``-hi**2/2`` and ``-hi phi(hi)/(2Z)`` of the tails combined into ``w*h(w)``.
    """

    def lower(lo_: Tensor, hi_: Tensor) -> Tensor:
        w, h, _, rest, _, lam, rho, eta = _lower_tail_core(lo_, hi_)
        return HALF_LOG_2PI_E + rest + w * h + lam * (lo_ * eta - hi_ * rho) / (2.0 * (1.0 - rho))

    def central(lo_: Tensor, hi_: Tensor) -> Tensor:
        log_z = _central_log_z(lo_, hi_)
        z = torch.exp(log_z)
        return HALF_LOG_2PI_E + log_z + (lo_ * _phi(lo_) - hi_ * _phi(hi_)) / (2.0 * z)

    reg = regime(lo, hi)
    return piecewise(
        (reg == LOWER, reg == CENTRAL, reg == UPPER),
        (lower, central, lambda lo_, hi_: lower(-hi_, -lo_)),
        lo,
        hi,
    )


def truncnorm_variance(lo: Tensor, hi: Tensor) -> Tensor:
    """Variance of N(0, 1) truncated to ``[lo, hi]``, relative accuracy kept in the tails.

    In the lower tail the one-sided variance ``1 - hi*lam - lam**2`` equals
    ``(g - h)/(w + g)`` exactly; the two-sided correction terms are added to it.
    """

    def lower(lo_: Tensor, hi_: Tensor) -> Tensor:
        w, h, g, _, _, lam, rho, eta = _lower_tail_core(lo_, hi_)
        one_m_rho = 1.0 - rho
        return (
            (g - h) / (w + g)
            + lam * (lo_ * eta - hi_ * rho) / one_m_rho
            - lam * lam * (rho - eta) * (2.0 - eta - rho) / (one_m_rho * one_m_rho)
        )

    def central(lo_: Tensor, hi_: Tensor) -> Tensor:
        z = torch.exp(_central_log_z(lo_, hi_))
        p_lo, p_hi = _phi(lo_) / z, _phi(hi_) / z
        return 1.0 + lo_ * p_lo - hi_ * p_hi - (p_lo - p_hi) ** 2

    def narrow(lo_: Tensor, hi_: Tensor) -> Tensor:
        # On an interval short against 1/|bound| the density exp(-xi^2/2) is nearly a tilted
        # uniform: Gauss-Legendre in y = xi - centre is exact to rounding, and its mean is
        # small against its spread, so the moments do not cancel.
        nodes = torch.as_tensor(_NARROW_NODES, dtype=lo_.dtype, device=lo_.device)
        weights = torch.as_tensor(_NARROW_WEIGHTS, dtype=lo_.dtype, device=lo_.device)
        centre, half = (0.5 * (lo_ + hi_)).unsqueeze(-1), (0.5 * (hi_ - lo_)).unsqueeze(-1)
        y = half * nodes
        w = weights * torch.exp(-centre * y - 0.5 * y * y)
        w = w / w.sum(-1, keepdim=True)
        m = (w * y).sum(-1, keepdim=True)
        return (w * (y - m) ** 2).sum(-1)

    reg = regime(lo, hi)
    is_narrow = (hi - lo) * torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1.0) <= 1.0
    return piecewise(
        (is_narrow, ~is_narrow & (reg == LOWER), ~is_narrow & (reg == CENTRAL), ~is_narrow & (reg == UPPER)),
        (narrow, lower, central, lambda lo_, hi_: lower(-hi_, -lo_)),
        lo,
        hi,
    )


def truncnorm_mean_offset(lo: Tensor, hi: Tensor) -> Tensor:
    """``E[hi - xi]`` for xi ~ N(0, 1) truncated to ``[lo, hi]`` with ``hi <= 0``.

    Measured from the bound that holds the mass, so it keeps relative accuracy when the
    distribution is a sliver next to that bound.
    """
    _, h, _, _, _, lam, rho, eta = _lower_tail_core(lo, hi)
    return SQRT2 * h + lam * (rho - eta) / (1.0 - rho)


def truncnorm_mean(lo: Tensor, hi: Tensor) -> Tensor:
    """``E[xi]`` for xi ~ N(0, 1) truncated to ``[lo, hi]`` (central regime formula)."""
    z = torch.exp(_central_log_z(lo, hi))
    return (_phi(lo) - _phi(hi)) / z


def lower_tail_log_cdf_ratio(hi: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``G(t) = log Phi(hi - t) - log Phi(hi)`` and ``G'(t)`` for ``hi <= 0``, ``t >= 0``.

    ``G(t) = t*hi - t**2/2 + log erfcx(w + t/sqrt 2) - log erfcx(w)``: the quadratic parts
    cancel analytically; the erfcx ratio is a small correction.
    """
    x = hi - t
    ex_hi = torch.special.erfcx(-hi / SQRT2)
    ex_x = torch.special.erfcx(-x / SQRT2)
    value = t * hi - 0.5 * t * t + torch.log(ex_x / ex_hi)
    slope = -math.sqrt(2.0 / math.pi) / ex_x  # -phi(x)/Phi(x)
    return value, slope
