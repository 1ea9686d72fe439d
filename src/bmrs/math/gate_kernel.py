"""The training-time kernel of the noise gates: sample and KL of many gates in one call.

Training draws theta for every (example, structure) of every gate, and needs the KL of every
structure, on every step. Built gate by gate from autograd-tracked elementary ops this costs
hundreds of tiny tensor operations per gate, whose dispatch dominates the step. Here one
autograd Function takes the parameters of all gates at once (as a list of tensors, so each
keeps its own gradient), computes the samples and the KL with exact analytic gradients, and
returns one theta tensor per gate: a fixed number of operations per step, whatever the
number of gates. Python numbers are never mixed into tensor arithmetic (each would cost a
conversion): the constants are cached 0-d tensors.

The formulas are the closed forms of the central regime of the truncated normal (the
truncation interval ``[alpha, beta]`` of the standardised normal is not in a tail:
``alpha < 1`` and ``beta > -1``), where ``Z = Phi(beta) - Phi(alpha)`` is not small. The
Function also reports whether any structure lies outside that regime;
:class:`~bmrs.gates.NoiseGate` then discards the result and uses the general, tail-safe
code (:class:`~bmrs.math.distributions.TruncatedLogNormal`), which the tests check against
mpmath. The tests check this kernel's values and gradients against the general code.

In the central regime every quantity is O(1):

* ``Z = (erf(beta/sqrt2) - erf(alpha/sqrt2)) / 2``: relative error below ``eps / Z``, and
  ``Z >= (beta - alpha) phi(1) >= 0.03`` because the log scale is at most 5;
* the sample ``xi = Phi^-1(Phi(alpha) + u Z)``, from the smaller of ``p`` and ``1 - p``
  (each computed from its own cut probability, ``erfc``), so ``p`` near 1 loses nothing;
* its gradient by implicit differentiation of ``F(x; loc, scale) = u``: with
  ``x = loc + scale xi``, ``dx/dloc = 1 - r_a - r_b``, ``dx/dscale = xi - alpha r_a - beta r_b``,
  ``r_a = (1 - u) phi(alpha) / phi(xi)``, ``r_b = u phi(beta) / phi(xi)``; ``1/phi(xi)`` stays
  finite because ``u`` is kept at least ``eps/4`` away from 0 and 1, so ``|xi| < 9``; the sums
  over the batch are taken before the per-structure factors are applied;
* the KL to the log-uniform prior, ``log(log_high - log_low) - H`` with the entropy of the
  truncated normal ``H = log scale + log sqrt(2 pi e) + log Z + T/2``,
  ``T = (alpha phi(alpha) - beta phi(beta)) / Z``, clamped at 0 (its gradient is zero there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .special import HALF_LOG_2PI_E, SQRT2

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

_CONSTANTS: dict = {}


class _Constants:
    """0-d tensors (and two small stacks) of one dtype and device for one truncation."""

    def __init__(self, dtype: torch.dtype, device: torch.device, log_low: float, log_high: float,
                 log_scale_bounds: tuple[float, float]) -> None:
        def c(value):
            return torch.tensor(value, dtype=dtype, device=device)

        self.log_low, self.log_high = c(log_low), c(log_high)
        self.ls_min, self.ls_max = c(log_scale_bounds[0]), c(log_scale_bounds[1])
        self.half, self.one, self.zero = c(0.5), c(1.0), c(0.0)
        self.neg_inv_sqrt2, self.inv_sqrt2 = c(-1.0 / SQRT2), c(1.0 / SQRT2)
        self.u_min = c(torch.finfo(dtype).eps / 4)  # below every positive draw of torch.rand
        self.inv_sqrt_2pi = c(_INV_SQRT_2PI)
        self.two_inv_sqrt_2pi = c(2.0 * _INV_SQRT_2PI)
        # KL = kl_const - log scale - log(2 Z) - T/2; kl_const = log width - H_0 + log 2
        self.kl_const = c(math.log(log_high - log_low) - HALF_LOG_2PI_E + math.log(2.0))


def constants(dtype: torch.dtype, device: torch.device, log_low: float, log_high: float,
              log_scale_bounds: tuple[float, float]) -> _Constants:
    key = (dtype, device, log_low, log_high, log_scale_bounds)
    found = _CONSTANTS.get(key)
    if found is None:
        found = _CONSTANTS[key] = _Constants(dtype, device, log_low, log_high, log_scale_bounds)
    return found


class GateNoise(torch.autograd.Function):
    """theta and the KL of every structure of several gates, central regime.

    ``forward(u, mask, k, sizes, *params)`` with ``params`` the gates' ``loc`` tensors then
    their ``log_scale`` tensors, ``u`` uniforms of shape ``(N, sum(sizes))`` in ``(0, 1)``
    (``N`` may be 0: KL only), ``mask`` the concatenated masks (theta is exactly 0 where it is 0),
    ``k`` the :class:`_Constants`. Returns one theta per gate (shape ``(N, size)``), the KL
    per structure (shape ``(sum(sizes),)``, unmasked) and a 0-d bool tensor that is true
    when some structure is outside the central regime (then the values are not to be used).
    """

    @staticmethod
    def forward(ctx, u: Tensor, mask: Tensor, k: _Constants, sizes: list[int], *params: Tensor):
        n = len(sizes)
        loc = torch.cat(params[:n]) if n > 1 else params[0]
        log_scale = torch.cat(params[n:]) if n > 1 else params[n]
        lsc = log_scale.clamp(k.ls_min, k.ls_max)
        in_bounds = lsc == log_scale  # where the clamp passes the gradient on
        scale = lsc.exp()
        alpha = (k.log_low - loc) / scale
        beta = (k.log_high - loc) / scale
        sa = alpha * k.neg_inv_sqrt2  # -alpha/sqrt2 > -1/sqrt2 and beta/sqrt2 > -1/sqrt2: central
        sb = beta * k.inv_sqrt2
        outside = torch.minimum(sa, sb) <= k.neg_inv_sqrt2
        tail = outside.any()
        cut_lo = sa.erfc()  # 2 Phi(alpha)
        cut_hi = sb.erfc()  # 2 (1 - Phi(beta))
        z2 = sa.erf() + sb.erf()  # 2 Z
        a2, b2 = alpha * alpha, beta * beta
        half_a2, half_b2 = a2 * k.half, b2 * k.half

        # KL: log width - (log scale + log sqrt(2 pi e) + log Z + T/2)
        phi_a = (-half_a2).exp()  # sqrt(2 pi) phi(alpha)
        phi_b = (-half_b2).exp()
        t = (alpha * phi_a - beta * phi_b) * k.two_inv_sqrt_2pi / z2
        kl = (k.kl_const - lsc - z2.log()).sub_(t, alpha=0.5).clamp_(min=k.zero)

        # theta = exp(loc + scale xi), xi = Phi^-1(p), p = Phi(alpha) + u Z, 1 - p = 1 - Phi(beta) + (1 - u) Z
        z = z2 * k.half
        p_lo = torch.addcmul(cut_lo * k.half, u, z)  # p
        p_hi = torch.addcmul(torch.addcmul(z, cut_hi, k.half), u, z, value=-1)  # 1 - p
        # Phi^-1 of the smaller of p and 1 - p, negated if that was 1 - p
        xi = torch.copysign(torch.special.ndtri(torch.minimum(p_lo, p_hi)), p_lo - p_hi)
        theta = torch.addcmul(loc, scale, xi).clamp_(k.log_low, k.log_high).exp_()
        theta = torch.where(mask > k.zero, theta, k.zero)  # exactly 0 where masked, even for NaN parameters
        # 1/phi(xi) up to sqrt(2 pi); |xi| < 9 since u is at least eps/4 away from 0 and 1
        inv_phi_xi = torch.addcmul(k.zero, xi, xi, value=0.5).exp_()
        ctx.save_for_backward(theta, xi, inv_phi_xi, u, scale, in_bounds, alpha, beta, a2, b2, phi_a, phi_b, z2, t, kl)
        ctx.sizes, ctx.k = sizes, k
        ctx.mark_non_differentiable(tail)
        ctx.set_materialize_grads(False)
        return (*theta.split(sizes, 1), kl, tail)

    @staticmethod
    def backward(ctx, *grads):
        theta, xi, inv_phi_xi, u, scale, in_bounds, alpha, beta, a2, b2, phi_a, phi_b, z2, t, kl = ctx.saved_tensors
        sizes, k = ctx.sizes, ctx.k
        ctx.consumed = True  # the saved tensors may now be freed (see bmrs.gates._Bank)
        n = len(sizes)
        g_theta, g_kl = grads[:n], grads[n]
        g_loc = g_scale = None
        if any(g is not None for g in g_theta):
            g = torch.cat([gi if gi is not None else theta.new_zeros(theta.shape[0], c)
                           for gi, c in zip(g_theta, sizes)], 1) if n > 1 else g_theta[0]
            # dtheta = theta dx, dx/dloc = 1 - r_a - r_b, dx/dscale = xi - alpha r_a - beta r_b,
            # r_a = (1 - u) phi(alpha)/phi(xi), r_b = u phi(beta)/phi(xi): sums over the batch first
            g = g * theta
            g_e = g * inv_phi_xi
            s_e, s_eu = g_e.sum(0), (g_e * u).sum(0)
            s_a = (s_e - s_eu) * phi_a  # sum of g theta r_a
            s_b = s_eu * phi_b  # sum of g theta r_b
            g_loc = g.sum(0) - s_a - s_b
            g_scale = (g * xi).sum(0) - alpha * s_a - beta * s_b
        if g_kl is not None:
            # d(log Z + T/2)/d alpha = r_a (T - 1 - alpha^2)/2, d/d beta = r_b (1 + beta^2 - T)/2
            # with r = phi / Z; d alpha/d loc = -1/scale, d alpha/d log scale = -alpha, same for beta.
            g_kl = torch.where(kl > k.zero, g_kl, k.zero)  # 0 where the KL is clamped
            w = g_kl * k.inv_sqrt_2pi / z2
            tm = t - k.one
            f_a = (tm - a2) * phi_a * w
            f_b = (b2 - tm) * phi_b * w
            kl_loc = (f_a + f_b) / scale
            kl_log_scale = alpha * f_a + beta * f_b - g_kl
            g_loc = kl_loc if g_loc is None else g_loc + kl_loc
        if g_loc is None:
            return (None, None, None, None, *([None] * (2 * n)))
        if g_scale is None:
            g_scale = kl_log_scale
        else:
            g_scale = g_scale * scale if g_kl is None else torch.addcmul(kl_log_scale, g_scale, scale)
        g_log_scale = torch.where(in_bounds, g_scale, k.zero)
        locs = g_loc.split(sizes) if n > 1 else (g_loc,)
        log_scales = g_log_scale.split(sizes) if n > 1 else (g_log_scale,)
        return (None, None, None, None, *locs, *log_scales)
