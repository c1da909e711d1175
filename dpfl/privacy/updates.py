"""What a model update is, and the checks every privacy function applies to one.

An update is one user's model delta: either a sequence of tensors or a name -> tensor mapping,
one entry per parameter tensor (a "layer" in the per-layer clipping sense). Functions here keep
the caller's structure: a list in, a list out; a mapping in, a dict out in the same key order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

Update = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
# A reference layout: the shapes an update must have (a model's parameter shapes).
Shapes = Sequence[Sequence[int]] | Mapping[str, Sequence[int]]

# Clipping and the server's norm check need the rounding of float32 arithmetic to stay far below
# the shared tolerance (see clipping.CLIP_NORM_RTOL); half precisions would not, so a delta is
# computed and clipped in float32 or float64.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def layer_names(update: Update) -> list[str]:
    """The names used in messages: the mapping's keys, or ``layer[i]`` for a sequence."""
    if isinstance(update, Mapping):
        return [str(k) for k in update.keys()]
    return [f"layer[{i}]" for i in range(len(update))]


def tensors(update: Update) -> list[torch.Tensor]:
    if isinstance(update, Mapping):
        return list(update.values())
    return list(update)


def rebuild(update: Update, new: Sequence[torch.Tensor]) -> Update:
    """Put ``new`` tensors back into ``update``'s structure (list or dict)."""
    if isinstance(update, Mapping):
        return dict(zip(update.keys(), new, strict=True))
    return list(new)


def map_update(update: Update, fn: Callable[[torch.Tensor], torch.Tensor]) -> Update:
    return rebuild(update, [fn(t) for t in tensors(update)])


def validate_update(update: Update, reference: Shapes | None = None) -> None:
    """Raise a clear error for anything that is not a well-formed update.

    Checks: non-empty; every entry a float32/float64 tensor; when ``reference`` is given, the
    same names (for a mapping) or the same count (for a sequence) and the same shapes. Finiteness
    is checked where the norms are computed (see :func:`l2_norm`), so it costs no extra pass.
    """
    if isinstance(update, torch.Tensor) or not isinstance(update, (Mapping, Sequence)):
        raise TypeError(
            "an update must be a list of tensors or a name->tensor mapping, "
            f"got {type(update).__name__}"
        )
    if len(update) == 0:
        raise ValueError("the update is empty: it must hold at least one tensor")
    names = layer_names(update)
    for name, t in zip(names, tensors(update), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.is_meta:
            raise TypeError(
                f"{name} must be a dense tensor with data, got {t.layout} on {t.device}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; updates are clipped in float32 or float64 "
                "(convert the delta before clipping)"
            )
    if reference is None:
        return
    if isinstance(reference, Mapping):
        if not isinstance(update, Mapping):
            raise ValueError("the reference has named layers, but the update is a plain sequence")
        missing = [k for k in reference if k not in update]
        extra = [k for k in update if k not in reference]
        if missing or extra:
            raise ValueError(
                f"the update's layers do not match the model: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        pairs = [(str(k), update[k], reference[k]) for k in reference]
    else:
        if len(update) != len(reference):
            raise ValueError(
                f"the update has {len(update)} tensors, the model has {len(reference)}"
            )
        pairs = list(zip(names, tensors(update), reference, strict=True))
    for name, t, shape in pairs:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")


def l2_norm(t: torch.Tensor, name: str = "tensor") -> float:
    """The L2 norm of ``t`` in float64.

    Raises ValueError if ``t`` holds NaN or Inf, or if its norm itself exceeds float64's range.
    The plain sum of squares overflows for float64 values above ~1e154 and underflows below
    ~1e-154; there the norm is recomputed on the tensor divided by its largest magnitude.
    """
    t = t.detach()
    n = torch.linalg.vector_norm(t, dtype=torch.float64).item()
    if 1e-140 <= n < math.inf:
        return n
    if math.isnan(n) or (math.isinf(n) and not bool(torch.isfinite(t).all())):
        raise ValueError(f"{name} contains NaN or Inf values; a non-finite update is rejected")
    scale = t.abs().max().to(torch.float64)
    if scale.item() == 0.0:
        return 0.0
    n = scale.item() * torch.linalg.vector_norm(t.to(torch.float64) / scale).item()
    if not math.isfinite(n):
        raise ValueError(f"the norm of {name} exceeds the float64 range; the update is rejected")
    return n


def l2_norms(ts: Sequence[torch.Tensor], names: Sequence[str]) -> list[float]:
    """``[l2_norm(t, name) ...]``, equal to it, as one fused computation and one transfer when
    the tensors share a device (a tensor whose norm is zero, tiny, huge or not finite takes
    :func:`l2_norm`'s careful path, with its errors)."""
    if not ts:
        return []
    device = ts[0].device
    if any(t.device != device for t in ts):
        return [l2_norm(t, name) for t, name in zip(ts, names, strict=True)]
    fused = torch._foreach_norm([t.detach() for t in ts], 2, dtype=torch.float64)
    norms = torch.stack(fused).tolist()
    return [
        n if 1e-140 <= n < math.inf else l2_norm(t, name)
        for n, t, name in zip(norms, ts, names, strict=True)
    ]


def global_norm(layer_norms: Sequence[float]) -> float:
    """The L2 norm of a whole update from its per-layer norms.

    Raises ValueError when the result exceeds float64's range (never returns inf or NaN).
    """
    m = max(layer_norms, default=0.0)
    if m == 0.0:
        return 0.0
    n = m * math.sqrt(math.fsum((x / m) ** 2 for x in layer_norms))
    if not math.isfinite(n):
        raise ValueError("the norm of the update exceeds the float64 range; it is rejected")
    return n
