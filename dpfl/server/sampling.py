"""Cohort sampling from secret randomness.

Poisson sampling is what the accountants assume: each user joins a round independently with
probability q. It is drawn as ``n ~ Binomial(K, q)`` followed by ``n`` distinct ids uniformly at
random, which has exactly the same distribution as K independent coin flips and costs O(n), not
O(K), so a population of 10^6 users is cheap.

The amplification by sampling that the accountant credits exists only if nobody outside the
server can tell who was sampled. So a :class:`CohortSampler` draws from a cipher-based generator
(:mod:`dpfl.privacy.randomness`) under its own key from the OS, never derived from the data or
training ``seed``, never written anywhere: the cohorts of a secure run cannot be rebuilt by
anybody, the operator included. ``sampling-seed`` keys it from a seed instead, so that cohorts
can be rebuilt from the run folder (:meth:`CohortSampler.from_seed`); that gives up the
amplification against anyone who knows the seed and is reported INSECURE.

Fixed-size sampling (exactly S users without replacement) is available for comparison; the
accountants here do not cover it, so runs that use it report no epsilon.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dpfl.privacy.randomness import CipherStreams, check_secure

Sampling = Literal["poisson", "fixed"]
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
MAX_ATTEMPTS = 1 << 16
"""Attempts per round a sampler can tell apart (retries of one round draw fresh cohorts)."""


def draw_cohort(
    population: int,
    sample_rate: float,
    rng: np.random.Generator,
    sampling: Sampling = "poisson",
) -> np.ndarray:
    """Sorted user ids (indices into ``0 .. population - 1``) drawn with ``rng``."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if sampling == "poisson":
        n = int(rng.binomial(population, sample_rate))
    elif sampling == "fixed":
        n = max(1, round(sample_rate * population))
    else:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return np.sort(rng.choice(population, size=n, replace=False))


class CohortSampler:
    """Draws every round's cohort; attempt ``a`` of round ``r`` uses its own cipher stream, so a
    reproducible sampler gives the same cohort for the same (seed, round, attempt) anywhere."""

    def __init__(self, streams: CipherStreams, seed: int | None = None) -> None:
        check_secure(streams.generator(0))  # a cipher in either mode; secrecy is the key's
        self._streams = streams
        self.seed = seed

    @classmethod
    def secret(cls) -> CohortSampler:
        """Keyed from the OS: nobody can recompute its cohorts."""
        return cls(CipherStreams.secret())

    @classmethod
    def from_seed(cls, seed: int, purpose: str = "sampling") -> CohortSampler:
        """Keyed from ``sampling-seed``: reproducible, INSECURE. ``purpose`` keys independent
        samplers from one seed (the training cohorts, the federated evaluations')."""
        return cls(CipherStreams.from_seed(seed, purpose), seed)

    @property
    def secure(self) -> bool:
        return self._streams.secure

    @property
    def label(self) -> str:
        if self.secure:
            return f"secret ({self._streams.cipher}, keyed from the OS cryptographic source)"
        return (
            f"INSECURE: sampling-seed {self.seed}, cohorts can be rebuilt by anyone who has it "
            "(for experiments only)"
        )

    def cohort(
        self,
        population: int,
        sample_rate: float,
        round_number: int,
        attempt: int = 0,
        sampling: Sampling = "poisson",
    ) -> np.ndarray:
        if not 0 <= attempt < MAX_ATTEMPTS:
            raise ValueError(f"attempt must be in [0, {MAX_ATTEMPTS}), got {attempt}")
        if round_number < 0:
            raise ValueError(f"round_number must be >= 0, got {round_number}")
        rng = self._streams.generator(int(round_number) * MAX_ATTEMPTS + int(attempt))
        return draw_cohort(population, sample_rate, rng, sampling)

    def __repr__(self) -> str:
        return f"CohortSampler({self.label})"
