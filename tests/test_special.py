"""The log-space special functions against mpmath."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch

import mpref  # noqa: F401  (sets mpmath precision)
from bmrs.math import special as sp


def rel_err(value, ref):
    ref = mp.mpf(ref)
    return float(abs((mp.mpf(value) - ref) / ref)) if ref != 0 else abs(float(value))


def test_mills_h_matches_mpmath_everywhere():
    w = torch.tensor(np.concatenate([np.linspace(0, 10, 101), np.logspace(1, 12, 45)]), dtype=torch.float64)
    h, g = sp.mills_h(w)
    worst_h = worst_g = 0.0
    for wi, hi, gi in zip(w.tolist(), h.tolist(), g.tolist()):
        wm = mp.mpf(wi)
        h_ref = 1 / (mp.sqrt(mp.pi) * mp.erfc(wm) * mp.exp(wm * wm)) - wm
        g_ref = 1 / (2 * h_ref) - wm
        worst_h, worst_g = max(worst_h, rel_err(hi, h_ref)), max(worst_g, rel_err(gi, g_ref))
    assert worst_h < 2e-14
    # g = 1/(2h) - w cancels by a factor ~w/g below the continued-fraction switch
    assert worst_g < 2e-12


def _z_ref(lo, hi):
    return mp.log(mpref._z(mp.mpf(lo), mp.mpf(hi)))


PAIRS = [(-1e10, -5e9), (-40.0, -30.0), (-3.0, -1.0), (-1.0, -0.5), (-0.1, 0.1), (-5.0, 40.0),
         (2.0, 2.0001), (30.0, 40.0), (5e9, 1e10), (-1e12, 1e12), (-7.4, 25.6), (-1e-3, 1e-3)]


@pytest.mark.parametrize("lo,hi", PAIRS)
def test_log_ndtr_diff(lo, hi):
    value = sp.log_ndtr_diff(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
    assert rel_err(value.item(), _z_ref(lo, hi)) < 1e-12


@pytest.mark.parametrize("lo,hi", PAIRS)
def test_truncnorm_entropy_and_variance(lo, hi):
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    with mp.workdps(120):  # the variance formula cancels ~hi**4: 40 digits at hi = -5e9
        lo_m, hi_m = mp.mpf(lo), mp.mpf(hi)
        z = mpref._z(lo_m, hi_m)
        phi = mpref._phi
        entropy = mp.log(mp.sqrt(2 * mp.pi * mp.e) * z) + (lo_m * phi(lo_m) - hi_m * phi(hi_m)) / (2 * z)
        mean = (phi(lo_m) - phi(hi_m)) / z
        var = 1 + (lo_m * phi(lo_m) - hi_m * phi(hi_m)) / z - mean**2
    assert rel_err(sp.truncnorm_entropy(lo_t, hi_t).item(), entropy) < 1e-10
    if max(abs(lo), abs(hi)) < 1e6:  # beyond, mpmath's erfc is not accurate enough for the reference
        assert rel_err(sp.truncnorm_variance(lo_t, hi_t).item(), var) < 1e-9


def test_truncnorm_variance_far_tail_is_one_over_bound_squared():
    # one-sided limit: Var = 1/hi^2 (1 - 5/hi^2 + ...); at |hi| = 5e9 the correction is 2e-19
    for lo, hi in [(-1e10, -5e9), (5e9, 1e10)]:
        v = sp.truncnorm_variance(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
        assert v.item() == pytest.approx(1 / 5e9**2, rel=1e-14)


def test_log1mexp_both_branches():
    x = torch.tensor([-1e-20, -1e-5, -0.5, -math.log(2), -1.0, -50.0], dtype=torch.float64)
    got = sp.log1mexp(x)
    for xi, gi in zip(x.tolist(), got.tolist()):
        assert rel_err(gi, mp.log(1 - mp.exp(mp.mpf(xi)))) < 1e-14


def test_piecewise_only_runs_each_branch_on_its_elements():
    x = torch.tensor([-2.0, 3.0, 0.0, 5.0], requires_grad=True)
    out = sp.piecewise((x > 0, x <= 0), (torch.log, lambda v: v * 2.0), x)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([-4.0, math.log(3.0), 0.0, math.log(5.0)]))
    # log's gradient at 0 or below would be inf/nan if it had run there
    assert torch.allclose(x.grad, torch.tensor([2.0, 1 / 3, 2.0, 0.2]))


def test_piecewise_scalar_and_tuple_outputs():
    a = torch.tensor(1.5)
    out = sp.piecewise((a > 0, a <= 0), (lambda v: (v, -v), lambda v: (v * 0, v * 0)), a)
    assert out[0].shape == () and out[0].item() == 1.5 and out[1].item() == -1.5
