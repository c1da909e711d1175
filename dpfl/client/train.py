"""One client's step: train locally from the global weights, return the (clipped) delta.

:func:`local_update` is a pure function of (global weights, the client's data, the config, a
seed): the model instance passed in is only a workspace whose weights are overwritten first, so
one instance serves a whole cohort (the simulator) or one message (the Flower ClientApp), and a
vectorised engine can later call the same maths for many clients at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dpfl.models.normalization import project_weights
from dpfl.models.optimizers import OptimizerOptions, make_optimizer
from dpfl.models.tasks import ClientData, Task
from dpfl.privacy.clipping import ClipConfig, ClipStats, clip_update

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTrainConfig:
    epochs: int = 1
    """Passes over the client's data (ignored when ``steps`` > 0)."""
    steps: int = 0
    """A fixed number of local steps instead of epochs (the paper: 10)."""
    batch_size: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"
    options: OptimizerOptions = OptimizerOptions()
    grad_clip: float = 0.0
    """Per-step clipping of the gradient norm (the paper: 1.0); 0 turns it off. This is an
    optimisation aid, not a privacy mechanism: privacy comes from clipping the delta."""
    batch_seconds: float = 0.0
    """Batches by seconds of audio instead of ``batch_size`` examples (speech data: those with
    ``durations``); similar lengths are batched together."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError(
                f"local training needs epochs >= 1 or steps >= 1, got epochs={self.epochs}, "
                f"steps={self.steps}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad clip must be >= 0, got {self.grad_clip}")
        if not (math.isfinite(self.batch_seconds) and self.batch_seconds >= 0):
            raise ValueError(f"batch seconds must be >= 0, got {self.batch_seconds}")


@dataclass
class LocalResult:
    delta: Weights
    """new - old for every trainable parameter, float32 (clipped when a ClipConfig was given)."""
    num_examples: int
    steps: int
    train_loss: float
    """Mean loss over the local steps: a non-private diagnostic."""
    clip_stats: ClipStats | None


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def global_weights(model: nn.Module, private=None, buffers=()) -> Weights:
    """A detached float32 CPU copy of the tensors the server federates: the trainable
    parameters (all, or those for which ``private(name)`` is false) and the named ``buffers``
    (running statistics the server aggregates) that are not private."""
    keep = set(buffers)
    return {
        n: t.detach().to("cpu", torch.float32, copy=True)
        for n, t in _tensors(model)
        if (n in keep or isinstance(t, nn.Parameter) and t.requires_grad)
        and not (private is not None and private(n))
    }


def private_weights(model: nn.Module, private, buffers=()) -> Weights:
    """A CPU copy of what stays on the client (``private(name)`` true): trainable parameters
    and the named ``buffers``. Stored per user, so it must not hold accelerator memory."""
    keep = set(buffers)
    return {
        n: t.detach().to("cpu", copy=True)
        for n, t in _tensors(model)
        if (n in keep or isinstance(t, nn.Parameter) and t.requires_grad) and private(n)
    }


def federated_split(task, model: nn.Module, norm_stats: str = "client"):
    """(private, buffers) for :func:`global_weights` and :func:`private_weights`: what stays
    on the client and which buffers travel at all.

    ``private``: a predicate over tensor names, or None when everything trainable is sent. It
    covers the task's own private parameters (``task.is_private``, e.g. OFVL-MS's scene-specific
    ones) and, with ``norm_stats = "client"``, the running statistics of normalisation layers
    (FedBN-style). With ``norm_stats = "server"`` the running statistics are sent as part of the
    update (clipped and noised with it) unless the task keeps their layer private.
    """
    from dpfl.models.normalization import running_stat_names

    if norm_stats not in ("client", "server"):
        raise ValueError(f"norm_stats must be client or server, got {norm_stats!r}")
    task_private = getattr(task, "is_private", None)
    buffers = running_stat_names(model)
    stats = frozenset(buffers) if norm_stats == "client" else frozenset()
    if task_private is None and not stats:
        return None, buffers

    def private(name: str) -> bool:
        return name in stats or (task_private is not None and task_private(name))

    return private, buffers


def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Copy ``weights`` (parameters and buffers, by name) into ``model``."""
    tensors = dict(_tensors(model))
    missing = [n for n in weights if n not in tensors]
    if missing:
        raise ValueError(f"weights for unknown parameters: {missing[:5]}")
    with torch.no_grad():
        for n, w in weights.items():
            tensors[n].copy_(w)


def _epoch(data: ClientData, cfg: LocalTrainConfig, generator: torch.Generator):
    """One pass over the data as index batches, in a random order."""
    perm = torch.randperm(len(data), generator=generator)
    if cfg.batch_seconds > 0:
        durations = getattr(data, "durations", None)
        if durations is None:
            raise ValueError("batch-seconds needs data with durations (speech)")
        # Length bucketing: sort the shuffled order by duration (stable, so equal lengths stay
        # shuffled), pack up to batch_seconds, then shuffle the order of the batches.
        order = sorted(perm.tolist(), key=lambda i: durations[i])
        packed: list[list[int]] = []
        current: list[int] = []
        total = 0.0
        for i in order:
            if current and total + durations[i] > cfg.batch_seconds:
                packed.append(current)
                current, total = [], 0.0
            current.append(i)
            total += durations[i]
        if current:
            packed.append(current)
        for k in torch.randperm(len(packed), generator=generator).tolist():
            yield torch.tensor(packed[k])
    else:
        for start in range(0, len(data), cfg.batch_size):
            yield perm[start : start + cfg.batch_size]


def batches(data: ClientData, cfg: LocalTrainConfig, generator: torch.Generator):
    """``steps`` batches over reshuffled epochs, or ``epochs`` full passes."""
    if len(data) == 0:
        return
    if cfg.steps > 0:
        done = 0
        while True:
            for idx in _epoch(data, cfg, generator):
                yield idx
                done += 1
                if done == cfg.steps:
                    return
    else:
        for _ in range(cfg.epochs):
            yield from _epoch(data, cfg, generator)


def local_update(
    model: nn.Module,
    task: Task,
    weights: Weights,
    data: ClientData,
    cfg: LocalTrainConfig,
    seed: int,
    clip: ClipConfig | None = None,
) -> LocalResult:
    """Train ``model`` from ``weights`` on ``data`` and return the delta.

    With ``clip`` the delta is clipped here, on the client, so an unclipped delta never leaves it.
    The delta is computed and clipped in float32 whatever the model's precision.
    """
    load_weights(model, weights)
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.options)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    # Dropout and other randomness inside the model follow the seed, not the global RNG.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Seed only the generators in use: torch.manual_seed would also touch every CUDA device.
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        for idx in batches(data, cfg, generator):
            batch = data.batch(idx)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training diverged: loss {loss.item()}")
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            project_weights(model)  # Normalize-and-Project (no-op for other models)
            losses.append(loss.item())
    # The delta covers the parameters the server sent; others (a client's private,
    # scene-specific or FedBN-style parameters) are trained too but stay in the model.
    delta = {
        n: p.detach().to(torch.float32) - weights[n].to(device=device, dtype=torch.float32)
        for n, p in _tensors(model)
        if n in weights
    }
    stats = None
    if clip is not None:
        delta, stats = clip_update(delta, clip, reference={n: w.shape for n, w in weights.items()})
    return LocalResult(
        delta={n: d.cpu() for n, d in delta.items()},  # what leaves the client lives on the CPU
        num_examples=len(data),
        steps=len(losses),
        train_loss=float(sum(losses) / len(losses)) if losses else math.nan,
        clip_stats=stats,
    )
