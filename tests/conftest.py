import os

import numpy as np
import pytest
import torch

# The vision zoo (tests/zoo) is a tier of its own, run by `make test-zoo` in its own virtual
# environment (torchvision, timm), and so is the real MiniLM checkpoint (tests/minilm,
# `make test-minilm`); the ordinary run leaves both out.
collect_ignore = ([] if os.environ.get("BMRS_ZOO") else ["zoo"]) + ([] if os.environ.get("BMRS_MINILM") else ["minilm"])

# The tests' networks are tiny: one thread per test process avoids oversubscribing the
# cores when pytest-xdist runs several processes (and makes timings irrelevant to results).
torch.set_num_threads(1)

# The grid of the issue: mu in [-30, 10] x log sigma in [-20, 5], step 0.5 (81 x 51 points).
GRID_MU = np.arange(-30.0, 10.0001, 0.5)
GRID_LOG_SIGMA = np.arange(-20.0, 5.0001, 0.5)


def in_inner(mu, log_sigma):
    """The region where relative accuracy is demanded: mu in [-25, 5], log sigma in [-10, 3]."""
    return (mu >= -25) & (mu <= 5) & (log_sigma >= -10) & (log_sigma <= 3)


@pytest.fixture(scope="session")
def grid():
    mu, log_sigma = np.meshgrid(GRID_MU, GRID_LOG_SIGMA, indexing="ij")
    mu, log_sigma = mu.ravel(), log_sigma.ravel()
    return torch.tensor(mu), torch.tensor(log_sigma), in_inner(mu, log_sigma)
