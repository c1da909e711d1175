"""Per-layer diagnostics: how each tensor's share of an update's norm compares with its share of
the model's dimension.

For a client's update Δ with tensors Δ_h of d_h entries (d in all),

    r_h = (‖Δ_h‖ / ‖Δ‖) / sqrt(d_h / d).

Under ``dim`` per-layer clipping every tensor gets a bound in proportion to sqrt(d_h / d); under
global (flat) clipping a tensor with r_h << 1 is scaled with the rest and drowned by noise that is
spread over all d dimensions, so its signal-to-noise ratio is about r_h times what per-layer
``dim`` clipping gives it. A wide spread of r_h is therefore what predicts that per-layer clipping
can help; r_h near 1 everywhere predicts a tie.

Computed from every client's pre-clip tensor norms, these are per-user facts and NOT covered by
DP: a run records them only with ``diagnostics = true``, as ``diag_layer_ratio_*`` metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

SHOWN = 5
"""How many tensors the most and least extreme lists name."""


def layer_ratios(layer_norms: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """r_h for each row of ``layer_norms`` (K, H): rows whose update is zero or not finite are
    left out (they have no shares)."""
    norms = layer_norms.to(torch.float64)
    if norms.dim() == 1:
        norms = norms[None]
    d = torch.tensor([float(n) for n in numels], dtype=torch.float64)
    if norms.shape[1] != d.numel():
        raise ValueError(f"{norms.shape[1]} tensor norms for a model of {d.numel()} tensors")
    total = norms.pow(2).sum(1).sqrt()
    keep = torch.isfinite(total) & (total > 0)
    dim_share = (d / d.sum()).sqrt()
    return (norms[keep] / total[keep, None]) / dim_share.clamp_min(1e-300)


class LayerShares:
    """Collects a round's r_h over its clients; :meth:`metrics` summarises them."""

    def __init__(self, names: Sequence[str], numels: Sequence[int]) -> None:
        if len(names) != len(numels):
            raise ValueError("one name per tensor size")
        self.names = list(names)
        self.numels = [int(n) for n in numels]
        self.rows: list[torch.Tensor] = []

    def add(self, layer_norms: torch.Tensor | Sequence[float]) -> None:
        """Pre-clip tensor norms of one client (H,) or of several (K, H)."""
        norms = torch.as_tensor(layer_norms, dtype=torch.float64).cpu()
        self.rows.append(layer_ratios(norms, self.numels))

    def reset(self) -> None:
        self.rows = []

    def metrics(self) -> dict[str, Any]:
        """The 5th, 50th and 95th percentile of r_h over tensors and clients, and the ``SHOWN``
        tensors with the lowest and the highest median r_h over clients (by name)."""
        rows = [r for r in self.rows if r.numel()]
        if not rows:
            return {}
        r = torch.cat(rows)
        flat = r.flatten()
        p05, p50, p95 = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], dtype=flat.dtype))
        per_tensor = r.median(0).values.tolist()
        order = sorted(range(len(self.names)), key=lambda h: per_tensor[h])
        shown = min(SHOWN, len(order))

        def named(indices: Sequence[int]) -> dict[str, float]:
            return {self.names[h]: _rounded(per_tensor[h]) for h in indices}

        return {
            "diag_layer_ratio_p05": float(p05),
            "diag_layer_ratio_median": float(p50),
            "diag_layer_ratio_p95": float(p95),
            "diag_layer_ratio_lowest": named(order[:shown]),
            "diag_layer_ratio_highest": named(order[::-1][:shown]),
        }


def _rounded(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x
