"""Learning tasks by name: a model, its loss on a batch, and its evaluation metric.

A task is what the client step and the server's evaluation need to know about a model, and no
more: ``build_model()``, ``loss(model, batch)`` and ``evaluate(model, data)``. The ASR task of
issue [3/8] and the localisation task of [4/8] register here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class ClientData(Protocol):
    """One user's examples: a length and a way to gather a batch by indices."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class TensorData:
    """Examples stored as tensors with a common first dimension (e.g. ``x`` and ``y``)."""

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"tensors of one dataset must have the same length, got {sizes}")
        # frozen: the length is fixed at creation (len() is called often by batch planning)
        object.__setattr__(self, "_length", next(iter(sizes.values()), 0))

    def __len__(self) -> int:
        return self._length

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.tensors.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """In order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


class Task(Protocol):
    name: str
    metric: str
    """Name of the main evaluation metric (e.g. ``accuracy``)."""
    higher_is_better: bool

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, data: ClientData) -> dict[str, float]: ...


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
    def evaluate(self, model: nn.Module, data: TensorData) -> dict[str, float]:
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


def _asr_task(**kwargs) -> Task:
    from dpfl.models.asr.task import ASRTask

    return ASRTask(**kwargs)


def _localization_task(**kwargs) -> Task:
    from dpfl.models.localization.task import LocalizationTask

    return LocalizationTask(**kwargs)


TASKS: dict[str, Callable[..., Task]] = {
    "classification": ClassificationTask,
    "asr": _asr_task,
    "localization": _localization_task,
}
