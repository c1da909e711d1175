"""Privacy accounting for user-level DP-FedAvg: epsilon, noise calibration, ledger, extrapolation.

Mechanism accounted for: each round samples every user independently with probability q (Poisson
sampling), sums their clipped updates (L2 sensitivity C) and adds Gaussian noise of std z*C.
Adjacency: add or remove one user (all of that user's data). Rounds compose adaptively.

Three accountants behind one interface (:class:`PrivacyAccountant`, registered by name:
:func:`get_accountant`, :func:`register_accountant`), each from a maintained library:

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

Distributed DP's rounds (each client adds a Skellam share to an integer encoding) are a Skellam
mechanism: a :class:`Segment` with ``skellam_l2`` > 0. Neither library has that event, so its RDP
bound (Agarwal et al. 2021) and the general Poisson-subsampling bound (Zhu and Wang 2019) are
written by hand in :mod:`dpfl.privacy.accounting.skellam`; RDP composes them with the Gaussian's
at integer orders, and PRV and PLD refuse them (RDP with a note when falling back).

RDP itself reports epsilon as unbounded (inf, a valid upper bound) below z = 1e-4, where epsilon
exceeds 1e11 and Opacus' fractional-order series slows down and, near z = 1e-154, never ends.
PRV's bound carries an absolute slack of ``PRV_EPS_ERROR`` (0.01), which matters at small epsilon.
All three report epsilon >= 0.
"""

from dpfl.privacy.accounting import rdp  # noqa: I001, F401 (registers rdp first: the default)
from dpfl.privacy.accounting import numerical  # noqa: F401 (registers prv, pld)
from dpfl.privacy.accounting.base import (
    ADJACENCY,
    REGISTRY,
    SAMPLING,
    AccountantRangeError,
    EpsilonResult,
    PrivacyAccountant,
    Segment,
)
from dpfl.privacy.accounting.base import get as get_accountant
from dpfl.privacy.accounting.base import register as register_accountant
from dpfl.privacy.accounting.epsilon import (
    CALIBRATION_RANGE,
    Accountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_for_segments,
    slack_note,
)
from dpfl.privacy.accounting.ledger import (
    EXTRAPOLATION_SCALES,
    ExtrapolationRow,
    PrivacyLedger,
    default_delta,
    extrapolate,
    scaled_settings,
)
from dpfl.privacy.accounting.numerical import PLD_DISCRETIZATION, PRV_EPS_ERROR
from dpfl.privacy.accounting.rdp import DEFAULT_RDP_ORDERS, RDP_MIN_NOISE_MULTIPLIER

ACCOUNTANTS: tuple[str, ...] = tuple(REGISTRY)
"""The registered accountants' names (rdp, prv, pld)."""
MIN_NOISE_MULTIPLIER: dict[str, float] = {
    name: acc.min_noise_multiplier for name, acc in REGISTRY.items() if acc.may_refuse
}

__all__ = [
    "ACCOUNTANTS",
    "ADJACENCY",
    "CALIBRATION_RANGE",
    "DEFAULT_RDP_ORDERS",
    "EXTRAPOLATION_SCALES",
    "MIN_NOISE_MULTIPLIER",
    "PLD_DISCRETIZATION",
    "PRV_EPS_ERROR",
    "RDP_MIN_NOISE_MULTIPLIER",
    "SAMPLING",
    "Accountant",
    "AccountantRangeError",
    "EpsilonResult",
    "ExtrapolationRow",
    "PrivacyAccountant",
    "PrivacyLedger",
    "Segment",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
    "epsilon_for_segments",
    "extrapolate",
    "get_accountant",
    "register_accountant",
    "scaled_settings",
    "slack_note",
]
