"""The hand-written Skellam accountant against Renyi divergences summed numerically from the real
1-D ``scipy.stats.skellam`` pmfs, and against Opacus' subsampled Gaussian as the variance grows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import skellam

from dpfl.privacy.accounting import PrivacyLedger, Segment, compute_epsilon, epsilon_for_segments
from dpfl.privacy.accounting.skellam import skellam_rdp, subsampled_rdp

# (variance mu, integer sensitivity) -- in 1-D, Delta_1 = Delta_2 = the shift
SETTINGS = [(4.0, 1), (25.0, 2), (100.0, 3), (400.0, 5)]
ORDERS = [2, 3, 8, 32]


def renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[keep] + (1 - alpha) * log_q[keep])) / (alpha - 1)


def pmfs(mu: float, shift: int) -> tuple[np.ndarray, np.ndarray]:
    reach = int(60 * math.sqrt(mu)) + 60
    k = np.arange(-reach, reach + shift + 1)
    return skellam.logpmf(k, mu / 2, mu / 2), skellam.logpmf(k - shift, mu / 2, mu / 2)


@pytest.mark.parametrize(("mu", "shift"), SETTINGS)
def test_the_skellam_bound_holds_for_the_real_pmfs(mu, shift, capsys):
    p, q = pmfs(mu, shift)
    z = math.sqrt(mu) / shift
    for alpha in ORDERS:
        numeric = max(renyi(q, p, alpha), renyi(p, q, alpha))
        bound = skellam_rdp(alpha, z, shift, shift)
        assert numeric <= bound
        with capsys.disabled():
            print(
                f"\nSkellam mu={mu:g} shift={shift} alpha={alpha}: numeric {numeric:.6g} "
                f"bound {bound:.6g} (gap {bound / numeric - 1:.2%})",
                end="",
            )


@pytest.mark.parametrize(("mu", "shift"), SETTINGS[:3])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_the_subsampling_bound_holds_for_the_real_mixtures(mu, shift, rate):
    p, q = pmfs(mu, shift)
    mixture = np.logaddexp(math.log1p(-rate) + p, math.log(rate) + q)
    z = math.sqrt(mu) / shift
    for alpha in (2, 4, 16):
        numeric = max(renyi(mixture, p, alpha), renyi(p, mixture, alpha))
        bound = subsampled_rdp(alpha, rate, lambda a: skellam_rdp(a, z, shift, shift))
        assert numeric <= bound
        assert bound <= skellam_rdp(alpha, z, shift, shift)  # never above the unsampled


def test_epsilon_approaches_the_gaussian_as_the_variance_grows():
    # The Skellam correction vanishes as mu grows: without subsampling the epsilon becomes
    # Opacus' Gaussian epsilon; with it, the gap left is Zhu-Wang's general bound's, not
    # Skellam's (measured here: +16 % at q = 0.1, z = 0.8).
    for rate, rounds in ((1.0, 1), (0.1, 100)):
        gaussian = compute_epsilon(0.8, rate, rounds, 1e-6).epsilon
        ratios = []
        for l2 in (3.0, 30.0, 300.0, 3000.0):
            segment = Segment(0.8, rate, rounds, l2, min(l2 * l2, 256 * l2))
            ratios.append(epsilon_for_segments([segment], 1e-6).epsilon / gaussian)
        assert ratios == sorted(ratios, reverse=True)
        assert ratios[-1] >= 1 - 1e-3
        assert ratios[-1] - ratios[-2] < 1e-3  # converged
        assert ratios[-1] < (1.01 if rate == 1 else 1.25)


def test_a_ledger_keeps_skellam_rounds_apart_and_reads_old_checkpoints():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.1)
    ledger.record(1.0, 0.1, 1, 500.0, 900.0)
    ledger.record(1.0, 0.1, 1, 500.0, 900.0)
    assert [(s.steps, s.skellam) for s in ledger.segments] == [(1, False), (2, True)]
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again == ledger
    old = PrivacyLedger.from_dict(
        {"segments": [{"noise_multiplier": 1, "sample_rate": 0.1, "steps": 3}]}
    )
    assert not old.segments[0].skellam
    with pytest.raises(ValueError, match="both sensitivities"):
        Segment(1.0, 0.1, 1, 5.0, 0.0)
    # PRV and PLD have no Skellam event: refused, or RDP with a note
    result = ledger.epsilon(1e-6, "pld", fallback=True)
    assert result.accountant == "rdp" and "Skellam" in result.note
