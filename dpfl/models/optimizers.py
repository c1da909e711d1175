"""Optimizers and learning-rate schedules by name: one registry for the server and the clients.

The server uses it for the step on the (noisy) average delta, the client for local training.
Every entry is built from torch or ``pytorch-optimizer``; nothing here is hand-written math.
Issue [5/8] adds the client-side catalogue (AdamP, Lion, diffGrad, ...) to these same registries.

Each optimizer factory takes ``(params, lr, options)`` where ``options`` is an
:class:`OptimizerOptions`; an option an optimizer does not have is ignored (SGD has no betas).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Params = Iterable[torch.Tensor] | Iterable[dict]


@dataclass(frozen=True)
class OptimizerOptions:
    """Hyper-parameters shared by name across optimizers (each uses the ones it has)."""

    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001  # LARS


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    factory: Callable[[Params, float, OptimizerOptions], torch.optim.Optimizer]
    description: str
    layerwise: bool = False
    """True when the step is normalised per tensor (LAMB, LARS): the paper's layer-wise
    normalisation, which makes training depend on the noise-to-clip ratio, not on C itself."""


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register_optimizer(entry: OptimizerEntry) -> None:
    if entry.name in OPTIMIZERS:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    OPTIMIZERS[entry.name] = entry


def _unknown(kind: str, name: str, known: Iterable[str]) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def make_optimizer(
    name: str, params: Params, lr: float, options: OptimizerOptions | None = None
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (see :data:`OPTIMIZERS`); unknown names list the known ones."""
    entry = OPTIMIZERS.get(name)
    if entry is None:
        raise _unknown("optimizer", name, OPTIMIZERS)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a finite number > 0, got {lr!r}")
    return entry.factory(params, float(lr), options or OptimizerOptions())


def _po(name: str):
    """A class from pytorch-optimizer, imported on first use (it is a heavy import)."""
    import pytorch_optimizer

    return getattr(pytorch_optimizer, name)


register_optimizer(
    OptimizerEntry(
        "sgd",
        lambda p, lr, o: torch.optim.SGD(
            p, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay
        ),
        "SGD (torch); on the server with lr 1 it is FedAvg",
    )
)
register_optimizer(
    OptimizerEntry(
        "adam",
        lambda p, lr, o: torch.optim.Adam(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "Adam (torch); on the server: FedAdam",
    )
)
register_optimizer(
    OptimizerEntry(
        "adamw",
        lambda p, lr, o: torch.optim.AdamW(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "AdamW (torch)",
    )
)
register_optimizer(
    OptimizerEntry(
        "adagrad",
        lambda p, lr, o: torch.optim.Adagrad(p, lr=lr, eps=o.eps, weight_decay=o.weight_decay),
        "Adagrad (torch); on the server: FedAdagrad",
    )
)
register_optimizer(
    OptimizerEntry(
        "yogi",
        lambda p, lr, o: _po("Yogi")(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "Yogi (pytorch-optimizer); on the server: FedYogi",
    )
)
register_optimizer(
    OptimizerEntry(
        "lamb",
        # max_grad_norm=0 and pre_norm=False: no global rescaling of the pseudo-gradient, only
        # LAMB's per-tensor trust ratio, as in the paper. adam_debias=True keeps the bias
        # correction out of the step size, so each tensor moves by lr * min(||w||, 10) as in
        # You et al. (2020); pytorch-optimizer's default would multiply early steps by up to 10.
        lambda p, lr, o: _po("Lamb")(
            p,
            lr=lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            max_grad_norm=0.0,
            pre_norm=False,
            adam_debias=True,
        ),
        "LAMB (pytorch-optimizer): Adam with a per-tensor trust ratio (the paper's server)",
        layerwise=True,
    )
)
register_optimizer(
    OptimizerEntry(
        "lars",
        lambda p, lr, o: _po("LARS")(
            p,
            lr=lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            trust_coefficient=o.trust_coefficient,
        ),
        "LARS (pytorch-optimizer): SGD with a per-tensor trust ratio",
        layerwise=True,
    )
)


# --- learning-rate schedules ------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleOptions:
    step_size: int = 750
    """step: multiply by ``gamma`` every ``step_size`` steps (after the first ``step_size``)."""
    gamma: float = 0.6
    """step and exponential: the decay factor (per ``step_size`` steps, or per step)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 before any schedule."""


ScheduleFactory = Callable[[int, ScheduleOptions], Callable[[int], float]]
SCHEDULES: dict[str, tuple[ScheduleFactory, str]] = {}


def register_schedule(name: str, factory: ScheduleFactory, description: str) -> None:
    if name in SCHEDULES:
        raise ValueError(f"schedule {name!r} is already registered")
    SCHEDULES[name] = (factory, description)


register_schedule("constant", lambda total, o: lambda step: 1.0, "constant learning rate")
register_schedule(
    "step",
    lambda total, o: lambda step: o.gamma ** (step // o.step_size),
    "x gamma every step_size steps (the paper: 0.6 every 750)",
)
register_schedule("exponential", lambda total, o: lambda step: o.gamma**step, "x gamma every step")
register_schedule(
    "linear",
    lambda total, o: lambda step: max(0.0, 1.0 - step / max(1, total)),
    "linear decay to 0 at the last step",
)


def make_schedule(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    options: ScheduleOptions | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch ``LambdaLR`` for schedule ``name``, stepped once per optimizer step."""
    entry = SCHEDULES.get(name)
    if entry is None:
        raise _unknown("schedule", name, SCHEDULES)
    o = options or ScheduleOptions()
    if o.step_size < 1:
        raise ValueError(f"schedule step_size must be >= 1, got {o.step_size}")
    if not 0 < o.gamma <= 1:
        raise ValueError(f"schedule gamma must be in (0, 1], got {o.gamma}")
    if o.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {o.warmup_steps}")
    decay = entry[0](total_steps - o.warmup_steps, o)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        return decay(step - o.warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
