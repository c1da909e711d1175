"""What dpfl asks of a user's task and data: the protocols, each optional hook declared once.

A task is any object with ``metric``, ``build_model()``, ``loss(model, batch)`` and
``evaluate(model, data)``; no base class is needed. A federated dataset is any object with
``num_users``, ``user_data(user)`` and ``test_data()``. Everything else the round loop, the client
step or the simulator may use is an optional hook listed in :data:`TASK_HOOKS` and
:data:`DATA_HOOKS`, looked up through :func:`hook` (so a misspelt hook is an error here, not a
silently ignored method).

This module imports nothing of dpfl's: every other part may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ClientData(Protocol):
    """One user's examples (or a test set): a length and a way to gather a batch by indices."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Any:
        """The examples at ``indices`` (a 1-D long tensor), as ``Task.loss`` takes them."""
        ...


@dataclass(frozen=True)
class TensorData:
    """Examples stored as tensors with a common first dimension (e.g. ``x`` and ``y``): the
    ClientData of the data adapters. A batch is a dict of the same keys; the simulator can
    train cohorts of TensorData vectorised."""

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


@runtime_checkable
class Task(Protocol):
    """A model, its loss on a batch, and its evaluation.

    Required: ``metric`` (the name of the main evaluation metric, a key of what ``evaluate``
    returns), ``build_model()``, ``loss(model, batch)`` (a scalar tensor: the MEAN loss over the
    batch's examples, which micro-batching and vectorised cohorts rely on; a task that averages
    over something else declares ``loss_count``), and ``evaluate(model, data) -> {name: value}``.
    ``higher_is_better`` (default True) and ``name`` (default: the class name) are optional.
    """

    metric: str

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, data: Any) -> dict[str, float]: ...


TASK_HOOKS: dict[str, str] = {
    "higher_is_better": "bool attribute: whether a larger ``metric`` is better (default True).",
    "name": "str attribute: the task's name in logs and reports (default: its class name).",
    "per_example_loss": (
        "``per_example_loss(forward, batch) -> (B,) tensor``: each example's loss, where "
        "``forward`` maps the model's inputs to its outputs. Lets the simulator train a cohort "
        "vectorised. Without it, the simulator derives one from ``loss`` with torch.func (one "
        "example at a time under vmap), checks it against ``loss`` on the first batch, and "
        "falls back to one client at a time, with the reason logged, when that fails."
    ),
    "loss_count": (
        "``loss_count(batch) -> float``: what ``loss`` averages over in ``batch`` when that is "
        "not the number of examples (e.g. valid pixels), so micro-batches weigh correctly."
    ),
    "is_private": (
        "``is_private(name) -> bool``: parameters that stay on the client and are never sent "
        "(e.g. OFVL-MS's scene-specific ones); each client keeps its own between rounds."
    ),
    "prepare_private": (
        "``prepare_private(model, data)``: initialise a client's private parameters from its "
        "own data the first time it trains (only with ``is_private``)."
    ),
    "eval_bounds": (
        "``eval_bounds``: dict attribute ``{metric: (lo, hi)}``, the public range of each metric "
        "federated evaluation releases under DP (default: accuracy in [0, 1])."
    ),
    "evaluate_federated": (
        "``evaluate_federated(model, dataset, weights, private_of, load) -> metrics``: "
        "evaluation that needs each client's private parameters (simulation only; the run "
        "labels its metrics non-private)."
    ),
}
"""Optional task hooks, each with what it does: the only ones the loop, the client step and the
simulator look for."""

DATA_HOOKS: dict[str, str] = {
    "user_size": "``user_size(user) -> int``: a user's number of examples without loading them.",
    "users_data": "``users_data(users) -> list``: several users' data in one batched fetch.",
    "user_test_data": (
        "``user_test_data(user) -> ClientData``: the user's own held-out examples (federated "
        "evaluation)."
    ),
    "test_from_users": (
        "bool attribute: the test set holds examples of the federated users themselves, so "
        "evaluation on it is a non-private diagnostic."
    ),
}
"""Optional federated-dataset hooks."""


@runtime_checkable
class FederatedDataset(Protocol):
    """Users by id, each user's data on demand: users are ``0 .. num_users - 1``."""

    num_users: int

    def user_data(self, user: int) -> ClientData: ...

    def test_data(self) -> Any:
        """The central test set (None when there is none)."""
        ...


def hook(obj: Any, name: str, default: Any = None) -> Any:
    """The optional hook ``name`` of a task or dataset, or ``default`` when it has none."""
    if name not in TASK_HOOKS and name not in DATA_HOOKS:
        raise KeyError(f"{name!r} is not a declared hook of dpfl.api")
    return getattr(obj, name, default)


def task_name(task: Any) -> str:
    return str(hook(task, "name") or type(task).__name__)


def check_task(task: Any) -> None:
    """TypeError naming what a task lacks (checked before anything is built)."""
    needed = ("build_model", "loss", "evaluate")
    missing = [m for m in needed if not callable(getattr(task, m, None))]
    if not isinstance(getattr(task, "metric", None), str):
        missing.append("metric (a str attribute)")
    if missing:
        raise TypeError(
            f"task {task_name(task)!r} lacks {', '.join(missing)}: a task needs metric, "
            "build_model(), loss(model, batch) and evaluate(model, data) (see dpfl.api.Task)"
        )


def check_dataset(data: Any) -> None:
    """TypeError/ValueError naming what a federated dataset lacks."""
    missing = [m for m in ("user_data", "test_data") if not callable(getattr(data, m, None))]
    users = getattr(data, "num_users", None)
    if isinstance(users, bool) or not isinstance(users, int):
        missing.append("num_users (an int)")
    if missing:
        raise TypeError(
            f"data {type(data).__name__} lacks {', '.join(missing)}: a federated dataset "
            "needs num_users, user_data(user) and test_data() (see dpfl.api.FederatedDataset; "
            "dpfl.data.from_arrays and friends build one)"
        )
    if users < 1:
        raise ValueError(f"a federated dataset needs at least one user, got num_users = {users}")


def object_label(obj: Any) -> str:
    """``module:QualName`` of an object's class (or of a class): how a run records a task or
    dataset that was passed as an object rather than named."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__.replace('<locals>.', '')}"
