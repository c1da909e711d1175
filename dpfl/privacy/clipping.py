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
    l2_norm,
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
Mode = Literal["clip", "normalize"]
SCHEMES: tuple[str, ...] = ("flat", "uniform", "dim")
MODES: tuple[str, ...] = ("clip", "normalize")


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

    @property
    def per_layer(self) -> bool:
        return self.scheme != "flat"


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


def _scale(norm: float, bound: float, mode: Mode) -> float:
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
    update: Update, config: ClipConfig, reference: Shapes | None = None
) -> tuple[Update, ClipStats]:
    """Bound one user's update under ``config``; return the clipped update and its stats.

    ``reference`` (a model's parameter shapes) makes a mismatched update an error instead of
    silently fixing different per-layer bounds. Raises ValueError for an empty update, NaN/Inf or
    a shape mismatch, and TypeError for non-tensors or dtypes other than float32/float64.
    The result has the caller's structure and dtypes; the input is not modified.
    """
    validate_update(update, reference)
    names = layer_names(update)
    ts = tensors(update)
    norms = [l2_norm(t, name) for name, t in zip(names, ts, strict=True)]
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
    scales = [_scale(n, b, config.mode) for n, b in zip(divisors, bounds, strict=True)]
    with torch.no_grad():
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
    and, for per-layer schemes, every tensor within its own C_h. Malformed updates (empty,
    non-finite, wrong shapes or dtypes) are reported as violations too, never raised, so a server
    can log and drop them.
    """
    try:
        validate_update(update, reference)
        names = layer_names(update)
        norms = [l2_norm(t, name) for name, t in zip(names, tensors(update), strict=True)]
    except (TypeError, ValueError) as err:
        return str(err)
    total = global_norm(norms)
    if not within_bound(total, config.clip_norm):
        return f"update norm {total:.6g} exceeds the clip bound {config.clip_norm:.6g}"
    bounds = bounds_for(update, config)
    if bounds is not None:
        for name, n, b in zip(names, norms, bounds, strict=True):
            if not within_bound(n, b):
                return f"{name} has norm {n:.6g}, above its per-layer bound {b:.6g}"
    return None


# --- many updates at once -----------------------------------------------------------------------
# A vectorised cohort holds its clients' updates stacked: name -> tensor of shape (K, *shape), row k
# being client k's update. The functions below are clip_update and norm_violation applied to every
# row at once (same bounds, same tolerance, same float32 scaling), for engines that never split the
# stack into K separate updates.


@dataclass(frozen=True)
class StackedClipStats:
    """What clipping did to each row of a stack (the per-row fields of :class:`ClipStats`)."""

    norms: torch.Tensor
    """(K,) float64: the L2 norm of each whole update before clipping (inf/nan if non-finite)."""
    layer_norms: torch.Tensor
    """(K, H) float64: each tensor's norm before clipping."""
    clipped: torch.Tensor
    """(K,) bool: the update (flat) or any of its tensors (per-layer) exceeded its bound."""
    finite: torch.Tensor
    """(K,) bool: the row holds only finite values (a non-finite row is not clipped: drop it)."""
    scales: torch.Tensor
    """(K, H) float64: the factor each tensor was multiplied by."""
    layers_clipped: torch.Tensor
    """(K,) long: tensors above their own bound (per-layer); 0 or H when flat."""
    norm_after: torch.Tensor
    """(K,) float64: each whole update's norm after clipping."""


def check_stacked(
    stacked: Mapping[str, torch.Tensor], reference: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The stack in the reference's layer order; raise for a stack that is not K well-formed
    updates of the reference's shapes."""
    if not isinstance(stacked, Mapping) or not stacked:
        raise TypeError("a stack of updates must be a non-empty name->tensor mapping")
    if set(stacked) != set(reference):
        missing = [k for k in reference if k not in stacked]
        extra = [k for k in stacked if k not in reference]
        raise ValueError(
            f"the stack's layers do not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    rows = {t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None
            for t in stacked.values()}  # fmt: skip
    if len(rows) != 1 or None in rows:
        raise ValueError("every tensor of a stack needs the same leading (client) dimension")
    for name, t in stacked.items():
        if t.dtype not in SUPPORTED_STACK_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; stacks are clipped in float32/float64")
        if tuple(t.shape[1:]) != tuple(reference[name]):
            raise ValueError(
                f"{name} has shape {tuple(t.shape[1:])} per row, the model expects "
                f"{tuple(reference[name])}"
            )
    return {name: stacked[name] for name in reference}


SUPPORTED_STACK_DTYPES = (torch.float32, torch.float64)


def stacked_norms(stacked: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """((K,) whole-update norms, (K, H) per-tensor norms), in float64; NaN/Inf where a row is
    not finite. Float32 values cannot overflow a float64 sum of squares, so no rescaling is
    needed (unlike :func:`dpfl.privacy.updates.l2_norm`, which also takes float64 input)."""
    layer = torch.stack(
        [
            torch.linalg.vector_norm(t.detach().reshape(t.shape[0], -1), dim=1, dtype=torch.float64)
            for t in stacked.values()
        ],
        dim=1,
    )
    if all(t.dtype == torch.float32 for t in stacked.values()):
        # a float64 sum of float32 squares cannot overflow: the norm is finite iff the values are
        finite = torch.isfinite(layer).all(1)
    else:
        finite = torch.stack(
            [torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(1) for t in stacked.values()],
            1,
        ).all(1)
    total = torch.where(finite, layer.pow(2).sum(1).sqrt(), torch.full_like(layer[:, 0], math.nan))
    return total, layer


def clip_stacked(
    stacked: Mapping[str, torch.Tensor],
    config: ClipConfig,
    reference: Mapping[str, Sequence[int]],
) -> tuple[dict[str, torch.Tensor], StackedClipStats]:
    """:func:`clip_update` for every row of a stack of updates (name -> (K, *shape)).

    Each row is bounded exactly as :func:`clip_update` bounds one update (same bounds and modes,
    the factor applied in the tensor's own precision). Rows that are not finite cannot be clipped:
    they come back as zeros with ``finite`` false, and callers must drop them (as the sequential
    path drops a client whose training diverged). The input is not modified.
    """
    stacked = check_stacked(stacked, reference)
    if any(t.dtype == torch.float64 for t in stacked.values()):
        # a float64 stack can overflow float64 arithmetic; the one-update path handles that
        raise TypeError("clip_stacked takes float32 stacks; clip float64 updates one by one")
    total, layer = stacked_norms(stacked)
    finite = torch.isfinite(total)
    per_layer = bounds_for(reference, config)
    k, h = layer.shape
    if per_layer is None:
        bounds = torch.full((k, h), config.clip_norm, dtype=torch.float64, device=layer.device)
        divisors = total[:, None].expand(k, h)
        clipped = total > config.clip_norm
        layers_clipped = clipped.long() * h
    else:
        bounds = torch.tensor(per_layer, dtype=torch.float64, device=layer.device).expand(k, h)
        divisors = layer
        layers_clipped = (layer > bounds).sum(1)
        clipped = layers_clipped > 0
    ratio = bounds / divisors.clamp_min(torch.finfo(torch.float64).tiny)
    if config.mode == "normalize":
        scales = torch.where(divisors == 0, torch.zeros_like(ratio), ratio)
    else:
        scales = torch.where(divisors == 0, torch.ones_like(ratio), ratio.clamp(max=1.0))
    scales = torch.where(finite[:, None], scales, torch.zeros_like(scales))
    plain = (scales == 0) | ((scales >= 1e-30) & (scales <= 1e30))
    all_finite = bool(finite.all())
    out = {}
    with torch.no_grad():
        for j, (name, t) in enumerate(stacked.items()):
            shape = (k, *([1] * (t.dim() - 1)))
            s = scales[:, j]
            scaled = t.detach() * s.to(t.dtype).view(shape)
            if not bool(plain[:, j].all()):
                # factors beyond float32's range: divide by the norm first (as _apply_scale)
                exact = t.detach().double() / divisors[:, j].view(shape) * bounds[:, j].view(shape)
                scaled = torch.where(plain[:, j].view(shape), scaled, exact.to(t.dtype))
            out[name] = (
                scaled
                if all_finite
                else torch.where(finite.view(shape), scaled, torch.zeros_like(scaled))
            )
    # n * s, computed as n / divisor * bound where s = bound / divisor may overflow
    after = torch.where(plain, layer * scales, layer / divisors.clamp_min(1e-300) * bounds)
    stats = StackedClipStats(
        norms=total,
        layer_norms=layer,
        clipped=clipped,
        finite=finite,
        scales=scales,
        layers_clipped=layers_clipped,
        norm_after=after.pow(2).sum(1).sqrt(),
    )
    return out, stats


def non_finite_reason(names: Sequence[str], layer_norms: torch.Tensor) -> str:
    """The rejection reason of a non-finite row, in :func:`~dpfl.privacy.updates.l2_norm`'s
    words, naming its first non-finite tensor (float32 values cannot overflow a float64 norm, so
    a non-finite tensor norm means non-finite values)."""
    j = int((~torch.isfinite(layer_norms)).nonzero()[0])
    return f"{names[j]} contains NaN or Inf values; a non-finite update is rejected"


def stacked_violations(
    stacked: Mapping[str, torch.Tensor], config: ClipConfig, reference: Mapping[str, Sequence[int]]
) -> list[str | None]:
    """:func:`norm_violation` for every row of a stack: None where a row is within its bounds,
    else the reason (same tolerance, same wording). A malformed stack raises."""
    stacked = check_stacked(stacked, reference)
    total, layer = stacked_norms(stacked)
    per_layer = bounds_for(reference, config)
    names = list(stacked)
    reasons: list[str | None] = []
    limit = config.clip_norm * (1.0 + CLIP_NORM_RTOL)
    over_total = (~torch.isfinite(total)) | (total > limit)
    if per_layer is not None:
        b = torch.tensor(per_layer, dtype=torch.float64, device=layer.device)
        over_layer = layer > b * (1.0 + CLIP_NORM_RTOL)
        any_layer = over_layer.any(1)
    else:
        any_layer = torch.zeros_like(over_total)
    bad = (over_total | any_layer).tolist()
    for k, is_bad in enumerate(bad):
        if not is_bad:
            reasons.append(None)
            continue
        n = float(total[k])
        if not math.isfinite(n):
            reasons.append(non_finite_reason(names, layer[k]))
        elif n > limit:
            reasons.append(f"update norm {n:.6g} exceeds the clip bound {config.clip_norm:.6g}")
        else:
            j = int(over_layer[k].nonzero()[0])
            reasons.append(
                f"{names[j]} has norm {float(layer[k, j]):.6g}, above its per-layer bound "
                f"{per_layer[j]:.6g}"
            )
    return reasons
