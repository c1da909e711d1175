"""One client's step: train locally from the global weights, return the (clipped) delta.

:func:`local_update` is a pure function of (global weights, the client's data, the config, a
seed): the model instance passed in is only a workspace whose weights are overwritten first, so
one instance serves a whole cohort (the simulator) or one message (the Flower ClientApp), and a
vectorised engine can later call the same maths for many clients at once.

On small devices (edge GPUs) two knobs bound the work of one step without changing its maths:
``precision`` runs forward and loss under ``torch.autocast`` (bf16, or fp16 with loss scaling on
CUDA) while weights, gradients, the delta and its clipping stay float32; ``micro_batch_size`` /
``micro_batch_seconds`` split each step's batch into micro-batches whose gradients are
accumulated with weights that make the sum equal the full batch's gradient.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from dpfl.api import ClientData, Task
from dpfl.models.normalization import project_weights
from dpfl.models.optimizers import OptimizerOptions, make_optimizer
from dpfl.privacy.clipping import ClipConfig, ClipStats, clip_update
from dpfl.profiling import section

Weights = dict[str, torch.Tensor]

PRECISIONS = ("fp32", "bf16", "fp16")


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
    precision: str = "fp32"
    """Autocast precision of forward and loss: fp32 (off), bf16, or fp16 (CUDA only, with
    dynamic loss scaling). Weights, gradients, the delta and its clipping stay float32."""
    micro_batch_size: int = 0
    """At most this many examples per forward/backward pass; a step's batch is split and its
    gradient accumulated (equal to the full batch's gradient). 0: the whole batch at once."""
    micro_batch_seconds: float = 0.0
    """At most this many seconds of audio per forward/backward pass (speech data); may be
    combined with ``micro_batch_size``. 0: no limit by seconds."""

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
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.micro_batch_size < 0:
            raise ValueError(f"micro-batch size must be >= 0, got {self.micro_batch_size}")
        if not (math.isfinite(self.micro_batch_seconds) and self.micro_batch_seconds >= 0):
            raise ValueError(f"micro-batch seconds must be >= 0, got {self.micro_batch_seconds}")

    @property
    def micro_batching(self) -> bool:
        return self.micro_batch_size > 0 or self.micro_batch_seconds > 0


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


def load_weights(model: nn.Module, weights: Weights, tensors: Weights | None = None) -> None:
    """Copy ``weights`` (parameters and buffers, by name) into ``model``: one fused copy, from
    tensors on any device (a CUDA round keeps the global weights on the device). ``tensors``:
    the model's parameters and buffers by name, when the caller has them."""
    if tensors is None:
        tensors = dict(_tensors(model))
    missing = [n for n in weights if n not in tensors]
    if missing:
        raise ValueError(f"weights for unknown parameters: {missing[:5]}")
    dst, src = [tensors[n] for n in weights], list(weights.values())
    with torch.no_grad():
        if all(d.device == w.device for d, w in zip(dst, src, strict=True)):
            torch._foreach_copy_(dst, src)
        else:  # e.g. CPU weights into a CUDA model: one copy per tensor
            for d, w in zip(dst, src, strict=True):
                d.copy_(w)


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


def micro_batches(idx: torch.Tensor, data: ClientData, cfg: LocalTrainConfig) -> list:
    """One step's index batch ``idx`` as consecutive micro-batches of at most
    ``micro_batch_size`` examples and ``micro_batch_seconds`` of audio (an utterance longer than
    the limit goes alone: it cannot be split). Without micro-batching: ``[idx]``."""
    if not cfg.micro_batching:
        return [idx]
    durations = None
    if cfg.micro_batch_seconds > 0:
        durations = getattr(data, "durations", None)
        if durations is None:
            raise ValueError("micro-batch-seconds needs data with durations (speech)")
    parts: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for i in idx.tolist():
        seconds = float(durations[i]) if durations is not None else 0.0
        full = (cfg.micro_batch_size > 0 and len(current) >= cfg.micro_batch_size) or (
            durations is not None and total + seconds > cfg.micro_batch_seconds
        )
        if current and full:
            parts.append(current)
            current, total = [], 0.0
        current.append(i)
        total += seconds
    if current:
        parts.append(current)
    return [torch.tensor(p, dtype=idx.dtype) for p in parts]


def loss_count(task: Task, batch, size: int) -> float:
    """What ``task.loss`` averages over in ``batch`` (of ``size`` examples), so that micro-batch
    losses weighted by their share of it sum to the full batch's loss.

    Cross-entropy and CTC (``reduction="mean"``: each utterance's loss divided by its target
    length, then the mean over utterances) average over examples; a task with another reduction
    defines ``loss_count(batch)`` (OFVL-MS: the batch's valid pixels).
    """
    own = getattr(task, "loss_count", None)
    if own is not None:
        return float(own(batch))
    return float(size)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run, before any training."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        # CPU fp16 autocast exists, but without loss scaling small gradients underflow; bf16
        # has float32's range and needs none.
        raise ValueError(
            f"precision = 'fp16' needs a CUDA device (this one is {device.type}); use 'bf16' "
            "or 'fp32' (a node can set it: --node-config \"precision='bf16'\")"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision = 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16 "
            "support; use 'fp16' (loss-scaled) or 'fp32'"
        )


FP16_INIT_SCALE = 2.0**10
"""Initial loss scale for fp16: each client starts a fresh scaler and runs a few steps, so a
high start (torch's 2**16) would skip several of them on overflow before it backs off."""


def local_update(
    model: nn.Module,
    task: Task,
    weights: Weights,
    data: ClientData,
    cfg: LocalTrainConfig,
    seed: int,
    clip: ClipConfig | None = None,
    *,
    to_cpu: bool = True,
) -> LocalResult:
    """Train ``model`` from ``weights`` on ``data`` and return the delta.

    With ``clip`` the delta is clipped here, on the client, so an unclipped delta never leaves it.
    The delta is computed and clipped in float32 whatever the model's precision. ``weights``
    may live on the model's device (a round on CUDA keeps them there); ``to_cpu=False`` leaves
    the (clipped) delta on the device too, for an engine that sums it there.

    With micro-batching, each micro-batch's loss is weighted by its share of what the task's
    loss averages over (:func:`loss_count`), so the accumulated gradient is the full batch's;
    the per-step ``grad_clip`` then applies to that accumulated gradient. Randomness inside the
    model (dropout, SpecAugment, layer-drop) is drawn per forward pass, so with it micro-batched
    training is equal in distribution, not bit for bit.
    """
    with section("weights in/out"):
        tensors = dict(_tensors(model))
        load_weights(model, weights, tensors)
        model.train()
        device = next(model.parameters()).device
        check_precision(device, cfg.precision)
        params = [p for p in model.parameters() if p.requires_grad]
    scaler = (
        torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE)
        if cfg.precision == "fp16"
        else None
    )
    # Plain SGD (no momentum, no weight decay), the usual client optimizer: its step, p -= lr*g
    # for every parameter with a gradient, is applied directly, as torch.optim.SGD computes it,
    # without the optimizer object's per-step bookkeeping (a large share of a small model's step).
    plain_sgd = (
        cfg.optimizer == "sgd"
        and scaler is None
        and cfg.options.momentum == 0
        and cfg.options.weight_decay == 0
    )
    optimizer = None if plain_sgd else make_optimizer(cfg.optimizer, params, cfg.lr, cfg.options)
    generator = torch.Generator().manual_seed(seed)
    losses: list[torch.Tensor] = []  # per step, on the device (no sync per step)
    # Dropout and other randomness inside the model follow the seed, not the global RNG.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Seed only the generators in use: torch.manual_seed would also touch every CUDA device.
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        plan = batches(data, cfg, generator)
        feed = torch.cuda.Stream(device) if device.type == "cuda" else None
        while True:
            with section("batch building"):
                idx = next(plan, None)
                if idx is None:
                    break
                parts = micro_batches(idx, data, cfg)
                gathered = [data.batch(p) for p in parts]
                if feed is not None:
                    gathered = [_pinned_copy(b, device, feed) for b in gathered]
            with section("fwd/bwd/step"):
                for p in params:
                    p.grad = None
                step_loss = _accumulate(model, task, gathered, parts, cfg, scaler, device)
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)  # skipped when the scaled gradient overflowed
                    scaler.update()
                elif plain_sgd:
                    trained = [p for p in params if p.grad is not None]
                    with torch.no_grad():
                        torch._foreach_add_(trained, [p.grad for p in trained], alpha=-cfg.lr)
                else:
                    optimizer.step()
                project_weights(model)  # Normalize-and-Project (no-op for other models)
                losses.append(step_loss)
    if losses and device.type == "cuda":
        with section("fwd/bwd/step"):
            for value in torch.stack(losses).tolist():
                _check_finite(value)
    with section("weights in/out"):
        delta = take_delta(tensors, weights, device)
    stats = None
    if clip is not None:
        with section("clipping"):  # in place: the delta is this call's own
            delta, stats = clip_update(
                delta, clip, reference={n: w.shape for n, w in weights.items()}, inplace=True
            )
    if to_cpu:
        with section("weights in/out"):  # what leaves the client lives on the CPU
            delta = {n: d.to("cpu", non_blocking=False) for n, d in delta.items()}
    return LocalResult(
        delta=delta,
        num_examples=len(data),
        steps=len(losses),
        train_loss=float(torch.stack(losses).double().mean()) if losses else math.nan,
        clip_stats=stats,
    )


def take_delta(tensors: Weights, weights: Weights, device: torch.device) -> Weights:
    """new - old in float32 for the tensors the server sent (``weights``; ``tensors``: the
    model's by name); others (a client's private, scene-specific or FedBN-style parameters) are
    trained too but stay in the model."""
    names = list(weights)
    new = [tensors[n].detach() for n in names]
    old = [weights[n] for n in names]
    if all(t.dtype == torch.float32 for t in new) and all(
        w.dtype == torch.float32 and w.device == device for w in old
    ):
        return dict(zip(names, torch._foreach_sub(new, old), strict=True))
    return {
        n: t.to(torch.float32) - w.to(device=device, dtype=torch.float32)
        for n, t, w in zip(names, new, old, strict=True)
    }


def _accumulate(
    model: nn.Module,
    task: Task,
    gathered: list,
    parts: list,
    cfg: LocalTrainConfig,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> torch.Tensor:
    """Backpropagate one step's loss over its micro-batches (``gathered``, built from the index
    batches ``parts``); return the step's loss (a 0-d float32 tensor on the device).

    Micro-batch k's loss is weighted by c_k / sum(c), c from :func:`loss_count`: the weighted sum
    is the full batch's mean loss, and so is the accumulated gradient. A micro-batch's loss is
    computed under autocast but cast to float32 before weighting and backward.
    """
    counts = [loss_count(task, b, len(p)) for b, p in zip(gathered, parts, strict=True)]
    total = sum(counts)
    if total <= 0:  # e.g. no valid pixel at all: the loss is then a plain mean over examples
        counts = [float(len(p)) for p in parts]
        total = sum(counts)
    step_loss = None
    for batch, count in zip(gathered, counts, strict=True):
        with _autocast(device, cfg.precision):
            loss = task.loss(model, batch)
        loss = loss.float()
        if len(gathered) > 1:
            loss = loss * (count / total)
        if device.type != "cuda":  # on CUDA, checked once per client: a check here would sync
            _check_finite(loss.item())
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss


def _check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"local training diverged: loss {value}")


def _pinned_copy(batch, device: torch.device, stream):
    """``batch`` (a dict, list or tuple of tensors and other values) on the CUDA ``device``:
    copied from pinned memory on the side ``stream``, so that the copy of the next step's batch
    overlaps the current step's kernels; the current stream waits for it before use."""
    from torch.utils._pytree import tree_leaves, tree_map

    def move(t):
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        return t.pin_memory().to(device, non_blocking=True)

    with torch.cuda.stream(stream):
        out = tree_map(move, batch)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.device == device:
            t.record_stream(current)  # allocated on the side stream, used on this one
    return out
