"""The built-in visual-localisation recipe (OFVL-MS): one client per scene, scene-specific
parameters kept on the client, read from 7-Scenes-layout folders or from scenes rendered
offline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpfl.config import RunConfig, Table, register_table
from dpfl.recipes import Recipe, with_population
from dpfl.recipes.common import check_norm, norm_name


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass(frozen=True)
class LocalizationOptions:
    """The keys of the ``[localization]`` table."""

    scenes_dir: str = field(
        default="data/synthetic-scenes", metadata=_doc("7-Scenes-layout folder")
    )
    scenes: str = field(default="", metadata=_doc("scene names, comma-separated ('': synthetic)"))
    synthetic_scenes: int = field(default=3, metadata=_doc("synthetic scenes to render"))
    scene_train_frames: int = field(default=60, metadata=_doc("synthetic: frames per scene"))
    scene_test_frames: int = field(default=20, metadata=_doc("synthetic: test frames per scene"))
    adaptive: bool = field(
        default=True, metadata=_doc("layer-adaptive sharing (false: all shared)")
    )
    score_init: float = field(default=0.6, metadata=_doc("initial scores"))
    penalty: float = field(default=1e-3, metadata=_doc("weight of the L1 penalty on the scores"))

    def check(self) -> None:
        for name in ("synthetic_scenes", "scene_train_frames", "scene_test_frames"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"config key localization.{name.replace('_', '-')} = "
                    f"{getattr(self, name)!r}: expected an integer >= 1"
                )
        if self.penalty < 0:
            raise ValueError(
                f"config key localization.penalty = {self.penalty!r}: expected a number >= 0"
            )


TABLE = register_table(
    Table(
        "localization",
        LocalizationOptions,
        aliases={
            "ofvl-adaptive": "adaptive",
            "ofvl-score-init": "score-init",
            "ofvl-penalty": "penalty",
            **{
                key: key
                for key in (
                    "scenes-dir",
                    "scenes",
                    "synthetic-scenes",
                    "scene-train-frames",
                    "scene-test-frames",
                )
            },  # fmt: skip
        },
    )
)


def localization_options(cfg: RunConfig) -> LocalizationOptions:
    return cfg.options("localization")


def scene_names(cfg: RunConfig) -> list[str]:
    """The configured scenes, rendering the synthetic ones on first use."""
    o = localization_options(cfg)
    names = [s.strip() for s in o.scenes.split(",") if s.strip()]
    if names:
        return names
    from dpfl.recipes.localization.scenes import render_scene

    names = [f"scene-{k}" for k in range(o.synthetic_scenes)]
    for k, name in enumerate(names):
        render_scene(
            o.scenes_dir,
            name,
            seed=1000 * cfg.seed + k,
            train_frames=o.scene_train_frames,
            test_frames=o.scene_test_frames,
        )
    return names


def task(cfg: RunConfig):
    o = localization_options(cfg)
    from dpfl.models.localization.task import LocalizationTask

    return LocalizationTask(
        adaptive=o.adaptive,
        score_init=o.score_init,
        penalty=o.penalty,
        norm=norm_name(cfg, "groupnorm"),
        norm_options=cfg.norm_options(),
    )


def data(cfg: RunConfig, user: int | None = None):
    """The scenes as users, each read when first used. ``user``: a node's, whose scene alone
    needs to be on disk; without it every scene's split files must be there."""
    o = localization_options(cfg)
    from dpfl.recipes.localization.scenes import SceneDataset

    dataset = SceneDataset(o.scenes_dir, scene_names(cfg))
    for scene in dataset.scenes if user is None else [dataset.scenes[user]]:
        for split in ("TrainSplit.txt", "TestSplit.txt"):
            if not (Path(o.scenes_dir) / scene / split).is_file():
                raise FileNotFoundError(
                    f"split file {Path(o.scenes_dir) / scene / split} does not exist "
                    "(localization.scenes-dir holds one folder per scene, 7-Scenes layout)"
                )
    with_population(cfg, dataset.num_users, f"{o.scenes_dir} (a user per scene)")
    return dataset


def check(cfg: RunConfig) -> None:
    check_norm(cfg, "groupnorm", "channels", "the localisation net")


RECIPE = Recipe("localization", task, data, check, __doc__ or "")
