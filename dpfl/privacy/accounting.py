"""Privacy accounting for user-level DP-FedAvg: epsilon, noise calibration, ledger, extrapolation.

Mechanism accounted for: each round samples every user independently with probability q (Poisson
sampling), sums their clipped updates (L2 sensitivity C) and adds Gaussian noise of std z*C.
Adjacency: add or remove one user (all of that user's data). Rounds compose adaptively.

Three accountants behind one interface, each from a maintained library:

* ``rdp``: Renyi DP of the Poisson-subsampled Gaussian (Opacus' analysis, Mironov et al. 2019)
  with the improved RDP -> (eps, delta) conversion of Balle et al. 2020 (Opacus
  ``get_privacy_spent``). Fast at any z; the paper's accountant.
* ``prv``: numerical composition of privacy loss random variables (Opacus ``PRVAccountant``,
  Gopi et al. 2021); returns its upper bound on epsilon.
* ``pld``: privacy loss distributions (Google's ``dp_accounting.pld.PLDAccountant``, pessimistic
  estimate, add-or-remove-one adjacency).

PRV and PLD discretise the privacy loss on a grid whose length grows like 1/z^2; for the tiny
noise multipliers of real DP-FL cohorts (z of 0.003-0.1) the grid needs gigabytes to terabytes.
They therefore refuse (raise :class:`AccountantRangeError`), or with ``fallback=True`` fall back
to RDP and say so in :attr:`EpsilonResult.note`, when

* z < ``MIN_NOISE_MULTIPLIER`` (0.1), or
* the loss domain estimated with Opacus' ``compute_safe_domain_size`` needs more grid points than
  ``MAX_GRID_POINTS`` (PRV: 4e6 points at its own mesh; PLD: 1e7 points at
  ``PLD_DISCRETIZATION``). At the paper's q = 0.0295 and T = 2000 this refuses PRV below z ~ 0.46
  and PLD below z ~ 0.14. Measured here: those limits keep each call under about 2 s and 1 GB.

RDP itself reports epsilon as unbounded (inf, a valid upper bound) below z = 1e-4, where epsilon
exceeds 1e11 and Opacus' fractional-order series slows down and, near z = 1e-154, never ends.
PRV's bound carries an absolute slack of ``PRV_EPS_ERROR`` (0.01), which matters at small epsilon.
All three report epsilon >= 0.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq

Accountant = Literal["rdp", "prv", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")

# RDP orders: close to 1 for tiny noise (huge epsilon), a fine grid where the usual optima lie,
# and far enough up (4096) that small target epsilons (optimum ~ 1 + log(1/delta) / eps) are not
# cut off at the largest order, which Opacus' default (max 63) does at delta = 1e-9.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {float(1 + x) for x in np.logspace(-4, -1, 13)}
        | {round(1 + x / 10.0, 2) for x in range(1, 110)}
        | {float(x) for x in range(12, 64)}
        | {float(round(64 * 2 ** (k / 4))) for k in range(25)}  # 64 .. 4096, 4 per octave
    )
)

MIN_NOISE_MULTIPLIER: dict[str, float] = {"prv": 0.1, "pld": 0.1}
# Below this, Opacus' fractional-order RDP series slows down and eventually never terminates
# (z ~ 1e-154); epsilon there exceeds 1e11, so RDP reports it as unbounded (a valid upper bound).
RDP_MIN_NOISE_MULTIPLIER = 1e-4
MAX_GRID_POINTS: dict[str, float] = {"prv": 4e6, "pld": 1e7}
PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-3

# Calibration searches z in this range (log scale).
CALIBRATION_RANGE: tuple[float, float] = (1e-3, 1e4)

ADJACENCY = "add/remove one user"
SAMPLING = "Poisson sampling of users, each independently with probability q per round"


class AccountantRangeError(ValueError):
    """An accountant refuses a setting it cannot compute in bounded time and memory."""


@dataclass(frozen=True)
class Segment:
    """``steps`` consecutive rounds with the same noise multiplier and sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_rate(self.sample_rate)
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)):
            raise TypeError(f"rounds must be an integer, got {self.steps!r}")
        if self.steps < 0:
            raise ValueError(f"rounds must be >= 0, got {self.steps}")


@dataclass(frozen=True)
class EpsilonResult:
    epsilon: float
    delta: float
    accountant: str
    """The accountant that computed ``epsilon`` (differs from ``requested`` after a fallback)."""
    requested: str
    note: str | None = None
    optimal_order: float | None = None
    """RDP only: the order at which the bound was attained."""


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN")
    return v


def _check_noise(z: object) -> float:
    v = _check_number("noise multiplier", z)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {z!r}")
    return v


def _check_rate(q: object) -> float:
    v = _check_number("sampling rate q", q)
    if not 0 < v <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q!r}")
    return v


def _check_delta(delta: object) -> float:
    v = _check_number("delta", delta)
    if not 0 < v < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return v


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {name!r}")
    return name


# --- the three accountants ------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _rdp_per_round(q: float, z: float) -> np.ndarray:
    """RDP of one round at every default order. RDP composes additively, so T rounds cost one
    multiplication; cached because a run asks for the same (q, z) every round."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(DEFAULT_RDP_ORDERS))
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(segments: Sequence[Segment], delta: float) -> tuple[float, float, str | None]:
    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = list(DEFAULT_RDP_ORDERS)
    rdp = np.zeros(len(orders))
    for s in segments:
        rdp = rdp + s.steps * _rdp_per_round(s.sample_rate, s.noise_multiplier)
    if not np.isfinite(rdp).any():
        return math.inf, math.nan, "no noise: epsilon is unbounded"
    with warnings.catch_warnings():
        # Opacus warns when the optimum sits at an end of the order range; we report it instead.
        warnings.simplefilter("ignore", UserWarning)
        eps, order = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    note = None
    if order == orders[0]:
        note = (
            f"optimum at the smallest RDP order ({order:.6g}); the bound is valid but loose "
            "(this little noise over this many rounds gives no meaningful guarantee)"
        )
    elif order == orders[-1]:
        note = f"optimum at the largest RDP order ({order:g}); the bound is valid but loose"
    # The conversion can dip below 0 when delta is large; epsilon = 0 is the true floor.
    return max(0.0, float(eps)), float(order), note


def _grid_points(segments: Sequence[Segment], delta: float, accountant: str) -> float:
    """Grid size the PRV/PLD computation would need, from Opacus' safe loss domain."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    active = [s for s in segments if s.steps > 0]
    with warnings.catch_warnings():
        # Opacus sizes the domain with its own RDP accountant, which warns at tiny noise.
        warnings.simplefilter("ignore", UserWarning)
        half_width = compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(s.sample_rate, s.noise_multiplier) for s in active],
            max_self_compositions=[s.steps for s in active],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta / 1000,
        )
    if accountant == "prv":
        total = sum(s.steps for s in active)
        mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / (delta / 1000)) / 2)
    else:
        mesh = PLD_DISCRETIZATION
    return 2 * half_width / mesh


def _refusal(segments: Sequence[Segment], delta: float, accountant: str) -> str | None:
    z_min = min(s.noise_multiplier for s in segments if s.steps > 0)
    floor = MIN_NOISE_MULTIPLIER[accountant]
    if z_min < floor:
        return (
            f"{accountant} refuses noise multiplier {z_min:.4g} < {floor:g} "
            "(its grid would need too much memory and time)"
        )
    points = _grid_points(segments, delta, accountant)
    if points > MAX_GRID_POINTS[accountant]:
        return (
            f"{accountant} refuses this setting: its loss grid would need {points:.3g} points "
            f"(limit {MAX_GRID_POINTS[accountant]:.0e}) for noise multiplier {z_min:.4g} "
            f"over {sum(s.steps for s in segments)} rounds"
        )
    return None


def _prv_epsilon(segments: Sequence[Segment], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in segments if s.steps > 0]
    with warnings.catch_warnings():
        # q = 1 makes Opacus take log(0) on the way to a correct result, and its internal
        # domain sizing warns about its own RDP orders; neither affects the PRV bound.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return max(0.0, float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)))


def _pld_epsilon(segments: Sequence[Segment], delta: float) -> float:
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    for s in segments:
        if s.steps == 0:
            continue
        event = dp_accounting.GaussianDpEvent(s.noise_multiplier)
        if s.sample_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(s.sample_rate, event)
        acc.compose(event, s.steps)
    return max(0.0, float(acc.get_epsilon(delta)))


def _grouped(segments: Iterable[Segment]) -> list[Segment]:
    """Segments with equal (z, q) merged, wherever they occur.

    The three accountants compose by adding RDP curves or convolving loss distributions, both
    order-independent, so alternating settings cost one segment per distinct setting.
    """
    steps: dict[tuple[float, float], int] = {}
    for s in segments:
        if s.steps > 0:
            key = (s.noise_multiplier, s.sample_rate)
            steps[key] = steps.get(key, 0) + s.steps
    return [Segment(z, q, t) for (z, q), t in steps.items()]


SLACK_NOTE_RATIO = 0.1
"""An accountant's error bound is noted beside epsilon once it reaches this share of it."""


def slack_note(accountant: str, eps: float) -> str | None:
    """PRV's upper bound carries up to ``PRV_EPS_ERROR`` of absolute slack: at small epsilon
    that slack is a large part of the figure (it can read above RDP's), so say so."""
    if accountant != "prv" or eps > PRV_EPS_ERROR / SLACK_NOTE_RATIO:
        return None
    share = PRV_EPS_ERROR / eps if eps > 0 else math.inf
    return (
        f"PRV's error bound (+-{PRV_EPS_ERROR:g} absolute, included in this upper bound) is "
        + (f"{share:.0%} of epsilon" if math.isfinite(share) else "larger than epsilon")
        + ": at this size compare rdp and pld"
    )


def epsilon_for_segments(
    segments: Sequence[Segment],
    delta: float,
    accountant: Accountant = "rdp",
    *,
    fallback: bool = False,
) -> EpsilonResult:
    """Epsilon at ``delta`` for rounds run as ``segments`` (q and z may change between them).

    PRV/PLD outside their range raise :class:`AccountantRangeError`, or with ``fallback=True``
    return the RDP figure with a note saying why.
    """
    delta = _check_delta(delta)
    _check_accountant(accountant)
    segments = _grouped(segments)
    if not segments:
        return EpsilonResult(0.0, delta, accountant, accountant, "no rounds: nothing spent")
    if any(s.noise_multiplier == 0 for s in segments):
        return EpsilonResult(
            math.inf, delta, accountant, accountant, "a round ran without noise: no DP guarantee"
        )
    prefix = ""
    if accountant != "rdp":
        reason = _refusal(segments, delta, accountant)
        if reason is None:
            compute = _prv_epsilon if accountant == "prv" else _pld_epsilon
            eps = compute(segments, delta)
            return EpsilonResult(eps, delta, accountant, accountant, slack_note(accountant, eps))
        if not fallback:
            raise AccountantRangeError(reason + "; use the rdp accountant")
        prefix = f"{reason}; fell back to rdp: "
    z_min = min(s.noise_multiplier for s in segments)
    if z_min < RDP_MIN_NOISE_MULTIPLIER:
        note = (
            f"noise multiplier {z_min:.3g} < {RDP_MIN_NOISE_MULTIPLIER:g}: epsilon (above 1e11) "
            "is reported as unbounded"
        )
        return EpsilonResult(math.inf, delta, "rdp", accountant, prefix + note)
    eps, order, note = _rdp_epsilon(segments, delta)
    full = (prefix + (note or "")).rstrip(": ") or None
    return EpsilonResult(eps, delta, "rdp", accountant, full, order)


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    accountant: Accountant = "rdp",
    *,
    fallback: bool = False,
) -> EpsilonResult:
    """Epsilon after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism."""
    segment = Segment(_check_noise(noise_multiplier), _check_rate(sample_rate), rounds)
    return epsilon_for_segments([segment], delta, accountant, fallback=fallback)


# --- calibration ----------------------------------------------------------------------------


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: Accountant = "rdp",
    *,
    rel_tol: float = 0.005,
) -> float:
    """The smallest noise multiplier (to within the search's precision) whose epsilon after
    ``rounds`` rounds at ``delta`` is at most ``target_epsilon``.

    The returned z satisfies ``target * (1 - rel_tol) <= epsilon(z) <= target`` (or z is pinned to
    a relative precision of 1e-6 where epsilon jumps, as PLD's discretised bound can).
    z is searched in ``CALIBRATION_RANGE`` (PRV/PLD: from their minimum z). A target outside what
    that range reaches raises ValueError naming the range; a target that PRV/PLD could only meet
    with a z they refuse raises :class:`AccountantRangeError`.
    """
    target = _check_number("target epsilon", target_epsilon)
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    q = _check_rate(sample_rate)
    Segment(1.0, q, rounds)  # validates rounds
    if rounds == 0:
        raise ValueError("rounds must be >= 1 to calibrate noise")
    _check_accountant(accountant)
    if not 0 < rel_tol < 0.5:
        raise ValueError(f"rel_tol must be in (0, 0.5), got {rel_tol!r}")

    seen: dict[float, float | None] = {}  # the search revisits its bracket's ends

    def eps(z: float) -> float | None:
        """Epsilon at z, or None where the accountant refuses z (only ever below some z)."""
        if z not in seen:
            try:
                seen[z] = epsilon_for_segments([Segment(z, q, rounds)], delta, accountant).epsilon
            except AccountantRangeError:
                seen[z] = None
        return seen[z]

    def meets(e: float | None) -> bool:
        return e is not None and e <= target

    bottom, top = CALIBRATION_RANGE
    if accountant == "rdp":
        start, factor = 1.0, 4.0
    else:
        # RDP's answer is close to PRV/PLD's (theirs is smaller, up to PRV's 0.01 slack).
        bottom = max(bottom, MIN_NOISE_MULTIPLIER[accountant])
        rdp_z = calibrate_noise_multiplier(target, delta, q, rounds, "rdp", rel_tol=rel_tol)
        start, factor = min(max(rdp_z, bottom), top), 1.25
    range_text = f"[{bottom:.4g}, {top:.4g}]"
    refuse_hint = "" if accountant == "rdp" else " (or the rdp accountant)"

    # Bracket: hi meets the target; lo does not, or is refused.
    z = start
    if meets(eps(z)):
        hi = z
        while True:
            if hi <= bottom:
                message = (
                    f"target epsilon {target:g} is already met at noise multiplier {hi:.4g}, the "
                    f"bottom of the calibration search range {range_text} for {accountant}: "
                    f"choose a smaller target epsilon{refuse_hint}"
                )
                if accountant == "rdp":
                    raise ValueError(message)
                raise AccountantRangeError(message)
            z = max(hi / factor, bottom)
            if not meets(eps(z)):
                lo = z
                break
            hi = z
    else:
        lo = z
        while True:
            if lo >= top:
                raise ValueError(
                    f"target epsilon {target:g} needs a noise multiplier above {top:g}, the top "
                    f"of the calibration search range {range_text} for {accountant}"
                )
            z = min(lo * factor, top)
            if meets(eps(z)):
                hi = z
                break
            lo = z

    # Where lo is refused, bisect toward the smallest z the accountant accepts.
    while eps(lo) is None:
        mid = math.sqrt(lo * hi)
        if hi / lo < 1 + 1e-3:
            e_hi = eps(hi)
            if e_hi >= target * (1 - rel_tol):
                return hi
            raise AccountantRangeError(
                f"target epsilon {target:g} needs a noise multiplier below {hi:.4g}, the "
                f"smallest {accountant} can compute here (epsilon {e_hi:.4g} there); use the rdp "
                "accountant"
            )
        e_mid = eps(mid)
        if meets(e_mid):
            hi = mid
        else:
            lo = mid

    # Root of log eps(z) = log(target * (1 - rel_tol / 2)) in log z (Brent's method: few
    # accountant calls), then bisection keeps the invariant eps(lo) > target >= eps(hi) until
    # eps(hi) is within rel_tol of the target. The bisection also covers PLD, whose discretised
    # epsilon is a step function of z.
    aim = math.log(target * (1 - rel_tol / 2))

    def f(u: float) -> float:
        return math.log(max(min(eps(math.exp(u)), 1e300), 1e-300)) - aim

    try:
        guess = math.exp(brentq(f, math.log(lo), math.log(hi), xtol=rel_tol / 8))
    except ValueError:  # no sign change around aim (epsilon jumps across it)
        guess = None
    if guess is not None:
        for z in (guess, guess * (1 + 1e-4)):
            if z >= hi:
                break
            if meets(eps(z)):
                hi = z
                break
            lo = max(lo, z)
    e_hi = eps(hi)
    while e_hi < target * (1 - rel_tol) and hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        e_mid = eps(mid)
        if e_mid > target:
            lo = mid
        else:
            hi, e_hi = mid, e_mid
    return hi


# --- the ledger -----------------------------------------------------------------------------


class PrivacyLedger:
    """The rounds a run actually executed, at their *scheduled* sampling rate and noise.

    Consecutive rounds with equal (z, q) are stored as one :class:`Segment`. The server records
    every round it runs, whatever number of clients replied: fewer replies never lower epsilon.
    """

    def __init__(self, segments: Iterable[Segment] = ()) -> None:
        self._segments: list[Segment] = []
        for s in segments:
            self.record(s.noise_multiplier, s.sample_rate, s.steps)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        new = Segment(_check_noise(noise_multiplier), _check_rate(sample_rate), steps)
        if new.steps == 0:
            return
        last = self._segments[-1] if self._segments else None
        if last and (last.noise_multiplier, last.sample_rate) == (
            new.noise_multiplier,
            new.sample_rate,
        ):
            self._segments[-1] = Segment(
                last.noise_multiplier, last.sample_rate, last.steps + new.steps
            )
        else:
            self._segments.append(new)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    @property
    def rounds(self) -> int:
        return sum(s.steps for s in self._segments)

    def epsilon(
        self, delta: float, accountant: Accountant = "rdp", *, fallback: bool = False
    ) -> EpsilonResult:
        return epsilon_for_segments(self._segments, delta, accountant, fallback=fallback)

    def epsilon_after(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: Accountant = "rdp",
        *,
        fallback: bool = False,
    ) -> EpsilonResult:
        """Epsilon if ``steps`` more rounds ran at (z, q): to stop *before* exceeding a budget.
        ``fallback``: where PRV/PLD refuse, RDP's (larger, so still safe) figure."""
        trial = PrivacyLedger(self._segments)
        trial.record(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta, accountant, fallback=fallback)

    def to_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self._segments]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        try:
            return cls(Segment(**s) for s in data["segments"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a privacy ledger: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivacyLedger) and self._segments == other._segments

    def __repr__(self) -> str:
        return f"PrivacyLedger({self._segments!r})"


# --- population extrapolation (the DP-FL-for-ASR paper's method) ----------------------------


@dataclass(frozen=True)
class ExtrapolationRow:
    cohort: float
    """Expected cohort size S (real-valued: S = q * K)."""
    population: float
    sample_rate: float
    noise_multiplier: float
    result: EpsilonResult


def scaled_settings(
    cohort: float, population: float, scales: Iterable[float]
) -> list[tuple[float, float]]:
    """(cohort, population) scaled together by each factor, as the paper extrapolates.

    Not rounded: q = S/K and z = sigma_DP * S stay exactly what the scale implies.
    """
    out = []
    for k in scales:
        k = _check_number("scale", k)
        if not math.isfinite(k) or k <= 0:
            raise ValueError(f"an extrapolation scale must be finite and > 0, got {k!r}")
        out.append((cohort * k, population * k))
    return out


def extrapolate(
    sigma_dp: float,
    settings: Iterable[tuple[float, float]],
    rounds: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> list[ExtrapolationRow]:
    """Epsilon at larger populations with the same noise on the average.

    Keeps sigma_DP (noise std on the averaged update, relative to C), C and T fixed; for each
    (expected cohort S, population K) sets z = sigma_DP * S and q = S / K. Training is unchanged
    because the noise on the average is unchanged (the paper's assumption: it also presumes the
    larger cohort of real users gives an average as useful as the smaller one).
    PRV/PLD fall back to RDP where they refuse, saying so in the row's note.
    """
    sigma = _check_number("sigma_dp", sigma_dp)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma_dp must be a finite number > 0, got {sigma_dp!r}")
    rows = []
    for cohort, population in settings:
        s = _check_number("cohort", cohort)
        k = _check_number("population", population)
        if not (math.isfinite(k) and 1 <= s <= k):
            raise ValueError(
                f"need 1 <= cohort <= population (finite), got cohort {cohort:g}, "
                f"population {population:g}"
            )
        z, q = sigma * s, s / k
        result = epsilon_for_segments([Segment(z, q, rounds)], delta, accountant, fallback=True)
        rows.append(ExtrapolationRow(s, k, q, z, result))
    return rows


def default_delta(population: int) -> float:
    """A power of ten at least 10x below 1/population (the usual delta << 1/K rule)."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    return 10.0 ** (math.floor(math.log10(1.0 / population)) - 1)
