"""Renyi DP of the Poisson-subsampled Gaussian (Opacus' analysis, Mironov et al. 2019) with the
improved RDP -> (eps, delta) conversion of Balle et al. 2020 (Opacus ``get_privacy_spent``).
Fast at any z; the paper's accountant."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from dpfl.privacy.accounting.base import PrivacyAccountant, Segment, register
from dpfl.privacy.accounting.skellam import INTEGER_ORDERS, skellam_curve

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

# Below this, Opacus' fractional-order RDP series slows down and eventually never terminates
# (z ~ 1e-154); epsilon there exceeds 1e11, so RDP reports it as unbounded (a valid upper bound).
RDP_MIN_NOISE_MULTIPLIER = 1e-4


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


@functools.lru_cache(maxsize=256)
def _gaussian_integer_orders(q: float, z: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=q, noise_multiplier=z, steps=1, orders=[float(a) for a in INTEGER_ORDERS]
        )
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(segments: Sequence[Segment], delta: float) -> tuple[float, float, str | None]:
    from opacus.accountants.analysis import rdp as rdp_analysis

    if any(s.skellam for s in segments):
        # Zhu and Wang's subsampling bound holds at integer orders: compose every segment there
        orders = [float(a) for a in INTEGER_ORDERS]
        rdp = np.zeros(len(orders))
        for s in segments:
            if s.skellam:
                curve = skellam_curve(s.sample_rate, s.noise_multiplier, s.skellam_l2, s.skellam_l1)
            else:
                curve = _gaussian_integer_orders(s.sample_rate, s.noise_multiplier)
            rdp = rdp + s.steps * curve
    else:
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


class RDPAccountant(PrivacyAccountant):
    name = "rdp"

    def compute(self, segments: Sequence[Segment], delta: float):
        z_min = min(s.noise_multiplier for s in segments)
        if z_min < RDP_MIN_NOISE_MULTIPLIER:
            note = (
                f"noise multiplier {z_min:.3g} < {RDP_MIN_NOISE_MULTIPLIER:g}: epsilon (above "
                "1e11) is reported as unbounded"
            )
            return math.inf, note, None
        eps, order, note = _rdp_epsilon(segments, delta)
        return eps, note, order


register(RDPAccountant())
