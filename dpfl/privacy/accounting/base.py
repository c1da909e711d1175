"""The accountant interface and registry, and the values every accountant shares.

An accountant turns the rounds a run charged (:class:`Segment`: noise multiplier z, Poisson rate
q, rounds) into epsilon at a delta. Each one is a small class behind :class:`PrivacyAccountant`
(as Opacus' ``IAccountant``), registered by name with :func:`register`; the rest of dpfl asks
:func:`get` for one and never branches on names.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ADJACENCY = "add/remove one user"
SAMPLING = "Poisson sampling of users, each independently with probability q per round"


class AccountantRangeError(ValueError):
    """An accountant refuses a setting it cannot compute in bounded time and memory."""


@dataclass(frozen=True)
class Segment:
    """``steps`` consecutive rounds with the same mechanism, noise multiplier and sampling rate.

    The mechanism is the Gaussian unless ``skellam_l2`` > 0: then it is the Skellam mechanism
    of distributed DP on integers with L2 and L1 sensitivities ``skellam_l2`` and ``skellam_l1``
    and variance (z * skellam_l2)^2 (:mod:`dpfl.privacy.accounting.skellam`)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    skellam_l2: float = 0.0
    skellam_l1: float = 0.0

    @property
    def skellam(self) -> bool:
        return self.skellam_l2 > 0

    @property
    def mechanism(self) -> tuple[float, float, float, float]:
        """What identifies the mechanism of one round: (z, q, Delta_2, Delta_1)."""
        return (self.noise_multiplier, self.sample_rate, self.skellam_l2, self.skellam_l1)

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_rate(self.sample_rate)
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)):
            raise TypeError(f"rounds must be an integer, got {self.steps!r}")
        if self.steps < 0:
            raise ValueError(f"rounds must be >= 0, got {self.steps}")
        if not (self.skellam_l2 >= 0 and self.skellam_l1 >= 0) or (self.skellam_l2 > 0) != (
            self.skellam_l1 > 0
        ):
            raise ValueError(
                "a Skellam segment needs both sensitivities > 0 (a Gaussian one neither), got "
                f"L2 {self.skellam_l2!r}, L1 {self.skellam_l1!r}"
            )


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


class PrivacyAccountant(ABC):
    """Epsilon of the Poisson-subsampled Gaussian mechanism composed over segments.

    Subclasses set ``name`` and implement :meth:`compute`; an accountant that cannot compute
    every setting in bounded time and memory overrides :meth:`refusal` (and sets
    ``min_noise_multiplier``, the smallest z it ever accepts).
    """

    name: str = ""
    min_noise_multiplier: float = 0.0
    """Below this z the accountant always refuses (0: it never refuses)."""

    @property
    def may_refuse(self) -> bool:
        return self.min_noise_multiplier > 0

    def refusal(self, segments: Sequence[Segment], delta: float) -> str | None:
        """Why this accountant will not compute ``segments`` at ``delta``, or None."""
        return None

    @abstractmethod
    def compute(
        self, segments: Sequence[Segment], delta: float
    ) -> tuple[float, str | None, float | None]:
        """(epsilon >= 0, a note or None, the RDP order of the bound or None) for segments
        that all have z > 0 and that :meth:`refusal` accepted."""

    def slack_note(self, eps: float) -> str | None:
        """A note on this accountant's own error at ``eps``, when it matters."""
        return None


REGISTRY: dict[str, PrivacyAccountant] = {}


def register(accountant: PrivacyAccountant) -> PrivacyAccountant:
    """Make ``accountant`` available by its name (config key ``accountant``)."""
    if not accountant.name:
        raise ValueError("an accountant needs a name")
    REGISTRY[accountant.name] = accountant
    return accountant


def get(name: str) -> PrivacyAccountant:
    """The registered accountant ``name``; ValueError listing the others."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"accountant must be one of {', '.join(REGISTRY)}; got {name!r}") from None
