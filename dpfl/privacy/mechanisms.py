"""The Gaussian mechanism on the sum of clipped updates, and the noise source behind it.

Conventions (user-level DP, one clipped update per sampled user and round):

* The server sums the clipped updates and adds ``N(0, (z * C)^2)`` independently to every
  coordinate of the SUM, where z is the noise multiplier and C the clip bound. (Precisely, the
  std is ``z * sensitivity_bound(C)`` = ``z * C * (1 + CLIP_NORM_RTOL)``: the server accepts updates
  up to that norm, so the noise is calibrated to it. The difference is one part in 10^6.)
* The noisy sum is divided by the *expected* cohort size ``q * K`` (never by the number of replies,
  which would make the output depend on who answered), so the noise on the average has std
  ``z * C / (q * K)``.
* The paper's convention states the noise on the average relative to C: ``sigma_DP``, so that
  ``z = sigma_DP * S`` for expected cohort size S (:func:`noise_multiplier_from_sigma_dp`).

Noise comes from a ``torch.Generator`` seeded from the operating system's cryptographic source
(``secrets``) unless a seed is given; a seeded source is reproducible and reported as insecure.
Known limitation, shared with Opacus and Flower: samples are IEEE floats from a seeded PRNG, not a
discrete or constant-time sampler, so floating-point side channels (Mironov, CCS 2012) are not
addressed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from dpfl.privacy.clipping import sensitivity_bound
from dpfl.privacy.updates import Update, map_update, tensors


def _check_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if _check_nonneg(name, value) == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def noise_multiplier_from_sigma_dp(sigma_dp: float, cohort_size: float) -> float:
    """Paper convention: noise std on the average is sigma_DP * C, so z = sigma_DP * S."""
    return _check_nonneg("sigma_dp", sigma_dp) * _check_positive("cohort_size", cohort_size)


def sigma_dp_from_noise_multiplier(noise_multiplier: float, cohort_size: float) -> float:
    """Inverse of :func:`noise_multiplier_from_sigma_dp`: sigma_DP = z / S."""
    return _check_nonneg("noise_multiplier", noise_multiplier) / _check_positive(
        "cohort_size", cohort_size
    )


class NoiseSource:
    """Gaussian noise for the mechanism.

    ``seed=None`` (the default) seeds a torch generator from ``secrets.randbits``, the operating
    system's cryptographic source; the seed is never stored where it could be logged or
    checkpointed. A fixed ``seed`` makes runs reproducible, for experiments only: ``secure`` is then
    False and :attr:`label` says so, and every report built from this source must carry it.
    """

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu") -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.secure = seed is None
        self.seed = seed
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(secrets.randbits(63) if seed is None else seed)

    @property
    def label(self) -> str:
        if self.secure:
            return "secure (seeded from the OS cryptographic source)"
        return f"INSECURE: fixed seed {self.seed}, reproducible noise (for experiments only)"

    def get_state(self) -> torch.Tensor:
        """The generator state, for checkpoints of reproducible runs only."""
        if self.secure:
            raise RuntimeError("a secure noise source never exports its state")
        return self._generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        if self.secure:
            raise RuntimeError("a secure noise source cannot be set to a saved state")
        self._generator.set_state(state)

    def gaussian_like(self, t: torch.Tensor, std: float) -> torch.Tensor:
        """Independent N(0, std^2) noise with ``t``'s shape and dtype, on ``t``'s device."""
        noise = torch.randn(t.shape, generator=self._generator, dtype=t.dtype, device=self.device)
        return (noise * std).to(t.device)


@dataclass
class GaussianMechanism:
    """Adds N(0, (z*C)^2) to every coordinate of a sum of clipped updates.

    ``noise_multiplier`` z and ``clip_norm`` C; ``noise`` defaults to a secure source.
    """

    noise_multiplier: float
    clip_norm: float
    noise: NoiseSource = field(default_factory=NoiseSource)

    def __post_init__(self) -> None:
        self.noise_multiplier = _check_nonneg("noise_multiplier", self.noise_multiplier)
        self.clip_norm = _check_positive("clip_norm", self.clip_norm)

    @property
    def std(self) -> float:
        """Noise std on each coordinate of the sum: z times the accepted sensitivity bound."""
        return self.noise_multiplier * sensitivity_bound(self.clip_norm)

    def add_noise(self, summed: Update) -> Update:
        """The noisy sum. Returns new tensors; ``summed`` is not modified."""
        if len(tensors(summed)) == 0:
            raise ValueError("cannot add noise to an empty update")
        std = self.std
        return map_update(summed, lambda t: t + self.noise.gaussian_like(t, std))

    def noisy_mean(self, summed: Update, expected_cohort_size: float) -> Update:
        """``(sum + noise) / expected_cohort_size``: the private average of one round.

        ``expected_cohort_size`` is q * K, fixed by the sampling schedule; passing the number of
        clients that replied instead would leak who took part.
        """
        n = _check_positive("expected_cohort_size", expected_cohort_size)
        return map_update(self.add_noise(summed), lambda t: t / n)
