"""Optimizers and learning-rate schedules by name: one registry for the server and the clients.

The server uses it for the step on the (noisy) average delta, the client for local training.
Entries come from torch or ``pytorch-optimizer`` (imported lazily), each checked against its
paper; where the library departs from the paper the entry's description says how. AuON is not
in either library and is written here (:class:`AuON`), after its paper.

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
    """SGD, SGDP, RMSprop, LARS, AuON (the AuON paper uses 0.95)."""
    beta1: float = 0.9
    """First-moment decay (Adam-like); Lion's interpolation factor beta1."""
    beta2: float = 0.999
    """Second-moment decay (Adam-like); RMSprop's alpha; Lion's momentum beta2 (paper: 0.99)."""
    eps: float = 1e-6
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001  # LARS


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    factory: Callable[[Params, float, OptimizerOptions], torch.optim.Optimizer]
    description: str
    layerwise: bool = False
    """True when the step is normalised per tensor (LAMB, LARS, AuON): the paper's layer-wise
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


from dpfl.models.auon import AuON  # noqa: E402 (hand-written: in no library)

# --- the catalogue ------------------------------------------------------------------------------

register_optimizer(
    OptimizerEntry(
        "sgd",
        lambda p, lr, o: torch.optim.SGD(
            p, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay
        ),
        "SGD (torch), heavy-ball momentum b = mu b + g, L2 weight decay; on the server with "
        "lr 1 it is FedAvg",
    )
)
register_optimizer(
    OptimizerEntry(
        "adam",
        lambda p, lr, o: torch.optim.Adam(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "Adam (torch; Kingma & Ba 2015), L2 weight decay; on the server: FedAdam",
    )
)
register_optimizer(
    OptimizerEntry(
        "adamw",
        lambda p, lr, o: torch.optim.AdamW(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "AdamW (torch; Loshchilov & Hutter 2019): Adam with decoupled weight decay",
    )
)
register_optimizer(
    OptimizerEntry(
        "adagrad",
        lambda p, lr, o: torch.optim.Adagrad(p, lr=lr, eps=o.eps, weight_decay=o.weight_decay),
        "Adagrad (torch; Duchi et al. 2011); on the server: FedAdagrad",
    )
)
register_optimizer(
    OptimizerEntry(
        "rmsprop",
        lambda p, lr, o: torch.optim.RMSprop(
            p,
            lr=lr,
            alpha=o.beta2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
        ),
        "RMSprop (torch; Hinton 2012): v = a v + (1 - a) g^2 with a = beta2 (torch's default "
        "is 0.99, Hinton's 0.9), step g / (sqrt(v) + eps), optional momentum",
    )
)
register_optimizer(
    OptimizerEntry(
        "yogi",
        lambda p, lr, o: _po("Yogi")(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "Yogi (pytorch-optimizer); on the server: FedYogi. Unlike Zaheer et al. (2018) and "
        "FedYogi it bias-corrects m and v and starts both at 1e-6",
    )
)
register_optimizer(
    OptimizerEntry(
        "adamp",
        lambda p, lr, o: _po("AdamP")(
            p,
            lr=lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            delta=0.1,
            wd_ratio=0.1,
        ),
        "AdamP (pytorch-optimizer; Heo et al. 2021): Adam whose step on a matrix loses its "
        "radial part when the gradient is near-orthogonal to the weight (cosine < "
        "delta/sqrt(dim), delta 0.1; weight decay x0.1 then); decoupled weight decay. As in "
        "the paper; the library adds eps to sqrt(v) before the bias correction (eps is "
        "1/sqrt(1 - beta2^t) larger early on)",
    )
)
register_optimizer(
    OptimizerEntry(
        "sgdp",
        lambda p, lr, o: _po("SGDP")(
            p,
            lr=lr,
            momentum=o.momentum,
            eps=o.eps,
            weight_decay=o.weight_decay,
            delta=0.1,
            wd_ratio=0.1,
        ),
        "SGDP (pytorch-optimizer; Heo et al. 2021): SGD with momentum and AdamP's projection; "
        "decoupled weight decay scaled by 1/(1 - momentum) as in the reference code",
    )
)
register_optimizer(
    OptimizerEntry(
        "lion",
        lambda p, lr, o: _po("Lion")(
            p, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        ),
        "Lion (pytorch-optimizer; Chen et al. 2023): step lr * (sign(beta1 m + (1 - beta1) g) "
        "+ wd x), then m = beta2 m + (1 - beta2) g. As in the paper; its defaults are "
        "beta2 = 0.99 (ours 0.999) and an lr 3-10x smaller than AdamW's",
    )
)
register_optimizer(
    OptimizerEntry(
        "diffgrad",
        # weight_decouple=False: the paper's (and its code's) L2 decay, added to the gradient.
        lambda p, lr, o: _po("DiffGrad")(
            p,
            lr=lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            weight_decouple=False,
        ),
        "diffGrad (pytorch-optimizer; Dubey et al. 2020): Adam step times the friction "
        "sigmoid(|g_{t-1} - g_t|) (g_0 = 0), L2 weight decay. As in the paper's code "
        "(eps added to sqrt(v) before the bias correction)",
    )
)
register_optimizer(
    OptimizerEntry(
        "conda",
        lambda p, lr, o: _po("Conda")(
            p, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        "Conda (pytorch-optimizer; Wang et al. 2025, column-normalised Adam): on matrices, "
        "Adam in the singular basis of the momentum (full-rank SVD of m on the smaller side, "
        "refreshed every 2000 steps, the second moment kept on the projected gradient), "
        "other tensors plain Adam; decoupled weight decay after the step as in the reference "
        "code. The reference runs also scale projected steps by 0.25 (here 1, as in the "
        "paper's equations) and refresh at steps 1, 2001, ... (here 1, 2000, 4000, ...)",
    )
)
register_optimizer(
    OptimizerEntry(
        "auon",
        lambda p, lr, o: AuON(
            p,
            lr=lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        ),
        "AuON (hand-written; Maity 2025): Nesterov momentum, Frobenius-normalised, divided by "
        "the RMS of its cosh (linear time); vectors by AdamW at lr/10. Set momentum (paper: "
        "0.95) and a Muon-like lr (paper: 0.08-0.24)",
        layerwise=True,
    )
)
register_optimizer(
    OptimizerEntry(
        "auon-hybrid",
        lambda p, lr, o: AuON(
            p,
            lr=lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            ns_steps=1,
        ),
        "Hybrid-AuON (hand-written; Maity 2025): AuON with one Newton-Schulz iteration "
        "between the normalisation and the cosh-RMS scaling",
        layerwise=True,
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
        "LAMB (pytorch-optimizer): Adam with a per-tensor trust ratio (the paper's server). "
        "As You et al. (2020) with weight decay 0; with weight decay the library decays "
        "x *= 1 - lr wd outside the trust ratio (the paper puts wd x inside it)",
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
        "LARS (pytorch-optimizer; You et al. 2017): SGD with momentum on the trust-scaled "
        "eta ||w|| / (||g|| + wd ||w||) (g + wd w); vectors (biases, norms) get plain "
        "momentum SGD without trust ratio or weight decay. Overwrites p.grad",
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
    "warmup",
    lambda total, o: lambda step: 1.0,
    "linear warm-up over warmup_steps (which must be >= 1), then constant",
)
register_schedule(
    "cosine",
    lambda total, o: (
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    ),
    "half a cosine from 1 to 0 over the steps after the warm-up (Loshchilov & Hutter 2017, "
    "without restarts)",
)
register_schedule(
    "step",
    lambda total, o: lambda step: o.gamma ** (step // o.step_size),
    "x gamma every step_size steps (the paper: 0.6 every 750)",
)
register_schedule("exponential", lambda total, o: lambda step: o.gamma**step, "x gamma every step")
register_schedule(
    "linear",
    lambda total, o: lambda step: max(0.0, 1.0 - step / max(1, total)),
    "linear decay to 0 at the last step: the default recommended by Defazio et al., 'When, "
    "Why and How Much? Adaptive Learning Rate Scheduling by Refinement' (2023)",
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
    if name == "warmup" and o.warmup_steps < 1:
        raise ValueError("schedule 'warmup' needs warmup_steps >= 1 (else use 'constant')")
    decay = entry[0](total_steps - o.warmup_steps, o)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        return decay(step - o.warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
