"""The multiplicative log-normal noise gate that BMRS puts on every prunable structure."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .math.distributions import LogUniform, TruncatedLogNormal

__all__ = ["NoiseGate"]


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
            raise ValueError(f"num_structures must be a positive integer, got {num_structures!r}")
        if dim == 0:
            raise ValueError("dim=0 is the batch axis; pass the channel axis (1 or -1)")
        if not log_low < log_high:
            raise ValueError(f"log_low must be smaller than log_high, got {log_low} and {log_high}")
        if not log_scale_bounds[0] < log_scale_bounds[1]:
            raise ValueError(f"log_scale_bounds must be increasing, got {log_scale_bounds}")
        self.num_structures = int(num_structures)
        self.dim = int(dim)
        self.log_low = float(log_low)
        self.log_high = float(log_high)
        self.log_scale_bounds = (float(log_scale_bounds[0]), float(log_scale_bounds[1]))
        self.loc = nn.Parameter(torch.full((self.num_structures,), float(init_loc)))
        self.log_scale = nn.Parameter(torch.full((self.num_structures,), float(init_log_scale)))
        self.register_buffer("mask", torch.ones(self.num_structures))

    def extra_repr(self) -> str:
        kept = int(self.mask.sum().item())
        return f"{self.num_structures}, dim={self.dim}, kept={kept}, log_theta in [{self.log_low:g}, {self.log_high:g}]"

    def posterior(self) -> TruncatedLogNormal:
        """The variational posterior q(theta) of every structure (batch shape ``(C,)``)."""
        scale = torch.exp(torch.clamp(self.log_scale, *self.log_scale_bounds))
        return TruncatedLogNormal(self.loc, scale, self.log_low, self.log_high, validate_args=False)

    def prior(self) -> LogUniform:
        """The log-uniform prior p(theta), batch shape ``(C,)``."""
        low = torch.full_like(self.loc, self.log_low).detach()
        return LogUniform(low, torch.full_like(low, self.log_high), validate_args=False)

    def kl(self) -> Tensor:
        """``KL(q || p)`` of every structure, shape ``(C,)``."""
        return torch.distributions.kl_divergence(self.posterior(), self.prior())

    def expected_gate(self) -> Tensor:
        """What the gate multiplies by in evaluation: ``E[theta] * mask``, shape ``(C,)``."""
        return self.posterior().mean * self.mask

    def _broadcast_shape(self, x: Tensor, batch: int) -> list[int]:
        dim = self.dim % x.dim()
        if dim == 0 or x.shape[dim] != self.num_structures:
            raise ValueError(
                f"NoiseGate expects {self.num_structures} channels on axis {self.dim} of a batched input, "
                f"got input of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[0] = batch
        shape[dim] = self.num_structures
        return shape

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            theta = self.posterior().rsample((x.shape[0],)) * self.mask  # (N, C)
            return x * theta.to(x.dtype).reshape(self._broadcast_shape(x, x.shape[0]))
        return x * self.expected_gate().to(x.dtype).reshape(self._broadcast_shape(x, 1))
