"""User-level differential privacy: clipping, the Gaussian mechanism, accounting, and the
clients' integer encoding with Skellam noise shares for distributed DP (:mod:`.distributed`).

Pure functions and small classes over torch tensors; nothing here imports Flower.
"""

from dpfl.privacy.accounting import (
    ACCOUNTANTS,
    AccountantRangeError,
    EpsilonResult,
    PrivacyLedger,
    Segment,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_for_segments,
    extrapolate,
)
from dpfl.privacy.clipping import (
    CLIP_NORM_RTOL,
    ClipConfig,
    ClipStats,
    clip_update,
    layer_bounds,
    norm_violation,
    sensitivity_bound,
    within_bound,
)
from dpfl.privacy.mechanisms import (
    GaussianMechanism,
    NoiseSource,
    noise_multiplier_from_sigma_dp,
    sigma_dp_from_noise_multiplier,
)

__all__ = [
    "ACCOUNTANTS",
    "AccountantRangeError",
    "CLIP_NORM_RTOL",
    "ClipConfig",
    "ClipStats",
    "EpsilonResult",
    "GaussianMechanism",
    "NoiseSource",
    "PrivacyLedger",
    "Segment",
    "calibrate_noise_multiplier",
    "clip_update",
    "compute_epsilon",
    "epsilon_for_segments",
    "extrapolate",
    "layer_bounds",
    "noise_multiplier_from_sigma_dp",
    "norm_violation",
    "sensitivity_bound",
    "sigma_dp_from_noise_multiplier",
    "within_bound",
]
