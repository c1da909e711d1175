"""Accountant tests against numbers that the code under test does not derive itself: the paper's
published budgets, Google's dp-accounting (RDP and PLD, called directly here), and the analytic
Gaussian mechanism of Balle and Wang (2018), implemented below from its formula."""

import math

import dp_accounting
import pytest
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp
from scipy.optimize import brentq
from scipy.stats import norm

import dpfl.privacy.accounting as acc
from dpfl.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    AccountantRangeError,
    PrivacyLedger,
    Segment,
    calibrate_noise_multiplier,
    compute_epsilon,
    default_delta,
    epsilon_for_segments,
    extrapolate,
    scaled_settings,
)
from dpfl.privacy.mechanisms import noise_multiplier_from_sigma_dp

# (z, q, T, delta): the paper's two headline settings and four common ones.
SETTINGS = [
    (0.6144, 204_800 / 69_506_000, 2034, 1e-9),
    (2.048, 204_800 / 6_950_600, 2006, 1e-9),
    (1.1, 0.01, 1000, 1e-5),
    (0.8, 0.05, 300, 1e-6),
    (3.0, 0.1, 100, 1e-7),
    (1.5, 0.002, 5000, 1e-8),
]


def dpa_event(z, q):
    g = dp_accounting.GaussianDpEvent(z)
    return g if q == 1 else dp_accounting.PoissonSampledDpEvent(q, g)


# --- the paper's headline budgets -------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma_dp, cohort, population, rounds, expected",
    [(3e-6, 204_800, 69_506_000, 2034, 7.2), (1e-5, 204_800, 6_950_600, 2006, 4.5)],
)
def test_paper_headline_budgets(sigma_dp, cohort, population, rounds, expected):
    z = noise_multiplier_from_sigma_dp(sigma_dp, cohort)
    result = compute_epsilon(z, cohort / population, rounds, 1e-9, "rdp")
    assert result.epsilon == pytest.approx(expected, abs=0.1)
    assert result.accountant == "rdp" and result.note is None


def test_default_orders_put_the_optimum_inside_the_range():
    # The paper's settings, and a small-epsilon one whose optimum (~ 1 + log(1/delta)/eps) lies
    # above Opacus' default maximum order of 63.
    for z, q, t, delta in SETTINGS[:2] + [(20.0, 0.01, 100, 1e-9)]:
        r = compute_epsilon(z, q, t, delta)
        assert DEFAULT_RDP_ORDERS[0] < r.optimal_order < DEFAULT_RDP_ORDERS[-1]
    assert compute_epsilon(20.0, 0.01, 100, 1e-9).optimal_order > 63


# --- cross-checks between independent implementations -----------------------------------------


@pytest.mark.parametrize("z, q, t, delta", SETTINGS)
def test_rdp_matches_dp_accounting_rdp(z, q, t, delta):
    ref = dpa_rdp.RdpAccountant()  # its own default orders and conversion
    ref.compose(dpa_event(z, q), t)
    ours = compute_epsilon(z, q, t, delta, "rdp").epsilon
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=0.02)


@pytest.mark.parametrize("z, q, t, delta", SETTINGS)
def test_prv_matches_dp_accounting_pld(z, q, t, delta):
    ref = dpa_pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dpa_event(z, q), t)
    ours = compute_epsilon(z, q, t, delta, "prv")
    assert ours.accountant == "prv"
    assert ours.epsilon == pytest.approx(ref.get_epsilon(delta), rel=0.02)


@pytest.mark.parametrize("z, q, t, delta", SETTINGS)
def test_pld_is_tighter_than_rdp_and_close_to_prv(z, q, t, delta):
    pld = compute_epsilon(z, q, t, delta, "pld").epsilon
    rdp = compute_epsilon(z, q, t, delta, "rdp").epsilon
    prv = compute_epsilon(z, q, t, delta, "prv").epsilon
    assert pld <= rdp
    assert pld == pytest.approx(prv, rel=0.02)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (ICML 2018), Theorem 8: the Gaussian mechanism with L2 sensitivity 1 and
    std sigma is (eps, delta)-DP iff
    Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta."""

    def excess(eps: float) -> float:
        return (
            norm.cdf(0.5 / sigma - eps * sigma)
            - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)
            - delta
        )

    return brentq(excess, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("z, delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (5.0, 1e-9)])
def test_pld_single_gaussian_matches_analytic_mechanism(z, delta):
    ours = compute_epsilon(z, 1.0, 1, delta, "pld").epsilon
    exact = analytic_gaussian_epsilon(z, delta)
    assert ours >= exact - 1e-9  # PLD is a pessimistic (upper) bound
    assert ours == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("z, q, t, delta", [SETTINGS[1], SETTINGS[2], SETTINGS[4]])
def test_calibration_inverts_epsilon(accountant, z, q, t, delta):
    target = compute_epsilon(z, q, t, delta, accountant).epsilon
    z_found = calibrate_noise_multiplier(target, delta, q, t, accountant)
    got = compute_epsilon(z_found, q, t, delta, accountant).epsilon
    assert target * 0.99 <= got <= target
    assert z_found == pytest.approx(z, rel=0.02)


@pytest.mark.long
@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_calibration_near_the_grid_limit(accountant):
    """The paper's real cohort (q = 1024/34753, T = 2000): targets whose z lies just above the
    accountant's refusal limit calibrate; targets that need a refused z are refused, not misread
    as 'already met'."""
    q, t = 1024 / 34_753, 2000
    ok_target = {"prv": 70.0, "pld": 300.0}[accountant]
    z = calibrate_noise_multiplier(ok_target, 1e-9, q, t, accountant)
    assert ok_target * 0.99 <= compute_epsilon(z, q, t, 1e-9, accountant).epsilon <= ok_target
    with pytest.raises(AccountantRangeError, match="smallest .* can compute here"):
        calibrate_noise_multiplier(
            {"prv": 200.0, "pld": 5000.0}[accountant], 1e-9, q, t, accountant
        )


def test_prv_calibration_for_a_small_target_above_the_rdp_answer():
    # PRV's upper bound carries 0.01 of absolute slack, so at small epsilon it can exceed RDP's:
    # the search must walk above RDP's z instead of declaring the target unreachable.
    q, t, delta, target = 0.489, 500, 2.9e-7, 0.107
    z_rdp = calibrate_noise_multiplier(target, delta, q, t, "rdp")
    assert compute_epsilon(z_rdp, q, t, delta, "prv").epsilon > target
    z = calibrate_noise_multiplier(target, delta, q, t, "prv")
    assert z > z_rdp
    assert target * 0.99 <= compute_epsilon(z, q, t, delta, "prv").epsilon <= target


@pytest.mark.long
def test_calibration_out_of_range_names_the_range():
    with pytest.raises(ValueError, match=r"above 10000, the top of the calibration search range"):
        calibrate_noise_multiplier(1e-6, 1e-5, 0.01, 1000)
    with pytest.raises(ValueError, match=r"already met .* bottom of the calibration search range"):
        calibrate_noise_multiplier(1e15, 1e-5, 0.01, 10)
    with pytest.raises(AccountantRangeError, match="the smallest pld can compute here"):
        calibrate_noise_multiplier(1e4, 1e-5, 0.01, 1000, "pld")
    with pytest.raises(ValueError, match="rel_tol"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, rel_tol=2.0)


# --- tiny noise: bounded time and memory ------------------------------------------------------


@pytest.mark.parametrize(
    "accountant, z",
    [(a, z) for a in ("prv", "pld") for z in (0.003, 0.01024, 0.05, 0.12)] + [("prv", 0.4)],
)
def test_tiny_noise_is_refused_before_any_grid_is_built(monkeypatch, accountant, z):
    # The paper's real cohorts: S = 1,024 of K = 34,753, T = 2,000, z = sigma_DP * 1024.
    q, t = 1024 / 34_753, 2000

    def must_not_run(*args, **kwargs):
        raise AssertionError("the grid computation ran for a refused setting")

    monkeypatch.setattr(acc.get_accountant("prv"), "compute", must_not_run)
    monkeypatch.setattr(acc.get_accountant("pld"), "compute", must_not_run)
    with pytest.raises(AccountantRangeError, match="use the rdp accountant"):
        compute_epsilon(z, q, t, 1e-9, accountant)
    fallback = compute_epsilon(z, q, t, 1e-9, accountant, fallback=True)
    assert fallback.accountant == "rdp" and fallback.requested == accountant
    assert "fell back to rdp" in fallback.note
    assert fallback.epsilon == compute_epsilon(z, q, t, 1e-9, "rdp").epsilon


@pytest.mark.parametrize("z", [1e-5, 1e-155, 1e-300])
def test_vanishing_noise_is_unbounded_without_hanging(z):
    # Opacus' fractional-order series never terminates near z = 1e-154 and divides by zero at
    # 1e-300; dpfl reports epsilon as unbounded below 1e-4 without calling it.
    r = compute_epsilon(z, 0.1, 10, 1e-5)
    assert math.isinf(r.epsilon) and "unbounded" in r.note
    r = compute_epsilon(z, 0.1, 10, 1e-5, "pld", fallback=True)
    assert math.isinf(r.epsilon) and "refuses" in r.note


def test_epsilon_is_never_negative():
    # With a huge delta the RDP conversion dips below zero; epsilon's floor is 0.
    for name in ("rdp", "prv", "pld"):
        assert compute_epsilon(100.0, 0.001, 1, 0.5, name).epsilon >= 0.0


def test_rdp_at_the_papers_tiny_noise_is_finite_and_huge():
    r = compute_epsilon(noise_multiplier_from_sigma_dp(3e-6, 1024), 1024 / 34_753, 2000, 1e-9)
    assert math.isfinite(r.epsilon) and r.epsilon > 1e6
    assert "smallest RDP order" in r.note


def test_the_documented_guard_lets_moderate_noise_through():
    # Above the guard the real computation runs (and agrees with RDP's upper bound).
    q, t = 1024 / 34_753, 2000
    pld = compute_epsilon(0.5, q, t, 1e-9, "pld")
    assert pld.accountant == "pld" and pld.epsilon < compute_epsilon(0.5, q, t, 1e-9).epsilon


# --- ledger -----------------------------------------------------------------------------------


def test_ledger_merges_consecutive_equal_rounds():
    ledger = PrivacyLedger()
    for _ in range(250):
        ledger.record(1.1, 0.01)
    assert ledger.segments == (Segment(1.1, 0.01, 250),)


def test_alternating_settings_are_grouped_before_accounting(monkeypatch):
    # 60 alternating rounds: the accountants see 2 segments, and the same epsilon as in order.
    ledger = PrivacyLedger()
    for i in range(60):
        ledger.record(1.0 if i % 2 else 2.0, 0.02)
    assert len(ledger.segments) == 60
    seen = []
    pld = acc.get_accountant("pld")
    real = pld.compute
    monkeypatch.setattr(pld, "compute", lambda segs, d: seen.append(len(segs)) or real(segs, d))
    got = ledger.epsilon(1e-6, "pld").epsilon
    assert seen == [2]
    ref = dpa_pld.PLDAccountant(value_discretization_interval=1e-3)
    for i in range(60):
        ref.compose(dpa_event(1.0 if i % 2 else 2.0, 0.02))
    assert got == pytest.approx(ref.get_epsilon(1e-6), rel=0.02)


def test_ledger_with_changing_noise_and_rate_matches_dp_accounting():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.02, 100)
    ledger.record(2.0, 0.05, 50)
    ledger.record(2.0, 0.05, 50)  # merged
    ledger.record(1.0, 0.02, 10)
    assert [s.steps for s in ledger.segments] == [100, 100, 10]
    rdp_ref = dpa_rdp.RdpAccountant(orders=list(DEFAULT_RDP_ORDERS))
    pld_ref = dpa_pld.PLDAccountant(value_discretization_interval=1e-4)
    for ref in (rdp_ref, pld_ref):
        ref.compose(dpa_event(1.0, 0.02), 100)
        ref.compose(dpa_event(2.0, 0.05), 100)
        ref.compose(dpa_event(1.0, 0.02), 10)
    assert ledger.epsilon(1e-6, "rdp").epsilon == pytest.approx(rdp_ref.get_epsilon(1e-6), rel=0.01)
    for name in ("prv", "pld"):
        assert ledger.epsilon(1e-6, name).epsilon == pytest.approx(
            pld_ref.get_epsilon(1e-6), rel=0.02
        )


def test_ledger_roundtrip_and_lookahead():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.02, 100)
    ledger.record(0.8, 0.02, 3)
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again == ledger
    ahead = ledger.epsilon_after(0.8, 0.02, 10, 1e-6)
    assert ahead.epsilon > ledger.epsilon(1e-6).epsilon
    assert ledger.rounds == 103  # lookahead does not record
    with pytest.raises(ValueError, match="not a privacy ledger"):
        PrivacyLedger.from_dict({"rounds": 3})


def test_empty_and_noiseless_ledgers():
    assert PrivacyLedger().epsilon(1e-5).epsilon == 0.0
    ledger = PrivacyLedger()
    ledger.record(0.0, 0.1, 5)
    assert math.isinf(ledger.epsilon(1e-5, "pld").epsilon)


# --- extrapolation ----------------------------------------------------------------------------


def test_extrapolation_reproduces_the_papers_scaling():
    # Common Voice: 34,753 speakers, cohort 1,024. x200 both -> the eps 4.5 row;
    # cohort x200 and population x2000 -> (204,800, 69,506,000), the eps 7.2 row at 3e-6.
    assert scaled_settings(1024, 34_753, [200]) == [(204_800, 6_950_600)]
    # real-valued cohorts are kept as they are: q and z follow the scale exactly
    ((row,),) = [extrapolate(1 / 3.5, scaled_settings(3.5, 7, [2]), 10, 1e-2)]
    assert (row.sample_rate, row.noise_multiplier) == pytest.approx((0.5, 2.0))
    rows = extrapolate(1e-5, [(1024, 34_753), (204_800, 6_950_600)], 2006, 1e-9)
    assert rows[0].noise_multiplier == pytest.approx(0.01024)
    assert rows[0].result.epsilon > 1e5
    assert rows[1].noise_multiplier == pytest.approx(2.048)
    assert rows[1].sample_rate == pytest.approx(1024 / 34_753)
    assert rows[1].result.epsilon == pytest.approx(4.5, abs=0.1)
    (row,) = extrapolate(3e-6, [(204_800, 69_506_000)], 2034, 1e-9)
    assert row.result.epsilon == pytest.approx(7.2, abs=0.1)
    # epsilon falls as population and cohort grow together
    eps = [
        r.result.epsilon
        for r in extrapolate(1e-5, scaled_settings(1024, 34_753, [1, 10, 100, 1000]), 2006, 1e-9)
    ]
    assert eps == sorted(eps, reverse=True)


def test_extrapolation_rejects_cohort_above_population():
    with pytest.raises(ValueError, match="cohort <= population"):
        extrapolate(1e-5, [(10, 5)], 100, 1e-9)
    with pytest.raises(ValueError, match="finite and > 0"):
        scaled_settings(10, 100, [float("inf")])


def test_default_delta_stays_below_one_over_every_extrapolated_population():
    assert default_delta(34_753) == pytest.approx(1e-9)  # the paper's delta for its population
    assert default_delta(34_753, headroom=1) == pytest.approx(1e-6)  # the plain 0.1/K rule
    for k in (1, 10, 999, 1000, 6_950_600):
        assert default_delta(k) <= 0.1 / (1000 * k)
        # the report extrapolates to 10x, 100x, 1000x K and keeps delta: always below 1/K'
        assert all(default_delta(k) * k * scale < 1 for scale in (10, 100, 1000))
    with pytest.raises(ValueError, match="headroom"):
        default_delta(10, headroom=0.5)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        ((1.0, 0.0, 10, 1e-5), r"sampling rate q must be in \(0, 1\]"),
        ((1.0, 1.5, 10, 1e-5), r"sampling rate q must be in \(0, 1\]"),
        ((1.0, 0.1, 10, 0.0), r"delta must be in \(0, 1\)"),
        ((1.0, 0.1, 10, 1.0), r"delta must be in \(0, 1\)"),
        ((-1.0, 0.1, 10, 1e-5), "noise multiplier must be a finite number >= 0"),
        ((float("nan"), 0.1, 10, 1e-5), "noise multiplier"),
        ((1.0, 0.1, -1, 1e-5), "rounds must be >= 0"),
    ],
)
def test_bad_input_is_a_clear_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        compute_epsilon(*args)


def test_accountants_are_one_interface_in_one_registry():
    """Every accountant is a PrivacyAccountant found by name; a new one registers the same way
    and is then accepted wherever an accountant is named."""
    assert acc.ACCOUNTANTS == ("rdp", "prv", "pld")
    for name in acc.ACCOUNTANTS:
        assert isinstance(acc.get_accountant(name), acc.PrivacyAccountant)

    class Doubled(acc.PrivacyAccountant):  # twice RDP's epsilon: a valid, looser bound
        name = "rdp2"

        def compute(self, segments, delta):
            eps, note, order = acc.get_accountant("rdp").compute(segments, delta)
            return 2 * eps, note, order

    acc.register_accountant(Doubled())
    try:
        got = compute_epsilon(1.0, 0.1, 10, 1e-5, "rdp2")
        assert got.epsilon == 2 * compute_epsilon(1.0, 0.1, 10, 1e-5).epsilon
        assert got.accountant == "rdp2"
    finally:
        del acc.REGISTRY["rdp2"]


def test_unknown_accountant():
    with pytest.raises(ValueError, match="accountant must be one of rdp, prv, pld"):
        compute_epsilon(1.0, 0.1, 10, 1e-5, "gdp")
    with pytest.raises(TypeError, match="rounds must be an integer"):
        epsilon_for_segments([Segment(1.0, 0.1, 2.5)], 1e-5)
