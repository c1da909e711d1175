"""Normalisation layers by name, for every model dpfl builds (``norm = "powernorm"``).

A model asks :func:`make_norm` for a layer over ``channels`` features in one of two layouts:

* ``"last"``: features in the last dimension: an MLP's ``(B, C)``, a transformer's ``(B, T, C)``;
* ``"channels"``: convolution maps ``(B, C, *spatial)``.

Layers written for the other layout are wrapped (the features are moved to where the layer wants
them). Some layers only make sense with convolutions (EvoNorm-B0 mixes batch and per-sample
statistics over spatial positions; BCN+WS standardises convolution weights): asking for them in a
model without convolutions raises an error naming the models that fit. See :data:`NORMS` and the
compatibility table in README.md.

Layers that keep running statistics (BatchNorm, PowerNorm, Unified Normalization, EvoNorm-B0,
BCN) list those buffers in ``running_stats``; the federated config (``norm-stats``) decides
whether the server aggregates them (then they are part of the clipped, noised update) or each
client keeps its own (FedBN-style). :func:`running_stat_names` finds them in a model.

From torch: LayerNorm, RMSNorm, BatchNorm, GroupNorm. Written here, since no maintained package
ships them (each cites its paper): PowerNorm, Unified Normalization, EvoNorm-B0/S0, Batch-Channel
Normalisation with Weight Standardisation, and Normalize-and-Project's weight projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dpfl.models.norm_layers import (  # noqa: F401 (the layers, re-exported by name)
    LAYOUTS,
    BatchChannelNorm,
    ChannelsFirst,
    ChannelsLast,
    EvoNormB0,
    EvoNormS0,
    NormOptions,
    PowerNorm,
    TorchBatchNorm,
    UnifiedNorm,
    _affine,
    _channels_mean,
    _groups,
    _other_dims,
    _per_channel,
    _PowerFunction,
    _scaled,
    _UNFunction,
    project_weights,
    record_projection_norms,
    standardize_weight,
)


@dataclass(frozen=True)
class NormEntry:
    name: str
    build: Callable[[int, NormOptions], nn.Module]
    native: str
    """The layout the layer is written for: ``last`` or ``channels``."""
    layouts: tuple[str, ...]
    """Layouts it fits; the other needs convolutions (see ``needs``)."""
    description: str
    running_stats: bool = False
    weight_standardization: bool = False
    """The model's convolutions must standardise their weights (BCN+WS)."""
    projection: bool = False
    """The client projects weights back to their initial norms after each step (NaP)."""
    fused_activation: bool = False
    """The layer includes its nonlinearity (EvoNorm): the model drops the ReLU after it."""


NORMS: dict[str, NormEntry] = {}


def register_norm(entry: NormEntry) -> None:
    if entry.name in NORMS:
        raise ValueError(f"normalisation {entry.name!r} is already registered")
    NORMS[entry.name] = entry


BOTH = LAYOUTS
register_norm(NormEntry(
    "layernorm", lambda c, o: nn.LayerNorm(c, eps=o.eps), "last", BOTH,
    "LayerNorm (torch): mean and variance over the features of each position",
))  # fmt: skip
register_norm(NormEntry(
    "rmsnorm", lambda c, o: nn.RMSNorm(c, eps=o.eps), "last", BOTH,
    "RMSNorm (torch): divide by the root mean square of the features, no mean subtraction",
))  # fmt: skip
register_norm(NormEntry(
    "batchnorm", TorchBatchNorm, "channels", BOTH,
    "BatchNorm (torch): per-channel batch statistics; running mean and variance in eval",
    running_stats=True,
))  # fmt: skip
register_norm(NormEntry(
    "groupnorm", lambda c, o: nn.GroupNorm(_groups(c, o.groups), c, eps=o.eps), "channels", BOTH,
    "GroupNorm (torch): mean and variance over groups of channels of each sample",
))  # fmt: skip
register_norm(NormEntry(
    "powernorm", PowerNorm, "channels", BOTH,
    "PowerNorm (Shen et al. 2020): running quadratic mean, no mean subtraction, approximate "
    "backward; warm-up `norm-warmup` steps",
    running_stats=True,
))  # fmt: skip
register_norm(NormEntry(
    "unified", UnifiedNorm, "channels", BOTH,
    "Unified Normalization (Yang et al. 2022): fusable, fluctuation smoothing, outlier filter; "
    "warm-up `norm-warmup` steps",
    running_stats=True,
))  # fmt: skip
register_norm(NormEntry(
    "evonorm-b0", EvoNormB0, "channels", ("channels",),
    "EvoNorm-B0 (Liu et al. 2020): batch and instance variance, includes the activation",
    running_stats=True, fused_activation=True,
))  # fmt: skip
register_norm(NormEntry(
    "evonorm-s0", EvoNormS0, "channels", BOTH,
    "EvoNorm-S0 (Liu et al. 2020): group std and a SiLU-like gate, includes the activation",
    fused_activation=True,
))  # fmt: skip
register_norm(NormEntry(
    "bcn-ws", BatchChannelNorm, "channels", ("channels",),
    "Batch-Channel Normalisation + Weight Standardisation (Qiao et al. 2019), micro-batch form",
    running_stats=True, weight_standardization=True,
))  # fmt: skip
register_norm(NormEntry(
    "nap", lambda c, o: nn.LayerNorm(c, eps=o.eps), "last", BOTH,
    "Normalize-and-Project (Lyle et al. 2024): LayerNorm, and weights projected back to their "
    "initial norms after each step (constant effective learning rate)",
    projection=True,
))  # fmt: skip


def norm_entry(name: str, layout: str, model: str = "this model") -> NormEntry:
    """The registry entry for ``name``, checked against a model's layout; clear errors."""
    entry = NORMS.get(name)
    if entry is None:
        raise ValueError(f"unknown normalisation {name!r}; known: {', '.join(sorted(NORMS))}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout not in entry.layouts:
        fits = sorted(n for n, e in NORMS.items() if layout in e.layouts)
        raise ValueError(
            f"normalisation {name!r} needs convolutions and does not fit {model}; "
            f"it fits the localisation net. Normalisations for {model}: {', '.join(fits)}"
        )
    return entry


def make_norm(
    name: str, channels: int, layout: str, options: NormOptions | None = None, model: str = ""
) -> nn.Module:
    """A normalisation layer over ``channels`` features in ``layout`` (see module docstring)."""
    entry = norm_entry(name, layout, model or "this model")
    if channels < 1:
        raise ValueError(f"a normalisation layer needs >= 1 channel, got {channels}")
    layer = entry.build(channels, options or NormOptions())
    if entry.native == layout:
        return layer
    return ChannelsFirst(layer) if layout == "last" else ChannelsLast(layer)


def running_stat_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_buffers()``) of the running statistics of its norm layers."""
    names = []
    for prefix, module in model.named_modules():
        for local in getattr(module, "running_stats", ()):
            names.append(f"{prefix}.{local}" if prefix else local)
    return names


MODELS = {  # model -> layout it asks for (None: keeps its own normalisation)
    "synthetic MLP": "last",
    "ASR transformer": "last",
    "ASR Conformer": None,
    "localisation net": "channels",
}


def compatibility_table() -> str:
    """The Markdown table of README.md: which normalisation fits which model."""
    head = "| `norm` | " + " | ".join(MODELS) + " | running statistics |"
    rows = [head, "|---" * (len(MODELS) + 2) + "|"]
    for name, e in sorted(NORMS.items()):
        marks = []
        for layout in MODELS.values():
            if layout is None:
                marks.append("yes (its own)" if name == "layernorm" else "no")
            else:
                marks.append("yes" if layout in e.layouts else "no (needs convolutions)")
        stats = "yes" if e.running_stats else "no"
        rows.append(f"| `{name}` | " + " | ".join(marks) + f" | {stats} |")
    return "\n".join(rows)


def describe() -> str:
    return "\n".join(f"{n}: {e.description}" for n, e in sorted(NORMS.items()))


__all__ = [
    "NORMS",
    "BatchChannelNorm",
    "EvoNormB0",
    "EvoNormS0",
    "PowerNorm",
    "UnifiedNorm",
    "NormEntry",
    "NormOptions",
    "make_norm",
    "norm_entry",
    "project_weights",
    "record_projection_norms",
    "running_stat_names",
    "standardize_weight",
]
