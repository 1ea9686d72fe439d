"""Worst relative error of every closed form against mpmath on the issue's grid.

    python scripts/accuracy.py [--full]

Without --full: the inner region mu in [-25, 5] x log sigma in [-10, 3] (about 10 s).
With --full: the whole grid mu in [-30, 10] x log sigma in [-20, 5] at 90 digits (minutes).
"""

import argparse
import sys
from pathlib import Path

import mpmath as mp
import numpy as np
import torch
from torch.distributions import kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import mpref  # noqa: E402

from bmrs import LogUniform, TruncatedLogNormal, bmrs_n_prior, bmrs_u_prior, delta_f  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole grid at 90 digits")
    args = parser.parse_args()
    if args.full:
        mp.mp.dps = 90
    mu, log_sigma = np.meshgrid(np.arange(-30, 10.001, 0.5), np.arange(-20, 5.001, 0.5), indexing="ij")
    mu, log_sigma = mu.ravel(), log_sigma.ravel()
    keep = np.ones_like(mu, bool) if args.full else (mu >= -25) & (mu <= 5) & (log_sigma >= -10) & (log_sigma <= 3)
    mu, log_sigma = mu[keep], log_sigma[keep]
    q = TruncatedLogNormal(torch.tensor(mu), torch.exp(torch.tensor(log_sigma)))
    prior = LogUniform(-20.0, 0.0)
    log2 = mp.log(2)
    cases = {
        "KL(q||p)": (kl_divergence(q, prior), mpref.kl),
        "E[theta]": (q.mean, mpref.mean),
        "std[theta]": (q.stddev, mpref.stddev),
        "SNR": (q.snr, mpref.snr),
        "dF_N (m=-20, s=1e-6)": (delta_f(q, prior, bmrs_n_prior()), lambda m, s: mpref.delta_f_normal(m, s, -20, 1e-6)),
        "dF_N (m=-10, s=2)": (delta_f(q, prior, TruncatedLogNormal(-10.0, 2.0)), lambda m, s: mpref.delta_f_normal(m, s, -10, 2)),
        "dF_U (p=8)": (delta_f(q, prior, bmrs_u_prior(8)), lambda m, s: mpref.delta_f_uniform(m, s, -23 * log2, -8 * log2)),
        "dF_U (p=4)": (delta_f(q, prior, bmrs_u_prior(4)), lambda m, s: mpref.delta_f_uniform(m, s, -23 * log2, -4 * log2)),
    }
    print(f"{len(mu)} grid points ({'whole grid' if args.full else 'inner region'})")
    print(f"{'quantity':<22} {'non-finite':>10} {'worst rel. error':>17}  at (mu, log sigma)")
    for name, (value, ref) in cases.items():
        value = value.detach().numpy()
        errors = [float(abs((v - r) / r)) for v, r in
                  ((value[i], ref(mp.mpf(mu[i]), mp.exp(mp.mpf(log_sigma[i])))) for i in range(len(mu)))]
        worst = int(np.argmax(errors))
        print(f"{name:<22} {int((~np.isfinite(value)).sum()):>10} {errors[worst]:>17.2e}  ({mu[worst]:g}, {log_sigma[worst]:g})")


if __name__ == "__main__":
    main()
