"""Epsilon of a run's charged rounds under any registered accountant (with RDP as the fallback
where another refuses), and noise calibration for a target epsilon."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from dpfl.privacy.accounting.base import (
    AccountantRangeError,
    EpsilonResult,
    Segment,
    _check_delta,
    _check_noise,
    _check_number,
    _check_rate,
    get,
)

Accountant = str
"""A registered accountant's name: rdp, prv or pld."""

# Calibration searches z in this range (log scale).
CALIBRATION_RANGE: tuple[float, float] = (1e-3, 1e4)


def _grouped(segments: Iterable[Segment]) -> list[Segment]:
    """Segments with equal (z, q) merged, wherever they occur.

    The three accountants compose by adding RDP curves or convolving loss distributions, both
    order-independent, so alternating settings cost one segment per distinct setting.
    """
    steps: dict[tuple[float, float, float, float], int] = {}
    for s in segments:
        if s.steps > 0:
            steps[s.mechanism] = steps.get(s.mechanism, 0) + s.steps
    return [Segment(z, q, t, l2, l1) for (z, q, l2, l1), t in steps.items()]


def epsilon_for_segments(
    segments: Sequence[Segment],
    delta: float,
    accountant: Accountant = "rdp",
    *,
    fallback: bool = False,
) -> EpsilonResult:
    """Epsilon at ``delta`` for rounds run as ``segments`` (q and z may change between them).

    An accountant outside its range raises :class:`AccountantRangeError`, or with
    ``fallback=True`` the RDP figure is returned with a note saying why.
    """
    delta = _check_delta(delta)
    chosen = get(accountant)
    segments = _grouped(segments)
    if not segments:
        return EpsilonResult(0.0, delta, accountant, accountant, "no rounds: nothing spent")
    if any(s.noise_multiplier == 0 for s in segments):
        return EpsilonResult(
            math.inf, delta, accountant, accountant, "a round ran without noise: no DP guarantee"
        )
    prefix = ""
    reason = chosen.refusal(segments, delta)
    if reason is not None:
        if not fallback:
            raise AccountantRangeError(reason + "; use the rdp accountant")
        prefix = f"{reason}; fell back to rdp: "
        chosen = get("rdp")
    eps, note, order = chosen.compute(segments, delta)
    full = (prefix + (note or "")).rstrip(": ") or None
    return EpsilonResult(eps, delta, chosen.name, accountant, full, order)


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


def slack_note(accountant: str, eps: float) -> str | None:
    """The accountant's note on its own error at ``eps`` (PRV's absolute slack), or None."""
    return get(accountant).slack_note(eps)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: Accountant = "rdp",
    *,
    rel_tol: float = 0.005,
    segment=None,
    search_range: tuple[float, float] = CALIBRATION_RANGE,
) -> float:
    """The smallest noise multiplier (to within the search's precision) whose epsilon after
    ``rounds`` rounds at ``delta`` is at most ``target_epsilon``.

    The returned z satisfies ``target * (1 - rel_tol) <= epsilon(z) <= target`` (or z is pinned to
    a relative precision of 1e-6 where epsilon jumps, as PLD's discretised bound can).
    ``segment(z, q, rounds)``: the rounds' :class:`Segment` at z (default: the Gaussian's; the
    distributed mode's Skellam sensitivities depend on z through its encoding).
    z is searched in ``search_range`` (default ``CALIBRATION_RANGE``; PRV/PLD: from their
    minimum z). A target outside what
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
    chosen = get(accountant)
    if not 0 < rel_tol < 0.5:
        raise ValueError(f"rel_tol must be in (0, 0.5), got {rel_tol!r}")

    seen: dict[float, float | None] = {}  # the search revisits its bracket's ends

    def eps(z: float) -> float | None:
        """Epsilon at z, or None where the accountant refuses z (only ever below some z)."""
        if z not in seen:
            try:
                seg = segment(z, q, rounds) if segment is not None else Segment(z, q, rounds)
                seen[z] = epsilon_for_segments([seg], delta, accountant).epsilon
            except AccountantRangeError:
                seen[z] = None
        return seen[z]

    def meets(e: float | None) -> bool:
        return e is not None and e <= target

    bottom, top = search_range
    if not chosen.may_refuse or segment is not None:
        start, factor = min(max(1.0, bottom), top), 4.0
    else:
        # RDP's answer is close to PRV/PLD's (theirs is smaller, up to PRV's 0.01 slack).
        bottom = max(bottom, chosen.min_noise_multiplier)
        rdp_z = calibrate_noise_multiplier(target, delta, q, rounds, "rdp", rel_tol=rel_tol)
        start, factor = min(max(rdp_z, bottom), top), 1.25
    range_text = f"[{bottom:.4g}, {top:.4g}]"
    refuse_hint = " (or the rdp accountant)" if chosen.may_refuse else ""

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
                if chosen.may_refuse:
                    raise AccountantRangeError(message)
                raise ValueError(message)
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
        from scipy.optimize import brentq  # lazily: scipy costs 0.4 s to import

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
