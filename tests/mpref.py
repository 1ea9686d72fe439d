"""Reference values at 60 significant digits with mpmath: the closed forms of docs/math.md,
evaluated where cancellation cannot hurt, and the defining integrals for spot checks."""

from __future__ import annotations

import mpmath as mp

mp.mp.dps = 60
SQRT2 = mp.sqrt(2)


def _phi(x):
    return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)


def _z(lo, hi):
    """Phi(hi) - Phi(lo) without cancellation (upper tail via the complement)."""
    if lo > 0:
        return (mp.erfc(lo / SQRT2) - mp.erfc(hi / SQRT2)) / 2
    return (mp.erfc(-hi / SQRT2) - mp.erfc(-lo / SQRT2)) / 2


def _std(mu, sigma, a, b):
    mu, sigma, a, b = (mp.mpf(v) for v in (mu, sigma, a, b))
    return mu, sigma, a, b, (a - mu) / sigma, (b - mu) / sigma


def log_z(mu, sigma, a=-20, b=0):
    *_, al, be = _std(mu, sigma, a, b)
    return mp.log(_z(al, be))


def kl(mu, sigma, a=-20, b=0, pa=-20, pb=0):
    mu, sigma, a, b, al, be = _std(mu, sigma, a, b)
    z = _z(al, be)
    entropy = mp.log(mp.sqrt(2 * mp.pi * mp.e) * sigma * z) + (al * _phi(al) - be * _phi(be)) / (2 * z)
    return mp.log(mp.mpf(pb) - pa) - entropy


def moment(k, mu, sigma, a=-20, b=0):
    mu, sigma, a, b, al, be = _std(mu, sigma, a, b)
    return mp.exp(k * mu + k * k * sigma * sigma / 2) * _z(al - k * sigma, be - k * sigma) / _z(al, be)


def mean(mu, sigma, a=-20, b=0):
    return moment(1, mu, sigma, a, b)


def variance(mu, sigma, a=-20, b=0):
    return moment(2, mu, sigma, a, b) - moment(1, mu, sigma, a, b) ** 2


def stddev(mu, sigma, a=-20, b=0):
    return mp.sqrt(variance(mu, sigma, a, b))


def snr(mu, sigma, a=-20, b=0):
    return mean(mu, sigma, a, b) / stddev(mu, sigma, a, b)


def mean_log(mu, sigma, a=-20, b=0):
    mu, sigma, a, b, al, be = _std(mu, sigma, a, b)
    return mu + sigma * (_phi(al) - _phi(be)) / _z(al, be)


def delta_f_normal(mu, sigma, m, s, a=-20, b=0, ra=None, rb=None, pa=-20, pb=0):
    """BMRS_N closed form; the reduced prior N(m, s^2) is truncated to [ra, rb]."""
    ra = a if ra is None else ra
    rb = b if rb is None else rb
    mu, sigma, m, s = (mp.mpf(v) for v in (mu, sigma, m, s))
    v = sigma**2 + s**2
    sig_t = sigma * s / mp.sqrt(v)
    mu_t = (mu * s**2 + m * sigma**2) / v
    lo, hi = max(mp.mpf(a), mp.mpf(ra)), min(mp.mpf(b), mp.mpf(rb))
    log_n = -mp.log(2 * mp.pi * v) / 2 - (mu - m) ** 2 / (2 * v)
    return (
        mp.log(mp.mpf(pb) - pa)
        + log_n
        + mp.log(_z((lo - mu_t) / sig_t, (hi - mu_t) / sig_t))
        - log_z(mu, sigma, a, b)
        - mp.log(_z((ra - m) / s, (rb - m) / s))
    )


def delta_f_uniform(mu, sigma, ra, rb, a=-20, b=0, pa=-20, pb=0):
    """BMRS_U closed form for the reduced prior U[ra, rb] in log space."""
    mu, sigma, ra, rb = (mp.mpf(v) for v in (mu, sigma, ra, rb))
    lo, hi = max(mp.mpf(a), ra), min(mp.mpf(b), rb)
    mass = _z((lo - mu) / sigma, (hi - mu) / sigma) / _z((a - mu) / sigma, (b - mu) / sigma)
    return mp.log(mass) - mp.log((rb - ra) / (mp.mpf(pb) - pa))


def delta_f_integral(mu, sigma, log_reduced, a=-20, b=0, pa=-20, pb=0, points=()):
    """The defining integral log int q(x) p~(x)/p(x) dx, by mpmath quadrature.

    ``log_reduced(x)`` is the reduced prior's log density in x = log theta."""
    mu, sigma = mp.mpf(mu), mp.mpf(sigma)
    lz = log_z(mu, sigma, a, b)

    def f(x):
        log_q = -((x - mu) / sigma) ** 2 / 2 - mp.log(sigma * mp.sqrt(2 * mp.pi)) - lz
        return mp.exp(log_q + log_reduced(x) + mp.log(mp.mpf(pb) - pa))

    # Panels refined geometrically towards every breakpoint, where the integrand may be a
    # sliver (a spike, or the posterior's mass squeezed against a bound).
    base = {mp.mpf(a), mp.mpf(b), *(mp.mpf(p) for p in points)}
    cuts = set(base)
    for c in base:
        for k in range(0, 40, 3):
            cuts.update((c - sigma * mp.mpf(2) ** -k, c + sigma * mp.mpf(2) ** -k))
    cuts = sorted(c for c in cuts if a <= c <= b)
    return mp.log(mp.quad(f, cuts))
