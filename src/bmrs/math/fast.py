"""Fused training-time kernels for the central regime of the truncated log-normal.

Training calls the KL and the reparameterised sample of every gate on every step. Built from
autograd-tracked elementary ops they cost a few hundred tiny kernels per gate; these two
autograd Functions compute the same values and exact analytic gradients in a few dozen.
They are valid where the truncation interval is not in a tail (``beta > -1`` and
``alpha < 1``, :data:`bmrs.math.special.CENTRAL`), which is where a gate spends its training;
:class:`~bmrs.gates.NoiseGate` falls back to the general, tail-safe code elsewhere. The
tests check both against each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import special as sp

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def is_central(loc: Tensor, scale: Tensor, log_low: float, log_high: float) -> bool:
    """Whether every element is in the central regime (the fused kernels apply)."""
    with torch.no_grad():
        return bool((((log_high - loc) / scale > -sp._TAIL) & ((log_low - loc) / scale < sp._TAIL)).all())


def _central_pieces(loc: Tensor, scale: Tensor, log_low: float, log_high: float):
    alpha = (log_low - loc) / scale
    beta = (log_high - loc) / scale
    cut_lo = 0.5 * torch.special.erfc(-alpha / sp.SQRT2)  # Phi(alpha)
    cut_hi = 0.5 * torch.special.erfc(beta / sp.SQRT2)  # 1 - Phi(beta)
    outside = cut_lo + cut_hi
    inside = 0.5 * (torch.erf(beta / sp.SQRT2) - torch.erf(alpha / sp.SQRT2))
    near_one = outside < 0.5
    log_z = torch.where(near_one, torch.log1p(-torch.clamp(outside, max=0.5)), torch.log(inside))
    z = torch.where(near_one, 1.0 - outside, inside)
    return alpha, beta, cut_lo, cut_hi, z, log_z


class CentralKL(torch.autograd.Function):
    """``KL(q || U[log_low, log_high])`` per element, with its analytic gradient."""

    @staticmethod
    def forward(ctx, loc: Tensor, scale: Tensor, log_low: float, log_high: float, log_width: float) -> Tensor:
        alpha, beta, _, _, z, log_z = _central_pieces(loc, scale, log_low, log_high)
        phi_a = torch.exp(-0.5 * alpha * alpha) * _INV_SQRT_2PI
        phi_b = torch.exp(-0.5 * beta * beta) * _INV_SQRT_2PI
        a_term, b_term = alpha * phi_a, beta * phi_b
        t = (a_term - b_term) / z
        entropy = sp.HALF_LOG_2PI_E + torch.log(scale) + log_z + 0.5 * t
        kl = log_width - entropy
        ctx.save_for_backward(scale, alpha, beta, z, phi_a, phi_b, t, kl)
        return torch.clamp(kl, min=0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale, alpha, beta, z, phi_a, phi_b, t, kl = ctx.saved_tensors
        # f(alpha, beta) = log Z + T/2 with T = (alpha phi(alpha) - beta phi(beta)) / Z
        ra, rb = phi_a / z, phi_b / z
        df_da = -ra + 0.5 * (ra * (1.0 - alpha * alpha) + t * ra)
        df_db = rb - 0.5 * (rb * (1.0 - beta * beta) + t * rb)
        # d alpha/d loc = d beta/d loc = -1/scale; d x/d scale = -x/scale for x = alpha, beta
        d_entropy_dloc = -(df_da + df_db) / scale
        d_entropy_dscale = (1.0 - alpha * df_da - beta * df_db) / scale
        g = torch.where(kl > 0, grad, 0.0)
        return -g * d_entropy_dloc, -g * d_entropy_dscale, None, None, None


class CentralSample(torch.autograd.Function):
    """theta at quantiles ``u`` (shape ``(N, C)``), gradient by implicit differentiation."""

    @staticmethod
    def forward(ctx, u: Tensor, loc: Tensor, scale: Tensor, log_low: float, log_high: float) -> Tensor:
        alpha, beta, cut_lo, cut_hi, z, _ = _central_pieces(loc, scale, log_low, log_high)
        p_lo = cut_lo + u * z
        p_hi = cut_hi + (1.0 - u) * z
        xi = torch.special.ndtri(torch.minimum(p_lo, p_hi))
        xi = torch.where(p_lo < p_hi, xi, -xi)
        xi = torch.minimum(torch.maximum(xi, alpha), beta)
        x = torch.clamp(loc + scale * xi, log_low, log_high)
        theta = torch.exp(x)
        # F(x; loc, scale) = u: dx/dloc = 1 - A - B, dx/dscale = xi - alpha A - beta B
        ra = torch.exp(torch.log1p(-u) + 0.5 * (xi - alpha) * (xi + alpha))
        rb = torch.exp(torch.log(u) + 0.5 * (xi - beta) * (xi + beta))
        ctx.save_for_backward(theta * (1.0 - ra - rb), theta * (xi - alpha * ra - beta * rb))
        return theta

    @staticmethod
    def backward(ctx, grad: Tensor):
        dtheta_dloc, dtheta_dscale = ctx.saved_tensors
        return None, (grad * dtheta_dloc).sum(0), (grad * dtheta_dscale).sum(0), None, None
