"""A multi-layer perceptron, the model of the built-in classification recipe."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """A multi-layer perceptron with ReLU between layers, e.g. ``MLP([32, 64, 10])``; with
    ``norm`` (a name from :mod:`dpfl.models.normalization`) a normalisation layer follows each
    hidden linear layer, before its ReLU (layers that include the activation replace it)."""

    def __init__(self, sizes: list[int], norm: str = "none", norm_options=None) -> None:
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {sizes}")
        entry = None
        if norm != "none":
            from dpfl.models.normalization import make_norm, norm_entry

            entry = norm_entry(norm, "last", "the MLP")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                if entry is not None:
                    layers.append(make_norm(norm, b, "last", norm_options, "the MLP"))
                if entry is None or not entry.fused_activation:
                    layers.append(nn.ReLU())
        super().__init__(*layers)
        if entry is not None and entry.projection:
            from dpfl.models.normalization import record_projection_norms

            record_projection_norms(self)
