"""Truncated log-normal and log-uniform distributions of a positive noise variable theta.

Both are distributions over ``theta > 0``; their parameters live in log space
(``x = log theta``). They follow ``torch.distributions``: batch shapes broadcast, ``rsample``
is reparameterised, ``validate_args`` checks the parameters. ``log_prob`` returns ``-inf``
outside the support instead of raising, which is what Bayesian model reduction needs when a
reduced prior is narrower than the posterior.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all, lazy_property

from . import special as sp
from ..errors import BMRSError

__all__ = ["TruncatedLogNormal", "LogUniform"]

# log E[theta^2] - 2 log E[theta] below this switches to the quadrature of the tilted
# variances (see TruncatedLogNormal._log_var_ratio).
_DELTA_SWITCH = 1e-2
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_NEWTON_STEPS = 6


def _broadcast(*values) -> tuple[Tensor, ...]:
    """``broadcast_all``, except that Python numbers alone give float64 tensors.

    torch's default float32 would round a bound such as ``log 2**-23`` by ~4e-7; for a
    posterior of scale ``sigma`` a distance ``d`` from that bound, delta F moves by about
    ``d * 4e-7 / sigma**2``, i.e. nats for sigma ~ 1e-4. With a tensor among the values,
    the numbers take its dtype, as in torch.distributions.
    """
    if not any(isinstance(v, Tensor) for v in values):
        values = tuple(torch.as_tensor(v, dtype=torch.float64) for v in values)
    return broadcast_all(*values)


def _check_bounds(log_low: Tensor, log_high: Tensor) -> None:
    if not bool((log_low < log_high).all()):
        raise BMRSError(
            f"log_low must be smaller than log_high, got log_low={log_low.tolist()} "
            f"and log_high={log_high.tolist()}"
        )


class TruncatedLogNormal(Distribution):
    r"""theta with ``log theta ~ N(loc, scale**2)`` truncated to ``[log_low, log_high]``.

    The BMRS variational posterior of a noise gate. All moments and the entropy are
    computed in log space and stay finite and accurate far in the tails of the normal
    (e.g. ``loc = 10``, ``scale = exp(-20)``), where the textbook formulas divide 0 by 0.

    Args:
        loc: mean of the untruncated normal of ``log theta``.
        scale: its standard deviation (> 0).
        log_low, log_high: truncation bounds of ``log theta`` (``log_low < log_high``).

    Parameters given as Python numbers only are stored in float64 (not torch's default
    float32); with a tensor among them they take its dtype.
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "log_low": constraints.real,
        "log_high": constraints.real,
    }
    has_rsample = True

    def __init__(self, loc, scale, log_low=-20.0, log_high=0.0, validate_args=None):
        self.loc, self.scale, self.log_low, self.log_high = _broadcast(loc, scale, log_low, log_high)
        super().__init__(self.loc.shape, validate_args=validate_args)
        if self._validate_args:
            _check_bounds(self.log_low, self.log_high)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedLogNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("loc", "scale", "log_low", "log_high"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(TruncatedLogNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(torch.exp(self.log_low), torch.exp(self.log_high))

    # --- standardised bounds and the normaliser -------------------------------------------
    @lazy_property
    def alpha(self) -> Tensor:
        """``(log_low - loc) / scale``."""
        return (self.log_low - self.loc) / self.scale

    @lazy_property
    def beta(self) -> Tensor:
        """``(log_high - loc) / scale``."""
        return (self.log_high - self.loc) / self.scale

    @lazy_property
    def _log_z_parts(self) -> tuple[Tensor, Tensor]:
        return sp.log_z_parts(self.alpha, self.beta)

    @lazy_property
    def log_normalizer(self) -> Tensor:
        """``log Z = log(Phi(beta) - Phi(alpha))``, the log mass kept by the truncation."""
        rest, reg = self._log_z_parts
        return rest + sp.quad_part(self.alpha, self.beta, reg)

    # --- densities ---------------------------------------------------------------------------
    def log_prob_log(self, x: Tensor) -> Tensor:
        """Log density of ``x = log theta`` (``-inf`` outside ``[log_low, log_high]``)."""
        x = torch.as_tensor(x, dtype=self.loc.dtype, device=self.loc.device)
        rest, reg = self._log_z_parts
        # -xi**2/2 - quad, with the tail's quadratic part cancelled analytically.
        xi_m_hi = (x - self.log_high) / self.scale
        xi_m_lo = (x - self.log_low) / self.scale
        xi = (x - self.loc) / self.scale
        quad = torch.where(
            reg == sp.LOWER,
            -0.5 * xi_m_hi * (xi + self.beta),
            torch.where(reg == sp.UPPER, -0.5 * xi_m_lo * (xi + self.alpha), -0.5 * xi * xi),
        )
        lp = quad - rest - sp.HALF_LOG_2PI - torch.log(self.scale)
        inside = (x >= self.log_low) & (x <= self.log_high)
        return torch.where(inside, lp, -math.inf)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        x = torch.log(value)
        return self.log_prob_log(x) - x

    def cdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self.cdf_log(torch.log(value))

    def cdf_log(self, x: Tensor) -> Tensor:
        """CDF as a function of ``x = log theta`` (resolves what theta cannot near 1)."""
        x = torch.as_tensor(x, dtype=self.loc.dtype, device=self.loc.device)
        x = torch.clamp(x, self.log_low, self.log_high)
        xi = (x - self.loc) / self.scale
        rest, reg = self._log_z_parts
        rest_x, reg_x = sp.log_z_parts(self.alpha.expand_as(xi), xi)
        # quad(alpha, xi) - quad(alpha, beta), exact where both sit in the same tail.
        both_lower = (reg == sp.LOWER) & (reg_x == sp.LOWER)
        both_upper = (reg == sp.UPPER) & (reg_x == sp.UPPER)
        generic = sp.quad_part(self.alpha, xi, reg_x) - sp.quad_part(self.alpha, self.beta, reg)
        quad = torch.where(
            both_lower,
            -0.5 * ((x - self.log_high) / self.scale) * (xi + self.beta),
            torch.where(both_upper, 0.0, generic),
        )
        cdf = torch.exp(quad + rest_x - rest)
        # In a tail the ratio above is exp of a difference of two logs of size ~log|bound|, so
        # 1 - F near 1 keeps only ~1e-14 absolute accuracy. There 1 - F is computed from the
        # other bound instead, with relative accuracy: the mass of [xi, beta] over Z.
        lower, upper = reg == sp.LOWER, reg == sp.UPPER
        # Lower tail: 1 - F = expm1(G) / expm1(d), G = log Phi(xi) - log Phi(beta) from
        # t = beta - xi with the quadratic parts cancelled, d = log Phi(alpha) - log Phi(beta).
        beta_l = torch.where(lower, self.beta, -1.0)
        alpha_l = torch.where(lower, self.alpha, -2.0)
        g, _ = sp.lower_tail_log_cdf_ratio(beta_l, torch.where(lower, (self.log_high - x) / self.scale, 0.0))
        d = sp._lower_tail_core(alpha_l, beta_l)[4]
        comp_lower = torch.expm1(g) / torch.expm1(d)
        # Upper tail: log(Phi(-xi) - Phi(-beta)) - log Z, both quadratic parts in that tail.
        xi_u = torch.where(upper, xi, 1.0)
        beta_u = torch.where(upper, torch.maximum(self.beta, xi_u), 2.0)
        rest_c, _ = sp.log_z_parts(xi_u, beta_u)
        comp_upper = torch.exp(-0.5 * torch.where(upper, (x - self.log_low) / self.scale, 0.0) * (xi_u + self.alpha) + rest_c - rest)
        comp = torch.where(lower, comp_lower, comp_upper)
        cdf = torch.where((lower | upper) & (cdf > 0.5), 1.0 - comp, cdf)
        return torch.clamp(cdf, 0.0, 1.0)

    # --- quantiles and sampling ------------------------------------------------------------------
    @lazy_property
    def _sampling_state(self):
        """Per-element pieces of the inverse CDF that do not depend on the quantile.

        Returns the regime, and per regime what the quantile transform needs:
        ``(Phi(alpha), Phi(-beta), Z)`` in the centre, ``log Phi(lo) - log Phi(hi)`` in the
        frame of a tail.
        """
        alpha, beta = self.alpha.detach(), self.beta.detach()
        reg = sp.regime(alpha, beta)
        zero = torch.zeros_like(alpha)

        def tail_d(lo, hi):  # log Phi(lo) - log Phi(hi) in the tail's own frame
            return sp._lower_tail_core(lo, hi)[4]

        d = sp.piecewise(
            (reg == sp.LOWER, reg == sp.UPPER, reg == sp.CENTRAL),
            (tail_d, lambda lo, hi: tail_d(-hi, -lo), lambda lo, hi: torch.zeros_like(lo)),
            alpha,
            beta,
        )
        central = reg == sp.CENTRAL
        # Phi(x) = erfc(-x/sqrt 2)/2: torch.special.ndtr loses all accuracy below x = -5.
        phi_lo = torch.where(central, 0.5 * torch.special.erfc(-alpha / sp.SQRT2), zero)
        phi_hi_c = torch.where(central, 0.5 * torch.special.erfc(beta / sp.SQRT2), zero)
        z = torch.where(central, torch.exp(self.log_normalizer.detach()), zero)
        return reg, d, phi_lo, phi_hi_c, z

    def _icdf_log(self, u: Tensor) -> Tensor:
        """``x = log theta`` at quantile ``u``; gradients to loc/scale by implicit differentiation."""
        reg, d, phi_lo, phi_hi_c, z = self._sampling_state
        loc, scale = self.loc.detach(), self.scale.detach()
        alpha, beta = self.alpha.detach(), self.beta.detach()
        low, high = self.log_low.detach(), self.log_high.detach()
        u = u.expand(torch.broadcast_shapes(u.shape, loc.shape))

        def newton_t(q, lo, hi, d_):
            """t >= 0 with log Phi(hi - t) - log Phi(hi) = log(q + rho (1 - q)), hi <= 0."""
            c = torch.logaddexp(torch.log(q), d_ + torch.log1p(-q))
            t = -2.0 * c / (-hi + torch.sqrt(hi * hi - 2.0 * c))  # root ignoring the erfcx term
            width = hi - lo
            for _ in range(_NEWTON_STEPS):
                g, slope = sp.lower_tail_log_cdf_ratio(hi, t)
                t = torch.clamp(t - (g - c) / slope, torch.zeros_like(t), width)
            return t

        def lower(q, lo, hi, d_, mu, s, a, b):
            t = newton_t(q, lo, hi, d_)
            return b - s * t, -t, (hi - lo) - t  # x, xi - beta, xi - alpha

        def upper(q, lo, hi, d_, mu, s, a, b):
            t = newton_t(1.0 - q, -hi, -lo, d_)
            return a + s * t, t - (hi - lo), t

        with torch.no_grad():
            # Centre: xi = Phi^-1(Phi(alpha) + u Z), inverted on whichever side is below 1/2.
            p_lo = phi_lo + u * z
            p_hi = phi_hi_c + (1.0 - u) * z
            use_lo = p_lo < p_hi
            xi = torch.special.ndtri(torch.minimum(p_lo, p_hi))
            xi = torch.minimum(torch.maximum(torch.where(use_lo, xi, -xi), alpha), beta)
            x, xi_m_hi, xi_m_lo = loc + scale * xi, xi - beta, xi - alpha
            tails = reg != sp.CENTRAL
            if bool(tails.any()):
                tx, t_hi, t_lo = sp.piecewise(
                    (reg == sp.LOWER, reg == sp.UPPER, reg == sp.CENTRAL),
                    (lower, upper, lambda q, *rest: (q, q, q)),
                    u, alpha, beta, d, loc, scale, low, high,
                )
                x, xi_m_hi, xi_m_lo = (torch.where(tails, a, b) for a, b in ((tx, x), (t_hi, xi_m_hi), (t_lo, xi_m_lo)))
            x = torch.minimum(torch.maximum(x, low), high)
        if not (self.loc.requires_grad or self.scale.requires_grad):
            return x
        with torch.no_grad():
            # F(x; loc, scale) = u  =>  dx/dloc = 1 - A - B,  dx/dscale = xi - alpha A - beta B,
            # A = (1-u) phi(alpha)/phi(xi), B = u phi(beta)/phi(xi); ratios taken in log space.
            xi = (x - loc) / scale
            ra = torch.exp(torch.log1p(-u) + 0.5 * xi_m_lo * (xi_m_lo + 2.0 * alpha))
            rb = torch.exp(torch.log(u) + 0.5 * xi_m_hi * (xi_m_hi + 2.0 * beta))
            dx_dloc = 1.0 - ra - rb
            dx_dscale = xi - alpha * ra - beta * rb
        return x + dx_dloc * (self.loc - loc) + dx_dscale * (self.scale - scale)

    def icdf_log(self, value: Tensor) -> Tensor:
        """Quantile function in ``x = log theta``; differentiable in ``loc`` and ``scale``."""
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self._icdf_log(value)

    def icdf(self, value: Tensor) -> Tensor:
        return torch.exp(self.icdf_log(value))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        tiny = torch.finfo(self.loc.dtype).tiny
        return torch.exp(self._icdf_log(u.clamp_(min=tiny)))

    # --- moments ------------------------------------------------------------------------------------
    def log_moment(self, k: float) -> Tensor:
        """``log E[theta**k]``, finite wherever the distribution is defined."""
        loc, scale, alpha, beta = self.loc, self.scale, self.alpha, self.beta
        rest, reg = self._log_z_parts
        alpha_k, beta_k = alpha - k * scale, beta - k * scale
        rest_k, reg_k = sp.log_z_parts(alpha_k, beta_k)
        generic = (
            k * loc
            + 0.5 * k * k * scale * scale
            + sp.quad_part(alpha_k, beta_k, reg_k)
            - sp.quad_part(alpha, beta, reg)
        )
        # Same tail for both normalisers: the quadratic parts cancel to k * bound.
        bracket = torch.where(
            (reg == sp.LOWER) & (reg_k == sp.LOWER),
            k * self.log_high,
            torch.where((reg == sp.UPPER) & (reg_k == sp.UPPER), k * self.log_low, generic),
        )
        return bracket + rest_k - rest

    @lazy_property
    def _log_var_ratio(self) -> Tensor:
        """``log(E[theta**2] / E[theta]**2) = log(1 + CV**2)``.

        Where it is small, the difference of log-moments cancels; there it is computed as
        ``scale**2 * int_0^2 (1 - |s - 1|) Var[xi | tilt s*scale] ds`` (the Taylor remainder
        of the cumulant generating function), by Gauss-Legendre quadrature.
        """
        direct = self.log_moment(2.0) - 2.0 * self.log_moment(1.0)
        small = direct < _DELTA_SWITCH
        if not bool(small.any()):
            return direct
        nodes = torch.as_tensor(0.5 * (_GL_NODES + 1.0), dtype=self.loc.dtype, device=self.loc.device)
        weights = torch.as_tensor(0.5 * _GL_WEIGHTS, dtype=self.loc.dtype, device=self.loc.device)
        s = torch.cat([nodes, 2.0 - nodes])
        wts = torch.cat([weights * nodes, weights * nodes])
        small = small.reshape(-1)
        alpha, beta, scale = (t.expand(direct.shape).reshape(-1)[small] for t in (self.alpha, self.beta, self.scale))
        shift = scale.unsqueeze(-1) * s
        var = sp.truncnorm_variance(alpha.unsqueeze(-1) - shift, beta.unsqueeze(-1) - shift)
        quad = scale * scale * (var * wts).sum(-1)
        return direct.reshape(-1).index_put((small,), quad).reshape(direct.shape)

    @property
    def mean(self) -> Tensor:
        return torch.exp(self.log_moment(1.0))

    @property
    def variance(self) -> Tensor:
        return torch.exp(2.0 * self.log_moment(1.0)) * torch.expm1(self._log_var_ratio)

    @property
    def stddev(self) -> Tensor:
        return self.mean * torch.sqrt(torch.expm1(self._log_var_ratio))

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio ``E[theta] / std[theta]``."""
        return torch.rsqrt(torch.expm1(self._log_var_ratio))

    @property
    def mode(self) -> Tensor:
        # density of theta ~ exp(-(log theta - loc)**2/(2 s**2)) / theta peaks at loc - s**2
        return torch.exp(torch.clamp(self.loc - self.scale**2, self.log_low, self.log_high))

    @lazy_property
    def mean_log(self) -> Tensor:
        """``E[log theta]``, measured from the bound that holds the mass in the tails."""

        def lower(lo, hi, mu, s, a, b):
            return b - s * sp.truncnorm_mean_offset(lo, hi)

        def upper(lo, hi, mu, s, a, b):
            return a + s * sp.truncnorm_mean_offset(-hi, -lo)

        def central(lo, hi, mu, s, a, b):
            return mu + s * sp.truncnorm_mean(lo, hi)

        reg = sp.regime(self.alpha, self.beta)
        return sp.piecewise(
            (reg == sp.LOWER, reg == sp.UPPER, reg == sp.CENTRAL),
            (lower, upper, central),
            self.alpha, self.beta, self.loc, self.scale, self.log_low, self.log_high,
        )

    def entropy_log(self) -> Tensor:
        """Differential entropy of ``x = log theta``."""
        return sp.truncnorm_entropy(self.alpha, self.beta) + torch.log(self.scale)

    def entropy(self) -> Tensor:
        """Differential entropy of theta: ``H[log theta] + E[log theta]``."""
        return self.entropy_log() + self.mean_log


class LogUniform(Distribution):
    """theta with ``log theta`` uniform on ``[log_low, log_high]`` (the BMRS prior family)."""

    arg_constraints = {"log_low": constraints.real, "log_high": constraints.real}
    has_rsample = True

    def __init__(self, log_low=-20.0, log_high=0.0, validate_args=None):
        self.log_low, self.log_high = _broadcast(log_low, log_high)
        super().__init__(self.log_low.shape, validate_args=validate_args)
        if self._validate_args:
            _check_bounds(self.log_low, self.log_high)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_low = self.log_low.expand(batch_shape)
        new.log_high = self.log_high.expand(batch_shape)
        super(LogUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(torch.exp(self.log_low), torch.exp(self.log_high))

    @property
    def width(self) -> Tensor:
        """``log_high - log_low``."""
        return self.log_high - self.log_low

    def log_prob_log(self, x: Tensor) -> Tensor:
        """Log density of ``x = log theta``."""
        x = torch.as_tensor(x, dtype=self.log_low.dtype, device=self.log_low.device)
        inside = (x >= self.log_low) & (x <= self.log_high)
        return torch.where(inside, -torch.log(self.width), -math.inf)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.log_low.dtype, device=self.log_low.device)
        x = torch.log(value)
        return self.log_prob_log(x) - x

    def cdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.log_low.dtype, device=self.log_low.device)
        return torch.clamp((torch.log(value) - self.log_low) / self.width, 0.0, 1.0)

    def icdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.log_low.dtype, device=self.log_low.device)
        return torch.exp(self.log_low + value * self.width)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.log_low.dtype, device=self.log_low.device)
        return self.icdf(u)

    def log_moment(self, k: float) -> Tensor:
        """``log E[theta**k] = k*log_high + log((1 - exp(-k*width)) / (k*width))``."""
        kw = k * self.width
        return k * self.log_high + torch.log(-torch.expm1(-kw) / kw)

    @property
    def mean(self) -> Tensor:
        return torch.exp(self.log_moment(1.0))

    @property
    def variance(self) -> Tensor:
        # Var = exp(2 hi) * e^-d * (2 sinh(d/2)/d) * [cosh(d/2) - sinh(d/2)/(d/2)],
        # with the bracket y**2/3 + y**4/30 + ... summed directly where it would cancel.
        d = self.width
        y = 0.5 * d
        small = y < 1e-2
        ys = torch.where(small, 1.0, y)
        bracket = torch.where(
            small,
            y * y * (1.0 / 3 + y * y * (1.0 / 30 + y * y * (1.0 / 840 + y * y / 45360))),
            torch.cosh(ys) - torch.sinh(ys) / ys,
        )
        return torch.exp(2.0 * self.log_high - d) * (torch.sinh(y) / y) * bracket

    @property
    def stddev(self) -> Tensor:
        return torch.sqrt(self.variance)

    @property
    def mean_log(self) -> Tensor:
        """``E[log theta]``."""
        return 0.5 * (self.log_low + self.log_high)

    def entropy_log(self) -> Tensor:
        """Differential entropy of ``x = log theta``."""
        return torch.log(self.width)

    def entropy(self) -> Tensor:
        return self.entropy_log() + self.mean_log


@register_kl(TruncatedLogNormal, LogUniform)
def _kl_truncated_lognormal_loguniform(q: TruncatedLogNormal, p: LogUniform) -> Tensor:
    """``KL(q || p) = log(b - a) - H[log theta under q]``; ``inf`` if q leaves p's support.

    The change of variables to ``log theta`` leaves KL unchanged. Clamped at 0, which it is
    mathematically bounded by (rounding can give -1e-16 for a nearly uniform q).
    """
    width = p.width.to(torch.promote_types(p.width.dtype, q.loc.dtype))
    kl = torch.clamp(torch.log(width) - q.entropy_log(), min=0.0)
    inside = (q.log_low >= p.log_low) & (q.log_high <= p.log_high)
    return torch.where(inside, kl, math.inf)
