"""Renyi DP of the Poisson-subsampled Skellam mechanism (distributed DP), written by hand.

Neither dp-accounting nor Opacus has a Skellam (or discrete Gaussian) event, subsampled or not, so
the two bounds below are implemented here from their papers:

* the Skellam mechanism (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
  Federated Learning", NeurIPS 2021, Theorem 3.5 / Corollary 3.6): adding Sk(mu) noise (variance mu
  per coordinate, Poisson(mu/2) - Poisson(mu/2)) to an integer vector of L1 and L2 sensitivities
  Delta_1, Delta_2 is (alpha, eps(alpha))-RDP for integer alpha > 1 with

      eps(alpha) <= alpha Delta_2^2 / (2 mu)
                    + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu)).

  The first term is the Gaussian mechanism's at variance mu; the second is the price of
  integers, and vanishes as mu grows;
* Poisson subsampling at rate q (Zhu and Wang, "Poisson Subsampled Renyi Differential Privacy",
  ICML 2019, Theorem 6, the general upper bound for any mechanism, integer alpha >= 2):

      eps_q(alpha) <= 1/(alpha - 1) log( (1-q)^(alpha-1) (alpha q - q + 1)
                      + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
                      + 3 sum_{l=3..alpha} C(alpha, l) (1-q)^(alpha-l) q^l e^((l-1) eps(l)) ),

  and never above eps(alpha) itself (joint convexity), so the smaller of the two is used.

A segment of rounds names the mechanism by its sensitivities: ``mu = (z Delta_2)^2``, so z is, as
for the Gaussian, the noise std in units of the L2 sensitivity. The tests check both bounds
against Renyi divergences summed numerically from ``scipy.stats.skellam``'s pmfs.
"""

from __future__ import annotations

import functools
import math

import numpy as np

INTEGER_ORDERS: tuple[int, ...] = tuple(
    sorted(set(range(2, 64)) | {int(round(64 * 2 ** (k / 4))) for k in range(25)})
)
"""The RDP orders of a composition that includes Skellam rounds: integers (2 .. 4096)."""


def skellam_rdp(alpha: float, noise_multiplier: float, l2: float, l1: float) -> float:
    """eps(alpha) of one Skellam release with mu = (z Delta_2)^2 (Agarwal et al. 2021)."""
    if alpha <= 1:
        raise ValueError(f"RDP order must be > 1, got {alpha}")
    mu = (noise_multiplier * l2) ** 2
    if mu == 0:
        return math.inf
    first = alpha * l2 * l2 / (2 * mu)
    second = min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
    return first + second


def subsampled_rdp(alpha: int, q: float, rdp) -> float:
    """Zhu and Wang's general upper bound on the RDP of a mechanism with RDP ``rdp(order)``
    under Poisson subsampling at rate q, at integer ``alpha`` >= 2; at most ``rdp(alpha)``."""
    if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 2:
        raise ValueError(f"the subsampling bound needs an integer order >= 2, got {alpha}")
    alpha = int(alpha)
    base = rdp(alpha)
    if q >= 1:
        return base
    if q <= 0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1q + math.log(alpha * q - q + 1)]
    from scipy.special import gammaln, logsumexp  # lazily: scipy costs 0.4 s to import

    log_binom = lambda n, k: gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)  # noqa: E731
    terms.append(log_binom(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + rdp(2))
    if alpha >= 3:
        ls = np.arange(3, alpha + 1)
        eps_l = np.array([rdp(int(j)) for j in ls])
        terms.extend(
            math.log(3)
            + log_binom(alpha, ls)
            + (alpha - ls) * log_1q
            + ls * log_q
            + (ls - 1) * eps_l
        )
    bound = float(logsumexp(terms)) / (alpha - 1)
    return min(bound, base)


@functools.lru_cache(maxsize=256)
def skellam_curve(q: float, noise_multiplier: float, l2: float, l1: float) -> np.ndarray:
    """One round's RDP at every order of :data:`INTEGER_ORDERS` (cached: a run asks for the
    same setting every round)."""

    @functools.cache
    def rdp(order: int) -> float:
        return skellam_rdp(order, noise_multiplier, l2, l1)

    curve = np.array([subsampled_rdp(a, q, rdp) for a in INTEGER_ORDERS])
    curve.setflags(write=False)
    return curve
