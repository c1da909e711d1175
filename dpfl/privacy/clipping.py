"""Clipping and layer-wise normalisation of one user's update: the sensitivity bound of DP.

Schemes (``ClipConfig.scheme``):

* ``flat``: the whole update is one vector with bound C.
* ``uniform``: per-layer bounds ``C_h = C / sqrt(H)`` for H tensors.
* ``dim``: per-layer bounds ``C_h = C * sqrt(d_h / sum_k d_k)``, d_h = numel of tensor h.

Per-layer bounds satisfy ``sqrt(sum_h C_h^2) = C``, so every scheme bounds the whole update by C.
They depend only on the model's shapes (public), never on the data.

Modes (``ClipConfig.mode``):

* ``clip``: scale by ``min(1, bound / norm)`` (flat: the whole update; per-layer: each tensor).
* ``normalize``: scale every non-zero tensor (flat: the whole update) to norm exactly its bound:
  layer-wise normalisation. A zero tensor stays zero: a layer that did not train this round
  carries no signal and must not be inflated.
* ``rescale`` (per-layer schemes only): what the DP-FL-for-ASR paper's released code does
  (ml-pfl4asr, ``clip_layer_grads``): an update whose whole norm is below C is left unchanged;
  otherwise every non-zero tensor is set to norm exactly C_h (small tensors are scaled up, a zero
  tensor stays zero). Below C a single tensor may exceed its C_h, so in this mode the server
  checks the whole-update bound C only. With ``flat`` it would equal ``clip`` and is refused.

Float rounding: multiplying a float32 tensor by ``bound / norm`` can leave its norm a few ulps
above the bound (relative error ~1e-7). ``CLIP_NORM_RTOL`` is the one tolerance the whole project
uses for that: clipped updates satisfy ``norm <= bound * (1 + CLIP_NORM_RTOL)``, the server accepts
exactly those (:func:`norm_violation`), and the Gaussian mechanism calibrates its noise to that
accepted bound (:func:`sensitivity_bound`), so the accountant's epsilon covers every update the
server can accept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dpfl.privacy.updates import (
    Shapes,
    Update,
    global_norm,
    l2_norms,
    layer_names,
    rebuild,
    tensors,
    validate_update,
)

CLIP_NORM_RTOL = 1e-6
"""Shared relative tolerance on clip bounds (float32 rounding is ~1.2e-7, so honest clipped
updates are never rejected; anything above ``bound * (1 + 1e-6)`` is)."""

CLIP_NORM_RANGE: tuple[float, float] = (1e-12, 1e12)
"""Accepted clip bounds C."""

Scheme = Literal["flat", "uniform", "dim"]
Mode = Literal["clip", "normalize", "rescale"]
SCHEMES: tuple[str, ...] = ("flat", "uniform", "dim")
MODES: tuple[str, ...] = ("clip", "normalize", "rescale")


def sensitivity_bound(clip_norm: float) -> float:
    """The largest L2 norm of one user's contribution that the server can accept."""
    return clip_norm * (1.0 + CLIP_NORM_RTOL)


def within_bound(norm: float, bound: float) -> bool:
    """True when ``norm`` is within ``bound`` up to the shared float-rounding tolerance."""
    return norm <= bound * (1.0 + CLIP_NORM_RTOL)


@dataclass(frozen=True)
class ClipConfig:
    """How one user's update is bounded. ``clip_norm`` is C, the bound on the whole update."""

    clip_norm: float
    scheme: Scheme = "flat"
    mode: Mode = "clip"

    def __post_init__(self) -> None:
        c = self.clip_norm
        lo, hi = CLIP_NORM_RANGE
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not lo <= c <= hi:
            # Outside this range float32 deltas can no longer be scaled to the bound exactly.
            raise ValueError(f"clip_norm must be a number in [{lo:g}, {hi:g}], got {c!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.mode == "rescale" and self.scheme == "flat":
            raise ValueError(
                "mode 'rescale' with scheme 'flat' is mode 'clip' (one tensor, scaled to C when "
                "above it): use mode 'clip', or a per-layer scheme ('uniform' or 'dim')"
            )

    @property
    def per_layer(self) -> bool:
        return self.scheme != "flat"

    @property
    def layer_bounds_checked(self) -> bool:
        """Whether the server checks every tensor against its own C_h (per-layer ``clip`` and
        ``normalize``), or the whole update against C only (flat, and ``rescale``)."""
        return self.per_layer and self.mode != "rescale"


def layer_bounds(numels: Sequence[int], clip_norm: float, scheme: Scheme) -> list[float]:
    """Per-layer bounds C_h for tensors of the given sizes, with sqrt(sum C_h^2) = clip_norm.

    ``flat`` has no per-layer bounds and is rejected here; use ``uniform`` or ``dim``.
    """
    if len(numels) == 0:
        raise ValueError("per-layer bounds need at least one layer")
    if any(int(d) < 0 for d in numels):
        raise ValueError(f"layer sizes must be >= 0, got {list(numels)}")
    if scheme == "uniform":
        return [clip_norm / math.sqrt(len(numels))] * len(numels)
    if scheme == "dim":
        total = sum(int(d) for d in numels)
        if total == 0:
            raise ValueError("'dim' bounds need at least one non-empty layer")
        return [clip_norm * math.sqrt(int(d) / total) for d in numels]
    raise ValueError(f"per-layer scheme must be 'uniform' or 'dim', got {scheme!r}")


def bounds_for(update_or_shapes: Update | Shapes, config: ClipConfig) -> list[float] | None:
    """Per-layer bounds for an update (or a model's shapes) under ``config``; None when flat."""
    if not config.per_layer:
        return None
    if isinstance(update_or_shapes, Mapping):
        items = list(update_or_shapes.values())
    else:
        items = list(update_or_shapes)
    numels = [t.numel() if isinstance(t, torch.Tensor) else math.prod(t) for t in items]
    return layer_bounds(numels, config.clip_norm, config.scheme)


@dataclass(frozen=True)
class ClipStats:
    """What clipping did to one update. Non-private diagnostics: never released under DP."""

    norm: float
    """L2 norm of the whole update before clipping."""
    layer_norms: tuple[float, ...]
    """L2 norm of each tensor before clipping."""
    scales: tuple[float, ...]
    """Factor each tensor was multiplied by (the same factor for every tensor when flat)."""
    clipped: bool
    """True when the update (flat) or any tensor (per-layer) exceeded its bound."""
    layers_clipped: int
    """How many tensors exceeded their own bound (per-layer); 0 or H when flat."""
    norm_after: float
    """L2 norm of the whole update after clipping."""


def _scale(norm: float, bound: float, mode: str) -> float:
    if mode == "keep":
        return 1.0
    if norm == 0.0:
        return 1.0 if mode == "clip" else 0.0
    if mode == "normalize":
        return bound / norm
    return min(1.0, bound / norm)


def _apply_scale(t: torch.Tensor, s: float, norm: float, bound: float) -> torch.Tensor:
    """``t * s`` where ``s`` is 1, 0 or ``bound / norm``."""
    t = t.detach()
    if s == 0.0 or 1e-30 <= s <= 1e30:
        return t * s
    # The factor is beyond float32's range (normalising a near-zero tensor) or would be subnormal
    # (clipping a huge float64 one): divide by the norm first, then multiply by the bound.
    return (t.to(torch.float64) / norm * bound).to(t.dtype)


def clip_update(
    update: Update, config: ClipConfig, reference: Shapes | None = None, *, inplace: bool = False
) -> tuple[Update, ClipStats]:
    """Bound one user's update under ``config``; return the clipped update and its stats.

    ``reference`` (a model's parameter shapes) makes a mismatched update an error instead of
    silently fixing different per-layer bounds. Raises ValueError for an empty update, NaN/Inf or
    a shape mismatch, and TypeError for non-tensors or dtypes other than float32/float64.
    The result has the caller's structure and dtypes; the input is not modified, unless
    ``inplace`` (an update the caller owns and no longer needs unclipped: no second copy).
    """
    validate_update(update, reference)
    names = layer_names(update)
    ts = tensors(update)
    norms = l2_norms(ts, names)
    total = global_norm(norms)
    bounds = bounds_for(update, config)
    if bounds is None:
        # One factor for the whole update: every tensor is divided by the global norm.
        bounds = [config.clip_norm] * len(ts)
        divisors = [total] * len(ts)
        clipped = total > config.clip_norm
        layers_clipped = len(ts) if clipped else 0
    else:
        divisors = norms
        layers_clipped = sum(n > b for n, b in zip(norms, bounds, strict=True))
        clipped = layers_clipped > 0
    mode = config.mode
    if mode == "rescale":  # below C: unchanged; else every tensor to its C_h
        clipped = total >= config.clip_norm
        mode = "normalize" if clipped else "keep"
        layers_clipped = layers_clipped if clipped else 0
    scales = [_scale(n, b, mode) for n, b in zip(divisors, bounds, strict=True)]
    with torch.no_grad():
        if all(s == 0.0 or 1e-30 <= s <= 1e30 for s in scales):  # the usual case: one fused op
            if inplace:
                out = [t.detach() for t in ts]
                torch._foreach_mul_(out, scales)
            else:
                out = list(torch._foreach_mul([t.detach() for t in ts], scales))
        else:
            out = [
                _apply_scale(t, s, n, b)
                for t, s, n, b in zip(ts, scales, divisors, bounds, strict=True)
            ]
    # n * s, computed as n / divisor * bound where s = bound / divisor may overflow.
    norm_after = global_norm(
        [
            n * s if s in (0.0, 1.0) else n / d * b
            for n, s, d, b in zip(norms, scales, divisors, bounds, strict=True)
        ]
    )
    stats = ClipStats(
        norm=total,
        layer_norms=tuple(norms),
        scales=tuple(scales),
        clipped=clipped,
        layers_clipped=layers_clipped,
        norm_after=norm_after,
    )
    return rebuild(update, out), stats


def norm_violation(update: Update, config: ClipConfig, reference: Shapes) -> str | None:
    """The server-side check of a clipped update: None when it is within bounds, else why not.

    ``reference`` (the model's parameter shapes) is required: a bound on the norm of an update
    that is broadcast into differently shaped parameters bounds nothing.

    Uses the same tolerance as clipping (``CLIP_NORM_RTOL``): the whole update must be within C,
    and, for per-layer schemes in ``clip`` and ``normalize`` mode, every tensor within its own
    C_h (``rescale`` leaves an update below C unchanged, so only C is checked). Malformed updates
    (empty, non-finite, wrong shapes or dtypes) are reported as violations too, never raised, so
    a server can log and drop them.
    """
    try:
        validate_update(update, reference)
        names = layer_names(update)
        norms = l2_norms(tensors(update), names)
    except (TypeError, ValueError) as err:
        return str(err)
    total = global_norm(norms)
    if not within_bound(total, config.clip_norm):
        return f"update norm {total:.6g} exceeds the clip bound {config.clip_norm:.6g}"
    bounds = bounds_for(update, config) if config.layer_bounds_checked else None
    if bounds is not None:
        for name, n, b in zip(names, norms, bounds, strict=True):
            if not within_bound(n, b):
                return f"{name} has norm {n:.6g}, above its per-layer bound {b:.6g}"
    return None


# --- many updates at once -----------------------------------------------------------------------
