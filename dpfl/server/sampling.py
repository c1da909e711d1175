"""Cohort sampling, drawn by dpfl from user ids and the seed in every way of running.

Poisson sampling is what the accountants assume: each user joins a round independently with
probability q. It is drawn as ``n ~ Binomial(K, q)`` followed by ``n`` distinct ids uniformly at
random, which has exactly the same distribution as K independent coin flips and costs O(n), not
O(K), so a population of 10^6 users is cheap.

Fixed-size sampling (exactly S users without replacement) is available for comparison; the
accountants here do not cover it, so runs that use it report no epsilon.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Sampling = Literal["poisson", "fixed"]
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")


def round_rng(seed: int, round_number: int) -> np.random.Generator:
    """The cohort generator of one round: the same users for the same (seed, round) everywhere."""
    return np.random.default_rng([int(seed), 7, int(round_number)])


def sample_cohort(
    population: int,
    sample_rate: float,
    seed: int,
    round_number: int,
    sampling: Sampling = "poisson",
) -> np.ndarray:
    """Sorted user ids (indices into ``0 .. population - 1``) taking part in ``round_number``."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sample_rate}")
    rng = round_rng(seed, round_number)
    if sampling == "poisson":
        n = int(rng.binomial(population, sample_rate))
    elif sampling == "fixed":
        n = max(1, round(sample_rate * population))
    else:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return np.sort(rng.choice(population, size=n, replace=False))
