"""The built-in visual-localisation recipe (OFVL-MS): one client per scene, scene-specific
parameters kept on the client, read from 7-Scenes-layout folders or from scenes rendered
offline."""

from __future__ import annotations

from dpfl.config import RunConfig
from dpfl.recipes import Recipe
from dpfl.recipes.common import check_norm, norm_name


def scene_names(cfg: RunConfig) -> list[str]:
    """The configured scenes, rendering the synthetic ones on first use."""
    names = [s.strip() for s in cfg.scenes.split(",") if s.strip()]
    if names:
        return names
    from dpfl.recipes.localization.scenes import render_scene

    names = [f"scene-{k}" for k in range(cfg.synthetic_scenes)]
    for k, name in enumerate(names):
        render_scene(
            cfg.scenes_dir,
            name,
            seed=1000 * cfg.seed + k,
            train_frames=cfg.scene_train_frames,
            test_frames=cfg.scene_test_frames,
        )
    return names


def task(cfg: RunConfig):
    from dpfl.models.localization.task import LocalizationTask

    return LocalizationTask(
        adaptive=cfg.ofvl_adaptive,
        score_init=cfg.ofvl_score_init,
        penalty=cfg.ofvl_penalty,
        norm=norm_name(cfg, "groupnorm"),
        norm_options=cfg.norm_options(),
    )


def data(cfg: RunConfig):
    from dpfl.recipes.localization.scenes import SceneDataset

    dataset = SceneDataset(cfg.scenes_dir, scene_names(cfg))
    if cfg.population not in (0, dataset.num_users):
        raise ValueError(
            f"config key population = {cfg.population}, but there are {dataset.num_users} "
            f"scenes (one client each): set population = {dataset.num_users}"
        )
    return dataset


def check(cfg: RunConfig) -> None:
    check_norm(cfg, "groupnorm", "channels", "the localisation net")


RECIPE = Recipe("localization", task, data, check, __doc__ or "")
