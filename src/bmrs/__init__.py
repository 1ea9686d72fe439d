"""bmrs: structured pruning of neural networks with Bayesian model reduction (BMRS).

The core objects:

* :class:`TruncatedLogNormal`, :class:`LogUniform`: the posterior and prior of a gate's
  noise variable theta (``torch.distributions`` style; their KL is registered).
* :func:`delta_f`: the change in log-evidence under a reduced prior, with the reduced
  priors :func:`bmrs_n_prior` (BMRS_N) and :func:`bmrs_u_prior` (BMRS_U-p).
* :class:`NoiseGate` and :func:`attach_gates`: noise gates on the prunable structures of
  any network; :func:`model_kl`, the KL term of the ELBO.
* :mod:`bmrs.pruning`: criteria (BMRS and baselines), masks, compression counts, schedules.
* :class:`Trainer`: a ready training loop with continuous pruning and checkpoints.
* :func:`compact`: the smaller plain network, with :func:`save_compact` / :func:`load_compact`.
* :mod:`bmrs.distributed`: DistributedDataParallel (every function here accepts a wrapped
  model); :mod:`bmrs.integrations.lightning`: a Lightning callback (needs the ``lightning`` extra).
* :class:`BMRSError`: what every function raises for input a user can fix (a ``ValueError``).
"""

from . import distributed
from .structures.attention import MultiheadSelfAttention, compact_attention, expose_heads
from .compaction import compact, load_compact, save_compact
from .errors import BMRSError
from .models import build_model
from .training import Trainer, elbo_loss, seed_everything
from .gates import NoiseGate, attach_gates, detach_gates, gate_layout, gates, layer_names, model_kl
from .math.distributions import LogUniform, TruncatedLogNormal
from .pruning import (
    ContinuousPruning,
    decide,
    kept_structures,
    make_criterion,
    parameter_compression,
    prune,
    structure_compression,
)
from .reduction import bmrs_n_prior, bmrs_u_prior, delta_f, delta_f_quadrature

__version__ = "0.1.0"

__all__ = [
    "BMRSError",
    "ContinuousPruning",
    "LogUniform",
    "MultiheadSelfAttention",
    "NoiseGate",
    "Trainer",
    "TruncatedLogNormal",
    "attach_gates",
    "bmrs_n_prior",
    "bmrs_u_prior",
    "build_model",
    "compact",
    "compact_attention",
    "decide",
    "delta_f",
    "delta_f_quadrature",
    "detach_gates",
    "distributed",
    "elbo_loss",
    "expose_heads",
    "gate_layout",
    "layer_names",
    "gates",
    "kept_structures",
    "load_compact",
    "make_criterion",
    "model_kl",
    "parameter_compression",
    "prune",
    "save_compact",
    "seed_everything",
    "structure_compression",
]
