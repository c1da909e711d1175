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
* With ``min-replies`` a round is applied only when enough clients replied; that decision is made
  on a noisy count of the accepted updates (std ``z_c`` users, sensitivity 1), released with the
  sum from the same Poisson sample, so an attempt is ONE subsampled Gaussian mechanism on the
  pair (sum / C, count) with ``z_eff = (z^-2 + z_c^-2)^(-1/2)``
  (:func:`effective_noise_multiplier`).

Noise is drawn from a cipher-based generator (:mod:`dpfl.privacy.randomness`: AES-CTR or ChaCha20
keyed from ``secrets``) unless a seed is given; a seeded source is reproducible and reported as
INSECURE. Known limitation, shared with Opacus' default mode and Flower: the Gaussian samples are
IEEE floats from NumPy's ziggurat, not a discrete or constant-time sampler, so the floating-point
attack of Mironov (CCS 2012), which reads the input from the least significant bits of a noisy
float, is not addressed. (Opacus' ``secure_mode`` sums several draws to blur those bits; at the
paper's 255.8M coordinates that would multiply the noise cost by 4, so dpfl documents the
limitation instead.)
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from dpfl.privacy.clipping import sensitivity_bound
from dpfl.privacy.randomness import CipherStreams
from dpfl.privacy.updates import Update, map_update, rebuild, tensors


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


def effective_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_eff of the sum (std z*C, sensitivity C) released with a count (std z_c, sensitivity 1)
    from the same sample: ``(z^-2 + z_c^-2)^(-1/2)``; ``z_c = 0`` means no count is released."""
    z = _check_nonneg("noise_multiplier", noise_multiplier)
    zc = _check_nonneg("count_noise_multiplier", count_noise_multiplier)
    if zc == 0:
        return z
    if z == 0:
        return 0.0
    return 1.0 / math.sqrt(z**-2 + zc**-2)


def sum_noise_multiplier(effective: float, count_noise_multiplier: float) -> float:
    """The z of the sum that gives ``effective`` z_eff next to a count noised with z_c (the
    inverse of :func:`effective_noise_multiplier`); needs ``z_c > z_eff``."""
    ze = _check_nonneg("effective noise multiplier", effective)
    zc = _check_nonneg("count_noise_multiplier", count_noise_multiplier)
    if zc == 0 or ze == 0:
        return ze
    if zc <= ze:
        raise ValueError(
            f"count-noise-multiplier {zc:.4g} must exceed the effective noise multiplier "
            f"{ze:.4g} (the count's noise alone would spend more than the whole budget)"
        )
    return 1.0 / math.sqrt(ze**-2 - zc**-2)


class NoiseSource:
    """Gaussian noise for the mechanism, from a cipher-based generator.

    ``seed=None`` (the default) keys AES-CTR or ChaCha20 (:mod:`dpfl.privacy.randomness`) with
    ``secrets.token_bytes``; the key lives in memory only and is never logged, checkpointed or
    exported. A fixed ``seed`` makes runs reproducible, for experiments only: ``secure`` is then
    False and :attr:`label` says so, and every report built from this source must carry it.

    Draws are made in bulk on the CPU (several threads); for a CUDA ``device`` they are made in
    pinned memory and copied to the device in one non-blocking transfer.
    """

    def __init__(
        self,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        cipher: str | None = None,
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.secure = seed is None
        self.seed = seed
        self.device = torch.device(device)
        if seed is None:
            self._streams = CipherStreams.secret(cipher)
        else:
            self._streams = CipherStreams.from_seed(seed, "noise", cipher or "chacha20")
        self._scratch: torch.Tensor | None = None  # reused by scratch_normal
        self._scratch_copy = None  # a CUDA event: the scratch's last copy to the device

    @property
    def cipher(self) -> str:
        return self._streams.cipher

    @property
    def label(self) -> str:
        if self.secure:
            return f"secure ({self.cipher}, keyed from the OS cryptographic source)"
        return f"INSECURE: fixed seed {self.seed}, reproducible noise (for experiments only)"

    def get_state(self) -> dict[str, int | str]:
        """The position in the stream, for checkpoints of reproducible runs only."""
        if self.secure:
            raise RuntimeError("a secure noise source never exports its state")
        return {"cipher": self.cipher, "next_stream": self._streams.next_stream}

    def set_state(self, state: dict) -> None:
        if self.secure:
            raise RuntimeError("a secure noise source cannot be set to a saved state")
        if not isinstance(state, dict) or state.get("cipher") != self.cipher:
            raise ValueError(
                "the checkpoint's noise state is not this source's (written by another dpfl "
                "version or cipher); resume is not possible in reproducible mode"
            )
        self._streams.next_stream = int(state["next_stream"])

    def standard_normal(
        self,
        n: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """``n`` independent N(0, 1) draws as a flat tensor on ``device`` (default: the
        source's), made in one bulk draw."""
        return self._draw(n, dtype, device, scratch=False)

    def scratch_normal(
        self, n: int, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Like :meth:`standard_normal`, but drawn into a CPU buffer the source keeps and reuses
        (pinned for a CUDA device), so that a round's draw does not first fault in a fresh
        gigabyte of memory. The result is valid until the next call: use it at once."""
        return self._draw(n, dtype, device, scratch=True)

    def _draw(
        self, n: int, dtype: torch.dtype, device: str | torch.device | None, *, scratch: bool
    ) -> torch.Tensor:
        device = self.device if device is None else torch.device(device)
        draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        pinned = device.type == "cuda"
        n = int(n)
        if scratch:
            self._await_copy()  # the last copy to the device may still read the buffer
            buf = self._scratch
            if (
                buf is None
                or buf.dtype != draw_dtype
                or buf.numel() < n
                or buf.is_pinned() != pinned
            ):
                buf = self._scratch = torch.empty(n, dtype=draw_dtype, pin_memory=pinned)
            buf = buf[:n]
        else:
            buf = torch.empty(n, dtype=draw_dtype, pin_memory=pinned)
        self._streams.standard_normal(buf.numpy())
        if device.type != "cpu":
            buf = buf.to(device, non_blocking=True)
            if scratch and device.type == "cuda":
                # on the stream the copy was queued on (the target device's, maybe not current)
                self._scratch_copy = torch.cuda.Event()
                self._scratch_copy.record(torch.cuda.current_stream(device))
        return buf if draw_dtype == dtype else buf.to(dtype)

    def _await_copy(self) -> None:
        if self._scratch_copy is not None:
            self._scratch_copy.synchronize()
            self._scratch_copy = None

    def reserve(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        """Allocate and touch the scratch buffer of :meth:`scratch_normal` now (at start-up),
        so that the first round does not pay for faulting in its memory."""
        pinned = self.device.type == "cuda"
        self._scratch = torch.zeros(int(n), dtype=dtype, pin_memory=pinned)

    def release(self) -> None:
        """Drop the scratch buffer (a process that never draws, e.g. a torchrun rank > 0)."""
        self._scratch = None

    def wipe(self) -> None:
        """Zero the scratch buffer: the last draw's raw noise does not stay in memory."""
        self._await_copy()
        if self._scratch is not None:
            self._scratch.zero_()

    def nonce(self) -> int:
        """A fresh value of this source's stream (the index of a stream no draw uses): the
        distributed clients' reproducible noise is keyed by it, so it repeats exactly where this
        source's own noise would (a resumed reproducible run) and never elsewhere."""
        return self._streams.take(1)

    def skip_to_fresh_streams(self) -> None:
        """Reproducible sources: jump to streams no earlier draw of this seed can have used
        (a random offset above 2^40 streams), giving up reproducibility from here on."""
        if self.secure:
            return
        self._streams.next_stream += (1 << 40) + secrets.randbelow(1 << 62)

    def gaussian_like(self, t: torch.Tensor, std: float) -> torch.Tensor:
        """Independent N(0, std^2) noise with ``t``'s shape and dtype, on ``t``'s device."""
        return self.standard_normal(t.numel(), t.dtype, t.device).view(t.shape) * std

    def __repr__(self) -> str:
        return f"NoiseSource({self.label})"


def noisy_count(count: int, count_noise_multiplier: float, noise: NoiseSource) -> float:
    """``count + N(0, z_c^2)``: a count of users (sensitivity 1) with Gaussian noise."""
    zc = _check_nonneg("count_noise_multiplier", count_noise_multiplier)
    return float(count) + zc * float(noise.standard_normal(1, torch.float64)[0])


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

    def add_noise(self, summed: Update, scale: float = 1.0, *, inplace: bool = False) -> Update:
        """The noisy sum, times ``scale``: new tensors, or with ``inplace`` the tensors of
        ``summed`` themselves (the server's own sum, which it no longer needs).

        The noise of all tensors of one dtype and device is drawn in one bulk call (one copy to
        the device), not tensor by tensor.
        """
        parts = tensors(summed)
        if len(parts) == 0:
            raise ValueError("cannot add noise to an empty update")
        std = self.std
        if std == 0:
            return map_update(summed, lambda t: t.mul_(scale) if inplace else t * scale)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(parts):
            groups.setdefault((t.dtype, t.device), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(parts)
        for (dtype, device), members in groups.items():
            n = sum(parts[i].numel() for i in members)
            if inplace:
                flat = self.noise.scratch_normal(n, dtype, device)
            else:  # the draw's own buffer becomes the result: no second allocation
                flat = self.noise.standard_normal(n, dtype, device).mul_(std * scale)
            at = 0
            for i in members:
                t = parts[i]
                z = flat[at : at + t.numel()].view(t.shape)
                at += t.numel()
                if inplace:
                    out[i] = t.add_(z, alpha=std).mul_(scale)
                else:
                    out[i] = z.add_(t, alpha=scale)
        if inplace:
            self.noise.wipe()
        return rebuild(summed, out)

    def noisy_mean(
        self, summed: Update, expected_cohort_size: float, *, inplace: bool = False
    ) -> Update:
        """``(sum + noise) / expected_cohort_size``: the private average of one round
        (``inplace``: computed in the tensors of ``summed``).

        ``expected_cohort_size`` is q * K, fixed by the sampling schedule; passing the number of
        clients that replied instead would leak who took part.
        """
        n = _check_positive("expected_cohort_size", expected_cohort_size)
        return self.add_noise(summed, scale=1.0 / n, inplace=inplace)
