"""The ledger of a run's charged rounds, and the paper's extrapolation of epsilon to larger
populations."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from dpfl.privacy.accounting.base import (
    EpsilonResult,
    Segment,
    _check_noise,
    _check_number,
    _check_rate,
)
from dpfl.privacy.accounting.epsilon import Accountant, epsilon_for_segments


class PrivacyLedger:
    """The rounds a run actually executed, at their *scheduled* sampling rate and noise.

    Consecutive rounds with equal (z, q) are stored as one :class:`Segment`. The server records
    every round it runs, whatever number of clients replied: fewer replies never lower epsilon.
    """

    def __init__(self, segments: Iterable[Segment] = ()) -> None:
        self._segments: list[Segment] = []
        for s in segments:
            self.record(s.noise_multiplier, s.sample_rate, s.steps, s.skellam_l2, s.skellam_l1)

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int = 1,
        skellam_l2: float = 0.0,
        skellam_l1: float = 0.0,
    ) -> None:
        """Charge ``steps`` rounds of the Gaussian mechanism at (z, q), or of the Skellam
        mechanism with those sensitivities (distributed DP)."""
        new = Segment(
            _check_noise(noise_multiplier), _check_rate(sample_rate), steps, skellam_l2, skellam_l1
        )
        if new.steps == 0:
            return
        last = self._segments[-1] if self._segments else None
        if last and last.mechanism == new.mechanism:
            self._segments[-1] = Segment(
                *last.mechanism[:2], last.steps + new.steps, *last.mechanism[2:]
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
        skellam: tuple[float, float] = (0.0, 0.0),
    ) -> EpsilonResult:
        """Epsilon if ``steps`` more rounds ran at (z, q): to stop *before* exceeding a budget.
        ``fallback``: where PRV/PLD refuse, RDP's (larger, so still safe) figure. ``skellam``:
        (Delta_2, Delta_1) of rounds of the Skellam mechanism (distributed DP)."""
        trial = PrivacyLedger(self._segments)
        trial.record(noise_multiplier, sample_rate, steps, *skellam)
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


EXTRAPOLATION_SCALES: tuple[float, ...] = (10, 100, 1000)
"""The populations a report extrapolates epsilon to by default, as multiples of the run's."""


def default_delta(population: int, headroom: float = EXTRAPOLATION_SCALES[-1]) -> float:
    """A power of ten at least 10x below 1/(headroom x population).

    delta << 1/K is the usual rule; the headroom keeps it true for every population the report
    extrapolates epsilon to (up to 1000x K by default), since the extrapolation keeps delta
    fixed, as the DP-FL-for-ASR paper does: for Common Voice's 34,753 speakers this gives its
    delta = 1e-9. ``headroom = 1`` is the plain rule."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if not headroom >= 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    return 10.0 ** (math.floor(math.log10(1.0 / (population * headroom))) - 1)
