"""Clipping a vectorised cohort's updates at once: the stacked form of
:func:`dpfl.privacy.clipping.clip_update` and :func:`~dpfl.privacy.clipping.norm_violation`.

A vectorised cohort holds its clients' updates stacked: name -> tensor of shape (K, *shape), row k
being client k's update. The functions here are clip_update and norm_violation applied to every
row at once (same bounds, same tolerance, same float32 scaling), for engines that never split the
stack into K separate updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dpfl.privacy.clipping import CLIP_NORM_RTOL, ClipConfig, bounds_for


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
    if config.mode == "clip":
        scales = torch.where(divisors == 0, torch.ones_like(ratio), ratio.clamp(max=1.0))
    else:
        scales = torch.where(divisors == 0, torch.zeros_like(ratio), ratio)
    if config.mode == "rescale":  # rows below C unchanged, the others every tensor to its C_h
        clipped = total >= config.clip_norm
        scales = torch.where(clipped[:, None], scales, torch.ones_like(scales))
        layers_clipped = torch.where(clipped, layers_clipped, torch.zeros_like(layers_clipped))
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
    per_layer = bounds_for(reference, config) if config.layer_bounds_checked else None
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
