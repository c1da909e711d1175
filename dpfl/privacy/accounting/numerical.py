"""Numerical accountants: PRV (Opacus ``PRVAccountant``, Gopi et al. 2021; its upper bound on
epsilon) and PLD (Google's ``dp_accounting.pld.PLDAccountant``, pessimistic estimate,
add-or-remove-one adjacency).

Both discretise the privacy loss on a grid whose length grows like 1/z^2; for the tiny noise
multipliers of real DP-FL cohorts (z of 0.003-0.1) the grid needs gigabytes to terabytes. They
refuse (:meth:`~dpfl.privacy.accounting.base.PrivacyAccountant.refusal`) below
``min_noise_multiplier`` (0.1) and where the loss domain estimated with Opacus'
``compute_safe_domain_size`` needs more grid points than ``max_grid_points`` (PRV: 4e6 at its own
mesh; PLD: 1e7 at ``PLD_DISCRETIZATION``). At the paper's q = 0.0295 and T = 2000 this refuses PRV
below z ~ 0.46 and PLD below z ~ 0.14. Measured here: those limits keep each call under about 2 s
and 1 GB.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from dpfl.privacy.accounting.base import PrivacyAccountant, Segment, register

PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-3
SLACK_NOTE_RATIO = 0.1
"""An accountant's error bound is noted beside epsilon once it reaches this share of it."""


def _half_width(segments: Sequence[Segment], delta: float) -> float:
    """Half the width of the privacy-loss domain, from Opacus' safe domain size."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    active = [s for s in segments if s.steps > 0]
    with warnings.catch_warnings():
        # Opacus sizes the domain with its own RDP accountant, which warns at tiny noise.
        warnings.simplefilter("ignore", UserWarning)
        return compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(s.sample_rate, s.noise_multiplier) for s in active],
            max_self_compositions=[s.steps for s in active],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta / 1000,
        )


class _GridAccountant(PrivacyAccountant):
    min_noise_multiplier = 0.1
    max_grid_points: float = 0.0

    def mesh(self, segments: Sequence[Segment], delta: float) -> float:
        raise NotImplementedError

    def grid_points(self, segments: Sequence[Segment], delta: float) -> float:
        """Grid size the computation would need."""
        return 2 * _half_width(segments, delta) / self.mesh(segments, delta)

    def refusal(self, segments: Sequence[Segment], delta: float) -> str | None:
        if any(s.skellam for s in segments if s.steps > 0):
            return (
                f"{self.name} has no Skellam mechanism (distributed DP: its rounds are "
                "accounted by hand in RDP only)"
            )
        z_min = min(s.noise_multiplier for s in segments if s.steps > 0)
        if z_min < self.min_noise_multiplier:
            return (
                f"{self.name} refuses noise multiplier {z_min:.4g} < "
                f"{self.min_noise_multiplier:g} (its grid would need too much memory and time)"
            )
        points = self.grid_points(segments, delta)
        if points > self.max_grid_points:
            return (
                f"{self.name} refuses this setting: its loss grid would need {points:.3g} points "
                f"(limit {self.max_grid_points:.0e}) for noise multiplier {z_min:.4g} "
                f"over {sum(s.steps for s in segments)} rounds"
            )
        return None


class PRVAccountant(_GridAccountant):
    name = "prv"
    max_grid_points = 4e6

    def mesh(self, segments: Sequence[Segment], delta: float) -> float:
        total = sum(s.steps for s in segments if s.steps > 0)
        return PRV_EPS_ERROR / math.sqrt(total * math.log(12 / (delta / 1000)) / 2)

    def compute(self, segments: Sequence[Segment], delta: float):
        from opacus.accountants import PRVAccountant as OpacusPRV

        acc = OpacusPRV()
        acc.history = [
            (s.noise_multiplier, s.sample_rate, s.steps) for s in segments if s.steps > 0
        ]
        with warnings.catch_warnings():
            # q = 1 makes Opacus take log(0) on the way to a correct result, and its internal
            # domain sizing warns about its own RDP orders; neither affects the PRV bound.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            eps = max(0.0, float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)))
        return eps, self.slack_note(eps), None

    def slack_note(self, eps: float) -> str | None:
        """PRV's upper bound carries up to ``PRV_EPS_ERROR`` of absolute slack: at small
        epsilon that slack is a large part of the figure (it can read above RDP's), so say so."""
        if eps > PRV_EPS_ERROR / SLACK_NOTE_RATIO:
            return None
        share = PRV_EPS_ERROR / eps if eps > 0 else math.inf
        return (
            f"PRV's error bound (+-{PRV_EPS_ERROR:g} absolute, included in this upper bound) is "
            + (f"{share:.0%} of epsilon" if math.isfinite(share) else "larger than epsilon")
            + ": at this size compare rdp and pld"
        )


class PLDAccountant(_GridAccountant):
    name = "pld"
    max_grid_points = 1e7

    def mesh(self, segments: Sequence[Segment], delta: float) -> float:
        return PLD_DISCRETIZATION

    def compute(self, segments: Sequence[Segment], delta: float):
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
        return max(0.0, float(acc.get_epsilon(delta))), None, None


register(PRVAccountant())
register(PLDAccountant())
