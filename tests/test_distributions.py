"""TruncatedLogNormal and LogUniform: exact values, sampling, gradients, conventions."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.distributions import kl_divergence

import mpref
from bmrs import LogUniform, TruncatedLogNormal

F64 = torch.float64


def t64(*values):
    return [torch.tensor(v, dtype=F64) for v in values]


def grid_dist(grid, requires_grad=False):
    mu, log_sigma, _ = grid
    mu = mu.clone().requires_grad_(requires_grad)
    log_sigma = log_sigma.clone().requires_grad_(requires_grad)
    return mu, log_sigma, TruncatedLogNormal(mu, torch.exp(log_sigma))


QUANTITIES = {
    "kl": (lambda q: kl_divergence(q, LogUniform(-20.0, 0.0)), mpref.kl),
    "mean": (lambda q: q.mean, mpref.mean),
    "stddev": (lambda q: q.stddev, mpref.stddev),
    "snr": (lambda q: q.snr, mpref.snr),
}


@pytest.mark.parametrize("name", QUANTITIES)
def test_finite_on_the_whole_grid(grid, name):
    _, _, q = grid_dist(grid)
    value = QUANTITIES[name][0](q)
    assert torch.isfinite(value).all(), f"{name}: {(~torch.isfinite(value)).sum()} non-finite"


def test_kl_and_rsample_gradients_finite_on_the_whole_grid(grid):
    mu, log_sigma, q = grid_dist(grid, requires_grad=True)
    kl = kl_divergence(q, LogUniform(-20.0, 0.0))
    theta = q.rsample((4,))
    for out in (kl.sum(), theta.sum()):
        grads = torch.autograd.grad(out, (mu, log_sigma), retain_graph=True)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", QUANTITIES)
def test_matches_mpmath_in_inner_region(grid, name):
    mu, log_sigma, inner = grid
    fn, ref = QUANTITIES[name]
    value = fn(TruncatedLogNormal(mu, torch.exp(log_sigma))).numpy()
    worst = 0.0
    for i in np.flatnonzero(inner.numpy() if isinstance(inner, torch.Tensor) else inner):
        r = ref(mp.mpf(mu[i].item()), mp.exp(mp.mpf(log_sigma[i].item())))
        worst = max(worst, float(abs((value[i] - r) / r)))
    # The issue asks for 1e-6; measured worst case is ~3e-13.
    assert worst < 1e-9, worst


@pytest.mark.parametrize(
    "mu,sigma,kl",
    [(-19, 1, 1.893347505), (-3, 0.5, 2.26994094), (-12, 4, 0.2770307908), (1, 0.3, 4.543762208), (-25, 2, 2.43686384)],
)
def test_math_md_kl_table(mu, sigma, kl):
    q = TruncatedLogNormal(*t64(mu, sigma))
    assert kl_divergence(q, LogUniform(-20.0, 0.0)).item() == pytest.approx(kl, rel=1e-9)


@pytest.mark.parametrize(
    "mu,sigma,m1,m2",
    [(-3, 1, 0.0803259859646, 0.0154305962815), (-15, 4, 4.09200517623e-4, 8.83165486514e-5), (2, 0.5, 0.898239763424, 0.814731304801)],
)
def test_math_md_moment_table(mu, sigma, m1, m2):
    q = TruncatedLogNormal(*t64(mu, sigma))
    assert q.mean.item() == pytest.approx(m1, rel=1e-11)
    assert math.exp(q.log_moment(2.0).item()) == pytest.approx(m2, rel=1e-11)
    assert q.variance.item() == pytest.approx(m2 - m1**2, rel=1e-10)


def test_closed_form_kl_equals_its_defining_integral():
    # validates the reference formula itself: KL = E_q[log q(x) - log p(x)]
    for mu, sigma in [(-19, 1), (-3, 0.5), (2, 0.05), (-24, 3)]:
        mu_m, s_m = mp.mpf(mu), mp.mpf(sigma)
        lz = mpref.log_z(mu_m, s_m)

        def integrand(x):
            log_q = -((x - mu_m) / s_m) ** 2 / 2 - mp.log(s_m * mp.sqrt(2 * mp.pi)) - lz
            return mp.exp(log_q) * (log_q + mp.log(20))

        cuts = sorted({mp.mpf(-20), mp.mpf(0), *[mu_m + k * s_m for k in (-8, 0, 8) if -20 < mu + k * sigma < 0]})
        assert float(abs(mp.quad(integrand, cuts) / mpref.kl(mu_m, s_m) - 1)) < 1e-12


@pytest.mark.parametrize("mu,sigma", [(-3.0, 1.0), (-12.0, 4.0), (0.0, math.exp(-5)), (2.0, 0.5), (-19.5, 0.3), (-25.0, 2.0), (5.0, 0.01)])
def test_rsample_kolmogorov_smirnov_against_cdf(mu, sigma):
    torch.manual_seed(0)
    q = TruncatedLogNormal(*t64(mu, sigma))
    x = torch.log(q.rsample((20000,)))
    stat = stats.kstest(x.numpy(), lambda v: q.cdf_log(torch.tensor(v, dtype=F64)).numpy())
    assert stat.pvalue > 1e-3
    theta = torch.exp(x)
    se = theta.std() / math.sqrt(len(theta))
    assert abs(theta.mean() - q.mean) < 5 * se + 1e-15
    assert abs(x.mean() - q.mean_log) < 5 * x.std() / math.sqrt(len(x)) + 1e-15


def test_rsample_shapes_and_support():
    q = TruncatedLogNormal(torch.zeros(3, 1), torch.ones(4), -20.0, 0.0)
    s = q.rsample((5, 2))
    assert s.shape == (5, 2, 3, 4)
    assert ((s > 0) & (s <= 1)).all()


def test_icdf_inverts_cdf_in_log_space(grid):
    mu, log_sigma, _ = grid
    q = TruncatedLogNormal(mu, torch.exp(log_sigma))
    u = torch.tensor([1e-12, 1e-3, 0.3, 0.5, 0.9, 1 - 1e-6], dtype=F64)[:, None]
    x = q.icdf_log(u)
    # Near a bound the mass can be a sliver narrower than an ulp of x: require u to lie
    # between the CDF at x -/+ 4 ulp (up to rounding of u itself).
    below, above = x.clone(), x.clone()
    for _ in range(4):
        below, above = torch.nextafter(below, below - 1), torch.nextafter(above, above + 1)
    tol = 1e-9 * torch.minimum(u, 1 - u) + 4 * torch.finfo(F64).eps
    assert (q.cdf_log(below) - tol <= u).all() and (u <= q.cdf_log(above) + tol).all()
    # and where the distribution is wide enough to resolve, the round trip is tight
    wide = q.scale / torch.clamp(torch.maximum(-q.beta, q.alpha), min=1.0) > 1e-3
    assert wide.sum() > 1500
    assert ((q.cdf_log(x) - u).abs()[2:5, wide] <= tol.expand_as(x)[2:5, wide]).all()


def test_icdf_gradient_matches_finite_differences(grid):
    mu, log_sigma, inner = grid
    mu, log_sigma = mu[inner], log_sigma[inner]
    u = torch.tensor([1e-9, 0.01, 0.5, 0.99], dtype=F64)[:, None]
    m, ls = mu.clone().requires_grad_(True), log_sigma.clone().requires_grad_(True)
    g_mu, g_ls = torch.autograd.grad(TruncatedLogNormal(m, torch.exp(ls)).icdf_log(u).sum(), (m, ls))

    def x_at(mu_, ls_):
        return TruncatedLogNormal(mu_, torch.exp(ls_)).icdf_log(u).sum(0)

    h = 1e-4 * torch.exp(log_sigma)  # the function varies on the scale of sigma
    fd_mu = (x_at(mu + h, log_sigma) - x_at(mu - h, log_sigma)) / (2 * h)
    fd_ls = (x_at(mu, log_sigma + 1e-5) - x_at(mu, log_sigma - 1e-5)) / 2e-5
    assert torch.allclose(g_mu, fd_mu, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_ls, fd_ls, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mu,sigma", [(-3.0, 1.0), (-15.0, 4.0), (4.0, 0.01), (-21.0, 0.2)])
def test_log_prob_matches_mpmath_and_integrates_to_one(mu, sigma):
    q = TruncatedLogNormal(*t64(mu, sigma))
    mu_m, s_m = mp.mpf(mu), mp.mpf(sigma)
    lz = mpref.log_z(mu_m, s_m)
    xs = torch.linspace(-20, 0, 41, dtype=F64)[1:-1]
    xs = torch.cat([xs, torch.tensor([mu - sigma, mu, mu + sigma], dtype=F64).clamp(-19.999, -1e-3)])
    for x, lp in zip(xs.tolist(), q.log_prob(torch.exp(xs)).tolist()):
        ref = -((x - mu_m) / s_m) ** 2 / 2 - mp.log(s_m * mp.sqrt(2 * mp.pi)) - lz - x
        assert abs(lp - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))
    assert q.log_prob(torch.tensor(2.0, dtype=F64)).item() == -math.inf
    total = mp.quad(lambda x: mp.exp(q.log_prob_log(torch.tensor(float(x), dtype=F64)).item()),
                    sorted({-20.0, 0.0, *[min(max(mu + k * sigma, -20.0), 0.0) for k in (-6, 0, 6)]}))
    assert abs(float(total) - 1) < 1e-8


@pytest.mark.parametrize("mu,sigma", [(-3.0, 1.0), (-15.0, 4.0), (4.0, 0.01), (-21.0, 0.2), (-10.0, 100.0)])
def test_entropy_and_mean_log_match_mpmath(mu, sigma):
    q = TruncatedLogNormal(*t64(mu, sigma))
    h_log_ref = mp.log(20) - mpref.kl(mu, sigma)
    assert q.entropy_log().item() == pytest.approx(float(h_log_ref), rel=1e-11, abs=1e-13)
    assert q.mean_log.item() == pytest.approx(float(mpref.mean_log(mu, sigma)), rel=1e-11)
    assert q.entropy().item() == pytest.approx(float(h_log_ref + mpref.mean_log(mu, sigma)), rel=1e-11)


@settings(max_examples=200, deadline=None)
@given(st.floats(-40.0, 20.0), st.floats(-20.0, 5.0))
def test_kl_is_nonnegative(mu, log_sigma):
    q = TruncatedLogNormal(*t64(mu, math.exp(log_sigma)))
    assert kl_divergence(q, LogUniform(-20.0, 0.0)).item() >= 0.0


def test_kl_is_infinite_outside_the_prior():
    q = TruncatedLogNormal(*t64(-1.0, 1.0), log_low=-25.0, log_high=0.0)
    assert kl_divergence(q, LogUniform(-20.0, 0.0)).item() == math.inf


def test_log_uniform_against_mpmath():
    for lo, hi in [(-20.0, 0.0), (-23 * math.log(2), -8 * math.log(2)), (-1.0, -0.999), (-3.0, 2.0)]:
        p = LogUniform(*t64(lo, hi))
        lo_m, hi_m = mp.mpf(lo), mp.mpf(hi)
        m1 = (mp.exp(hi_m) - mp.exp(lo_m)) / (hi_m - lo_m)
        m2 = (mp.exp(2 * hi_m) - mp.exp(2 * lo_m)) / (2 * (hi_m - lo_m))
        assert p.mean.item() == pytest.approx(float(m1), rel=1e-13)
        assert p.variance.item() == pytest.approx(float(m2 - m1**2), rel=1e-10)
        assert p.entropy().item() == pytest.approx(float(mp.log(hi_m - lo_m) + (lo_m + hi_m) / 2), rel=1e-13, abs=1e-13)
        mid = torch.tensor(0.5 * (lo + hi), dtype=F64)
        assert p.cdf(torch.exp(mid)).item() == pytest.approx(0.5)
        assert torch.log(p.icdf(torch.tensor(0.25, dtype=F64))).item() == pytest.approx(lo + 0.25 * (hi - lo))


def test_log_uniform_sampling_kolmogorov_smirnov():
    torch.manual_seed(1)
    p = LogUniform(*t64(-20.0, 0.0))
    x = torch.log(p.rsample((20000,)))
    assert stats.kstest(x.numpy(), stats.uniform(loc=-20, scale=20).cdf).pvalue > 1e-3


def test_validation_errors():
    with pytest.raises(ValueError, match="scale"):
        TruncatedLogNormal(0.0, -1.0)
    with pytest.raises(ValueError, match="log_low must be smaller"):
        TruncatedLogNormal(0.0, 1.0, log_low=0.0, log_high=-1.0)
    with pytest.raises(ValueError, match="log_low must be smaller"):
        LogUniform(1.0, 1.0)


def test_batch_shapes_broadcast_and_expand():
    q = TruncatedLogNormal(torch.zeros(2, 1), torch.ones(3))
    assert q.batch_shape == (2, 3)
    e = q.expand((4, 2, 3))
    assert e.batch_shape == (4, 2, 3) and e.mean.shape == (4, 2, 3)
    assert torch.allclose(e.mean[0], q.mean)
    assert LogUniform(torch.zeros(2) - 20, 0.0).expand((3, 2)).batch_shape == (3, 2)


def test_float32_parameters_stay_finite():
    mu = torch.linspace(-25, 5, 31).repeat_interleave(14)
    log_sigma = torch.linspace(-10, 3, 14).repeat(31)
    q = TruncatedLogNormal(mu, torch.exp(log_sigma))
    for v in (q.mean, q.stddev, q.snr, kl_divergence(q, LogUniform(-20.0, 0.0)), q.rsample((3,))):
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("mu,log_sigma", [(0.5, -11.5), (3.0, -6.0), (-0.5, -2.0), (-25.0, -6.0), (-21.0, -1.0)])
def test_cdf_near_one_keeps_the_complement(mu, log_sigma):
    # 1 - F where F is near 1, in both tails: computed from the other bound, not as 1 - exp(log F).
    q = TruncatedLogNormal(*t64(mu, math.exp(log_sigma)))
    x = q.icdf_log(torch.tensor([1 - 1e-6, 1 - 1e-3], dtype=F64))
    sigma = mp.exp(mp.mpf(log_sigma))
    for xv, cv in zip(x.tolist(), q.cdf_log(x).tolist()):
        al, be, xi = ((mp.mpf(v) - mu) / sigma for v in (-20, 0, xv))
        exact = (mp.ncdf(-xi) - mp.ncdf(-be)) / (mp.ncdf(-al) - mp.ncdf(-be)) if al > 0 else (
            (mp.ncdf(be) - mp.ncdf(xi)) / (mp.ncdf(be) - mp.ncdf(al))
        )
        assert abs((1 - mp.mpf(cv)) - exact) <= 1e-9 * exact + 2 * 2.0**-53
