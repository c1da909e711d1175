"""OFVL-MS: one network for visual localisation across several indoor scenes, with layer-adaptive
sharing ("Once for Visual Localization across Multiple Indoor Scenes", ICCV 2023).

Every convolution of the backbone is an :class:`AdaptiveConv2d`: it holds a task-shared weight, a
task-specific weight per scene and one learnable score. The forward pass binarises the score
(threshold 0.5): above it the scene's own weight is used, at or below it the shared one. The
gradient reaches the score through a straight-through estimator (the binarised value in the
forward pass, the identity in the backward pass). An L1 penalty on the scores pushes layers
toward sharing.

Scene-specific, always: the normalisation layers (GroupNorm: no running statistics), the channel
attention after each block (squeeze-and-excitation) and the regression head, which predicts
per-pixel 3-D scene coordinates and an uncertainty at output stride 8.

Federated (one scene per client), the shared weights and scores are aggregated by the server and
everything scene-specific stays on the client: :func:`is_private` says which is which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dpfl.models.normalization import (
    NormOptions,
    make_norm,
    norm_entry,
    record_projection_norms,
    standardize_weight,
)

SCORE_THRESHOLD = 0.5


class AdaptiveConv2d(nn.Module):
    """A convolution that uses a shared or a task-specific weight, chosen by a learnable score."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        num_tasks: int = 1,
        score_init: float = 0.6,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.standardize = standardize  # Weight Standardisation (for BCN+WS)
        shared = torch.empty(cout, cin, kernel, kernel)
        nn.init.kaiming_normal_(shared, nonlinearity="relu")
        self.shared = nn.Parameter(shared)
        # every scene starts from the shared initialisation, so a switch is smooth
        self.specific = nn.Parameter(
            shared.detach().clone().expand(num_tasks, -1, -1, -1, -1).contiguous()
        )
        self.score = nn.Parameter(torch.tensor(float(score_init)))

    def gate(self) -> torch.Tensor:
        """1 (scene-specific) or 0 (shared) in the forward pass; d gate / d score = 1 backward."""
        hard = (self.score > SCORE_THRESHOLD).to(self.score.dtype)
        return hard + self.score - self.score.detach()

    @property
    def uses_specific(self) -> bool:
        return bool(self.score.detach() > SCORE_THRESHOLD)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        g = self.gate()
        weight = g * self.specific[task] + (1 - g) * self.shared
        if self.standardize:
            weight = standardize_weight(weight)
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: per-channel weights from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]


class _NormFactory:
    """Builds the configured normalisation layer; carries its registry flags."""

    def __init__(self, name: str, options: NormOptions | None, entry) -> None:
        self.name, self.options = name, options
        self.weight_standardization = entry.weight_standardization
        self.fused_activation = entry.fused_activation

    def __call__(self, channels: int) -> nn.Module:
        return make_norm(self.name, channels, "channels", self.options, "the localisation net")


def _per_task(make, num_tasks: int) -> nn.ModuleList:
    return nn.ModuleList(make() for _ in range(num_tasks))


class AdaptiveBlock(nn.Module):
    """A residual block of adaptive convolutions; scene-specific norms and channel attention."""

    def __init__(
        self, cin: int, cout: int, stride: int, num_tasks: int, score_init: float, norm
    ) -> None:
        super().__init__()
        ws = norm.weight_standardization
        self.conv1 = AdaptiveConv2d(cin, cout, 3, stride, num_tasks, score_init, ws)
        self.conv2 = AdaptiveConv2d(cout, cout, 3, 1, num_tasks, score_init, ws)
        self.norm1 = _per_task(lambda: norm(cout), num_tasks)
        self.norm2 = _per_task(lambda: norm(cout), num_tasks)
        self.act = nn.Identity() if norm.fused_activation else nn.ReLU()
        self.attention = _per_task(lambda: ChannelAttention(cout), num_tasks)
        self.skip = (
            AdaptiveConv2d(cin, cout, 1, stride, num_tasks, score_init, ws)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        h = self.act(self.norm1[task](self.conv1(x, task)))
        h = self.attention[task](self.norm2[task](self.conv2(h, task)))
        return F.relu(h + (self.skip(x, task) if self.skip is not None else x))


class OFVLNet(nn.Module):
    """Backbone (output stride 8) of adaptive convolutions and per-scene regression heads.

    ``forward(images, task) -> (coords (B, 3, H/8, W/8), uncertainty (B, 1, H/8, W/8))``.
    ``adaptive=False`` fixes every score at 0 (always shared): the "one shared model" baseline.
    """

    def __init__(
        self,
        num_tasks: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        score_init: float = 0.6,
        adaptive: bool = True,
        norm: str = "groupnorm",
        norm_options: NormOptions | None = None,
    ) -> None:
        """``norm``: the scene-specific normalisation layers by name
        (:mod:`dpfl.models.normalization`); running statistics they keep are scene-specific
        too, so they never leave the client."""
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stages (output stride 8), got {widths}")
        self.num_tasks = num_tasks
        w1, w2, w3 = widths
        entry = norm_entry(norm, "channels", "the localisation net")
        factory = _NormFactory(norm, norm_options, entry)
        self.stem = AdaptiveConv2d(3, w1, 3, 2, num_tasks, score_init, entry.weight_standardization)
        self.stem_norm = _per_task(lambda: factory(w1), num_tasks)
        self.stem_act = nn.Identity() if entry.fused_activation else nn.ReLU()
        self.blocks = nn.ModuleList(
            [
                AdaptiveBlock(w1, w1, 1, num_tasks, score_init, factory),
                AdaptiveBlock(w1, w2, 2, num_tasks, score_init, factory),
                AdaptiveBlock(w2, w3, 2, num_tasks, score_init, factory),
            ]
        )
        self.heads = _per_task(
            lambda: nn.Sequential(nn.Conv2d(w3, w3, 3, padding=1), nn.ReLU(), nn.Conv2d(w3, 4, 1)),
            num_tasks,
        )
        if not adaptive:
            for conv in self.adaptive_convs():
                conv.score.data.fill_(0.0)
                conv.score.requires_grad_(False)
                conv.specific.requires_grad_(False)
        if entry.projection:
            record_projection_norms(self)

    def adaptive_convs(self) -> list[AdaptiveConv2d]:
        return [m for m in self.modules() if isinstance(m, AdaptiveConv2d)]

    def scores(self) -> torch.Tensor:
        return torch.stack([c.score for c in self.adaptive_convs()])

    def set_scene_center(self, task: int, center: torch.Tensor) -> None:
        """Start the head's coordinate output at the scene's centre (meters, world frame)."""
        with torch.no_grad():
            self.heads[task][-1].bias[:3] = center.to(self.heads[task][-1].bias)

    def forward(self, images: torch.Tensor, task: int = 0):
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is not one of the model's {self.num_tasks} scenes")
        x = self.stem_act(self.stem_norm[task](self.stem(images, task)))
        for block in self.blocks:
            x = block(x, task)
        out = self.heads[task](x)
        coords = out[:, :3]
        uncertainty = F.softplus(out[:, 3:]) + 1e-3  # s > 0
        return coords, uncertainty


def is_private(name: str) -> bool:
    """Parameters that never leave a client in the federated form: everything scene-specific."""
    return not (name.endswith(".shared") or name.endswith(".score"))


def coordinate_loss(coords, uncertainty, target, valid) -> torch.Tensor:
    """Uncertainty-weighted regression: mean over valid pixels of 3 log s + |e| / (2 s^2)."""
    err = torch.linalg.vector_norm(coords - target, dim=1)  # (B, h, w)
    s = uncertainty[:, 0]
    per_pixel = 3 * torch.log(s) + err / (2 * s**2)
    mask = valid.to(per_pixel.dtype)
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1)


def score_penalty(model: OFVLNet) -> torch.Tensor:
    """L1 on the scores: lower scores mean sharing, so the penalty pushes layers toward sharing."""
    return model.scores().abs().sum()


def normalized_gradient_sum(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine the scenes' gradients on a shared parameter at a common magnitude.

    Rule (dpfl's choice; OFVL-MS normalises gradients so scenes converge at the same pace): each
    scene's gradient (flattened over all shared parameters) is rescaled to the mean of the
    scenes' norms, then they are summed: g = sum_t g_t * mean_k ||g_k|| / ||g_t||. A scene with a
    zero gradient contributes zero. Under DP the common magnitude must not depend on other
    clients: each client instead normalises its shared delta to the clip bound (layer-wise
    normalisation, ``clip-mode = "normalize"``).
    """
    norms = [g.norm() for g in grads]
    target = torch.stack(norms).mean()
    total = torch.zeros_like(grads[0])
    for g, n in zip(grads, norms, strict=True):
        if n > 0:
            total = total + g * (target / n)
    return total


def parameter_counts(model: OFVLNet) -> dict[str, int]:
    """Parameters of one OFVL-MS model for its scenes vs one separate model per scene.

    ``stored``: everything the multi-scene model holds. ``effective``: what inference needs once
    each layer's choice is fixed (the shared weight, or the scenes' own weights, not both).
    ``separate``: N independent models of the same architecture (one weight per convolution).
    """
    n = model.num_tasks
    convs = model.adaptive_convs()
    conv_ids = {id(p) for c in convs for p in (c.shared, c.specific, c.score)}
    scene_parts = sum(p.numel() for p in model.parameters() if id(p) not in conv_ids)
    one_conv = sum(c.shared.numel() for c in convs)
    effective_convs = sum(c.shared.numel() * (n if c.uses_specific else 1) for c in convs)
    return {
        "stored": sum(p.numel() for p in model.parameters()),
        "effective": effective_convs + scene_parts,
        "separate": n * one_conv + scene_parts,
        "layers_specific": sum(c.uses_specific for c in convs),
        "layers": len(convs),
    }
