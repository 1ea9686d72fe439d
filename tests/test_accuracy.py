"""Accuracy off the step-0.5 grid: delta F (BMRS_N, BMRS_U-8, BMRS_U-4), KL and E[theta]
against mpmath at random points and on the step-0.25 grid of the inner region, and the case
that once looked like an error (bounds of a reduced prior rounded to float32)."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from torch.distributions import kl_divergence

import mpref
from bmrs import LogUniform, TruncatedLogNormal, bmrs_n_prior, bmrs_u_prior, delta_f

F64 = torch.float64
PRIOR = LogUniform(-20.0, 0.0)
LOG2 = mp.log(2)

QUANTITIES = {
    "delta_f_n": (lambda q: delta_f(q, PRIOR, bmrs_n_prior()), lambda m, s: mpref.delta_f_normal(m, s, -20, 1e-6)),
    "delta_f_u8": (lambda q: delta_f(q, PRIOR, bmrs_u_prior(8)),
                   lambda m, s: mpref.delta_f_uniform(m, s, -23 * LOG2, -8 * LOG2)),
    "delta_f_u4": (lambda q: delta_f(q, PRIOR, bmrs_u_prior(4)),
                   lambda m, s: mpref.delta_f_uniform(m, s, -23 * LOG2, -4 * LOG2)),
    "kl": (lambda q: kl_divergence(q, PRIOR), mpref.kl),
    "mean": (lambda q: q.mean, mpref.mean),
}


def worst_relative_error(mu: np.ndarray, log_sigma: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per quantity: the worst relative error and where (mu, log sigma)."""
    q = TruncatedLogNormal(torch.tensor(mu, dtype=F64), torch.exp(torch.tensor(log_sigma, dtype=F64)))
    worst = {}
    for name, (fn, ref) in QUANTITIES.items():
        value = fn(q).detach().numpy()
        errors = [
            float(abs((v - r) / r))
            for v, r in zip(value, (ref(mp.mpf(m), mp.exp(mp.mpf(s))) for m, s in zip(mu.tolist(), log_sigma.tolist())))
        ]
        i = int(np.argmax(errors))
        worst[name] = (errors[i], float(mu[i]), float(log_sigma[i]))
    return worst


def test_random_points_of_the_inner_region():
    rng = np.random.default_rng(20261130)
    mu, log_sigma = rng.uniform(-25, 5, 300), rng.uniform(-10, 3, 300)
    for name, (err, m, s) in worst_relative_error(mu, log_sigma).items():
        assert err < 1e-9, (name, err, m, s)


@pytest.mark.slow
def test_step_quarter_grid_of_the_inner_region():
    # the points between those of the step-0.5 grid the other tests cover
    mu, log_sigma = np.meshgrid(np.arange(-25, 5.0001, 0.25), np.arange(-10, 3.0001, 0.25), indexing="ij")
    off = (mu % 0.5 != 0) | (log_sigma % 0.5 != 0)
    for name, (err, m, s) in worst_relative_error(mu[off], log_sigma[off]).items():
        assert err < 1e-9, (name, err, m, s)


def test_reduced_prior_bounds_from_python_floats_stay_float64():
    # LogUniform(-23 log 2, -8 log 2) once stored float32 bounds: log 2^-23 moved by 4.3e-7,
    # and a posterior 770 sigma away (mu = -16, log sigma = -9.5) saw delta F off by 4.45 nats.
    r = LogUniform(-23 * math.log(2), -8 * math.log(2))
    assert r.log_low.dtype == F64 and r.log_low.item() == -23 * math.log(2)
    assert TruncatedLogNormal(-16.0, math.exp(-9.5)).scale.dtype == F64
    q = TruncatedLogNormal(torch.tensor(-16.0, dtype=F64), torch.exp(torch.tensor(-9.5, dtype=F64)))
    exact = mpref.delta_f_uniform(-16, mp.exp(-9.5), -23 * LOG2, -8 * LOG2)
    assert float(exact) == pytest.approx(-296240.287, abs=1e-3)
    assert delta_f(q, PRIOR, r).item() == pytest.approx(float(exact), rel=1e-12)
    # with a tensor among the parameters, numbers take its dtype (as in torch.distributions)
    assert TruncatedLogNormal(torch.zeros(2), 1.0).log_low.dtype == torch.float32
