"""bmrs: structured pruning of neural networks with Bayesian model reduction (BMRS).

The core objects:

* :class:`TruncatedLogNormal`, :class:`LogUniform`: the posterior and prior of a gate's
  noise variable theta (``torch.distributions`` style; their KL is registered).
* :func:`delta_f`: the change in log-evidence under a reduced prior, with the reduced
  priors :func:`bmrs_n_prior` (BMRS_N) and :func:`bmrs_u_prior` (BMRS_U-p).
* :class:`NoiseGate`: the multiplicative noise gate of a prunable structure.
"""

from .gates import NoiseGate
from .math.distributions import LogUniform, TruncatedLogNormal
from .reduction import bmrs_n_prior, bmrs_u_prior, delta_f, delta_f_quadrature

__version__ = "0.1.0"

__all__ = [
    "LogUniform",
    "NoiseGate",
    "TruncatedLogNormal",
    "bmrs_n_prior",
    "bmrs_u_prior",
    "delta_f",
    "delta_f_quadrature",
]
