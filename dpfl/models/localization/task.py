"""Multi-scene visual localisation as a dpfl task: one scene per client (OFVL-MS, federated).

Each client's model is an :class:`OFVLNet` for its own scene: the shared convolution weights and
the scores are federated; the scene-specific weights, norms, attention and head are private
(``is_private``) and stay on the client between rounds. Evaluation runs per scene, with that
scene's private parameters, on its held-out frames: PnP + RANSAC on the predicted coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpfl.models.localization import model as ofvl
from dpfl.models.localization.pose import estimate_pose, grid_pixels, pose_errors, summarize


@dataclass
class LocalizationTask:
    widths: tuple[int, ...] = (16, 32, 64)
    adaptive: bool = True
    score_init: float = 0.6
    penalty: float = 1e-3
    norm: str = "groupnorm"
    norm_options: Any = None
    name: str = "localization"
    metric: str = "median_translation_m"
    higher_is_better: bool = False

    def build_model(self) -> nn.Module:
        return ofvl.OFVLNet(
            1, self.widths, self.score_init, self.adaptive, self.norm, self.norm_options
        )

    @staticmethod
    def is_private(name: str) -> bool:
        return ofvl.is_private(name)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        coords, uncertainty = model(batch["images"].to(device), 0)
        loss = ofvl.coordinate_loss(
            coords, uncertainty, batch["coords"].to(device), batch["valid"].to(device)
        )
        if self.adaptive and self.penalty > 0:
            loss = loss + self.penalty * ofvl.score_penalty(model)
        return loss

    @staticmethod
    def loss_count(batch: dict) -> float:
        """What :meth:`loss` averages over: the batch's valid pixels (for micro-batching)."""
        return float(batch["valid"].sum())

    def prepare_private(self, model: nn.Module, data) -> None:
        """First time a scene trains: start its head at the scene's centre."""
        centre = (data.coords * data.valid[:, None]).sum(dim=(0, 2, 3)) / data.valid.sum()
        model.set_scene_center(0, centre)

    @torch.no_grad()
    def localize(self, model: nn.Module, data) -> list[tuple[float, float]]:
        """(translation m, rotation deg) errors of PnP + RANSAC on every frame of ``data``."""
        model.eval()
        device = next(model.parameters()).device
        _, _, h, w = data.images.shape
        pixels = grid_pixels(h, w, 8).reshape(-1, 2)
        errors = []
        for i in range(len(data)):
            coords, _ = model(data.images[i : i + 1].to(device), 0)
            xyz = coords[0].reshape(3, -1).T.cpu().numpy()
            pose = estimate_pose(xyz, pixels, data.camera, seed=i)
            errors.append(pose_errors(pose, data.poses[i].double().numpy()))
        model.train()
        return errors

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        """Pose errors and coordinate error on one scene, with the model as it is loaded."""
        model.eval()
        device = next(model.parameters()).device
        coords, _ = model(data.images.to(device), 0)
        err = torch.linalg.vector_norm(coords.cpu() - data.coords, dim=1)[data.valid]
        model.train()
        return {
            **summarize(self.localize(model, data)),
            "median_coordinate_error_m": float(err.median()),
        }

    def evaluate_federated(
        self,
        model: nn.Module,
        dataset,
        shared: dict[str, torch.Tensor],
        private_of: Callable[[int], dict[str, torch.Tensor] | None],
        load: Callable[[nn.Module, dict[str, torch.Tensor]], None],
    ) -> dict[str, float]:
        """Every scene with its own private parameters on its held-out frames; medians over all
        frames, plus each scene's median translation error (``scene<k>_median_translation_m``)."""
        errors: list[tuple[float, float]] = []
        coord_errors = []
        per_scene = {}
        for user in range(dataset.num_users):
            load(model, shared)
            private = private_of(user)
            if private is None:  # never trained: the scene's fresh head
                self.prepare_private(model, dataset.user_data(user))
            else:
                load(model, private)
            test = dataset.user_test_data(user)
            scene_errors = self.localize(model, test)
            errors += scene_errors
            per_scene[f"scene{user}_median_translation_m"] = summarize(scene_errors)[
                "median_translation_m"
            ]
            with torch.no_grad():
                coords, _ = model.eval()(test.images.to(next(model.parameters()).device), 0)
                model.train()
            coord_errors.append(
                torch.linalg.vector_norm(coords.cpu() - test.coords, dim=1)[test.valid]
            )
        return {
            **summarize(errors),
            "median_coordinate_error_m": float(torch.cat(coord_errors).median()),
            "layers_specific": float(sum(c.uses_specific for c in model.adaptive_convs())),
            **per_scene,
        }


def adapt_new_scene(
    model: nn.Module,
    task: LocalizationTask,
    data,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """Learn a new scene with the shared parameters frozen: only the scene-specific weights,
    norms, attention and head train (OFVL-MS's new-scene adaptation). Returns the losses."""
    frozen = [p for n, p in model.named_parameters() if not task.is_private(n)]
    for p in frozen:
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    task.prepare_private(model, data)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(data), (batch_size,), generator=generator)
            loss = task.loss(model, data.batch(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses
