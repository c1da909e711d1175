"""The built-in classification recipe: an MLP on generated, non-IID users (the embedded default
of ``dpfl simulate``; no download)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpfl.config import RunConfig, Table, register_table
from dpfl.data.federated import SyntheticClassification
from dpfl.models.mlp import MLP
from dpfl.recipes import Recipe
from dpfl.recipes.common import check_norm, norm_name

DEFAULT_USERS = 2000
"""Users generated when the config leaves population at 0."""


@dataclass
class ClassificationTask:
    """Softmax classification with cross-entropy; metric: accuracy."""

    features: int = 32
    classes: int = 10
    hidden: tuple[int, ...] = (64,)
    norm: str = "none"
    norm_options: Any = None
    name: str = "classification"
    metric: str = "accuracy"
    higher_is_better: bool = True

    def build_model(self) -> nn.Module:
        return MLP([self.features, *self.hidden, self.classes], self.norm, self.norm_options)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        return nn.functional.cross_entropy(model(batch["x"].to(device)), batch["y"].to(device))

    def per_example_loss(self, forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of each example; ``forward`` maps inputs to logits (vectorised
        training calls it with a functional model)."""
        return nn.functional.cross_entropy(forward(batch["x"]), batch["y"], reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        device = next(model.parameters()).device
        for batch in data.batches(4096):
            x, y = batch["x"].to(device), batch["y"].to(device)
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            total += len(y)
        model.train()
        if total == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        return {"accuracy": correct / total, "loss": loss_sum / total}


@dataclass(frozen=True)
class ClassificationOptions:
    """The keys of the ``[classification]`` table."""

    examples_per_user: int = field(default=50, metadata={"doc": "examples per generated user"})
    hidden: str = field(default="64", metadata={"doc": "MLP hidden sizes, e.g. '64,64'"})

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())

    def check(self) -> None:
        if self.examples_per_user < 1:
            raise ValueError(
                f"config key classification.examples-per-user = {self.examples_per_user!r}: "
                "expected an integer >= 1"
            )
        try:
            sizes = self.hidden_sizes
        except ValueError:
            sizes = ()
        if not sizes and self.hidden.strip() or any(h < 1 for h in sizes):
            raise ValueError(
                f"config key classification.hidden = {self.hidden!r}: expected comma-separated "
                "layer sizes >= 1 such as '64,64'"
            )


TABLE = register_table(
    Table(
        "classification",
        ClassificationOptions,
        aliases={"examples-per-user": "examples-per-user", "hidden": "hidden"},
    )
)


def task(cfg: RunConfig) -> ClassificationTask:
    o = cfg.options("classification")
    return ClassificationTask(
        hidden=o.hidden_sizes, norm=norm_name(cfg, "none"), norm_options=cfg.norm_options()
    )


def data(cfg: RunConfig) -> SyntheticClassification:
    return SyntheticClassification(
        num_users=cfg.population or DEFAULT_USERS,
        examples_per_user=cfg.options("classification").examples_per_user,
        seed=cfg.seed,
    )


def check(cfg: RunConfig) -> None:
    check_norm(cfg, "none", "last", "the MLP")


RECIPE = Recipe("classification", task, data, check, __doc__ or "")
