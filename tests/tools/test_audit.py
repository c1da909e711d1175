import math

import pytest

from dpfl.tools.audit import clopper_pearson, epsilon_lower_bound, run_audit


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = clopper_pearson(50, 100)
    assert lo == pytest.approx(0.3983, abs=1e-4) and hi == pytest.approx(0.6017, abs=1e-4)


def test_lower_bound_from_rates():
    # a perfect attack on n trials certifies about ln(n / 3) (the 95 % upper bound on FPR = 0)
    n = 5000
    assert epsilon_lower_bound(n, 0, 0, n, 1e-5) == pytest.approx(
        math.log((0.025 ** (1 / n) - 1e-5) / (1 - 0.025 ** (1 / n))), rel=1e-6
    )
    assert 0.95 * math.log(n / 3) < epsilon_lower_bound(n, 0, 0, n, 1e-5) < math.log(n / 3) + 0.2
    assert epsilon_lower_bound(500, 500, 500, 500, 1e-5) == 0  # a coin flip certifies nothing


@pytest.mark.parametrize("mode", ["correct", "no-noise", "no-clip"])
def test_audit_separates_the_real_mechanism_from_broken_ones(mode):
    r = run_audit(trials=1500, noise_multiplier=4.0, mode=mode, seed=1)
    assert 0.9 < r.claimed_epsilon < 2  # a setting the trials can speak to
    assert not r.canary_poisson_sampled
    if mode == "correct":
        assert r.epsilon_lower_bound <= r.claimed_epsilon and not r.exceeds_claim
    else:
        assert r.epsilon_lower_bound > 2 * r.claimed_epsilon and r.exceeds_claim


def test_audit_input_errors():
    with pytest.raises(ValueError, match="unknown audit mode 'off'; known: correct, no-noise"):
        run_audit(mode="off")
    with pytest.raises(ValueError, match=">= 100 trials"):
        run_audit(trials=10)
