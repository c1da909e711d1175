"""A whole cohort's local training as one computation (``torch.func``: ``functional_call`` and
``vmap`` of the per-client loss, then one backward pass for all clients).

Each client has its own stacked copy of the parameters and of its optimizer state; one step
trains every client on its own batch at once. The per-client gradients come from one backward
pass of the sum of the clients' losses: client k's loss depends only on its own copy of the
parameters, so that gradient, taken with respect to client k's copy, is exactly client k's own
(the result of ``vmap(grad(loss))``, at a fraction of the functorch transform's overhead).
Clients of unequal size are padded: examples by a mask in a masked-mean loss (equal to the mean
over the client's real examples), steps by an "active" flag (a client that has run out of steps
keeps its parameters and optimizer state).
The batches are exactly those of the sequential path (:func:`dpfl.client.train.batches` with
the same per-client seed), and the SGD and Adam updates are torch's formulas, so the result
equals :func:`dpfl.client.train.local_update` to float rounding (tested within 1e-5).

A task's ``per_example_loss`` is used when it has one; otherwise one is derived from its
``loss`` (each example alone, under an inner ``vmap``) and checked against ``loss`` on real data
(:func:`derived_loss_check`) before it is trusted.

What cannot be vectorised falls back to the sequential path, and :func:`why_not` says why:
models with dropout or running statistics, client-private parameters, speech batches by seconds,
weight projection (NaP), optimizers other than SGD and Adam, a loss that is not a mean over
examples, and data that is not a set of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from dpfl.api import ClientData, Task, hook, task_name
from dpfl.client.train import LocalResult, LocalTrainConfig, Weights, batches
from dpfl.privacy.clipping import ClipConfig, ClipStats
from dpfl.privacy.stacked import StackedClipStats, clip_stacked
from dpfl.profiling import section

OPTIMIZERS = ("sgd", "adam")
GATHER_BYTES = 64 * 2**20
"""Up to this size, a chunk's batches for all its steps are gathered in one copy before training."""


def why_not(model: nn.Module, task: Task, cfg: LocalTrainConfig, private=None) -> str | None:
    """None when a cohort of this setting can be trained vectorised, else the reason."""
    from dpfl.models.normalization import running_stat_names

    if hook(task, "per_example_loss") is None and hook(task, "loss_count") is not None:
        return (
            f"task {task_name(task)!r} averages its loss over loss_count, not examples, and has "
            "no per_example_loss"
        )
    if cfg.optimizer not in OPTIMIZERS:
        return f"optimizer {cfg.optimizer!r} has no vectorised form (only {', '.join(OPTIMIZERS)})"
    if cfg.batch_seconds > 0:
        return "batches by seconds of audio (speech) have data-dependent shapes"
    if cfg.precision != "fp32":
        return f"precision = {cfg.precision!r}: the vectorised path trains in float32 only"
    if cfg.micro_batching:
        return "micro-batching bounds one client's memory; a vectorised cohort does not use it"
    if private is not None:
        return "clients keep private parameters or statistics between rounds"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model uses dropout (random state per client)"
    if running_stat_names(model) or any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return "the model keeps running statistics"
    if getattr(model, "nap_norms", None):
        return "weights are projected after each step (Normalize-and-Project)"
    return None


class _Forward:
    """The model as a user's ``loss`` sees it, whose call runs ``forward`` (the functional model
    of one client under vmap); everything else (parameters(), attributes) is the real model's."""

    def __init__(self, forward, model: nn.Module) -> None:
        self._forward, self._model = forward, model

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def per_example_loss(task: Task, model: nn.Module):
    """``(forward, batch) -> (B,) losses``: the task's own ``per_example_loss``, or one derived
    from ``task.loss`` by running it on each example alone under ``vmap`` (right when ``loss``
    is the mean of its examples' losses, which :func:`derived_loss_check` verifies)."""
    own = hook(task, "per_example_loss")
    if own is not None:
        return own

    def derived(forward, batch):
        proxy = _Forward(forward, model)

        def one(example):
            return task.loss(proxy, tree_map(lambda t: t.unsqueeze(0), example))

        return vmap(one)(batch)

    return derived


def derived_loss_check(
    model: nn.Module, task: Task, data: ClientData, examples: int = 4
) -> str | None:
    """None when ``task``'s per-example loss (its own, or derived from ``loss``) agrees with
    ``loss`` on the first ``examples`` of ``data`` (their mean equals the batch loss), else why
    not: the derived loss may not survive vmap, or ``loss`` may not be a mean over examples."""
    if not isinstance(getattr(data, "tensors", None), dict):
        return "the data is not a set of tensors (TensorData)"
    if hook(task, "per_example_loss") is not None:
        return None
    n = min(len(data), examples)
    if n == 0:
        return None
    batch = data.batch(torch.arange(n))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            whole = float(task.loss(model, batch))
            each = per_example_loss(task, model)(model, batch)
        if tuple(each.shape) != (n,):
            return f"the derived per-example loss has shape {tuple(each.shape)}, not ({n},)"
        mean = float(each.mean())
    except Exception as err:  # the user's loss under vmap: any failure means "not this way"
        first = str(err).splitlines()[0] if str(err) else ""
        return (
            f"task {task_name(task)!r}'s loss does not run per example under torch.func.vmap "
            f"({type(err).__name__}: {first[:160]}); add per_example_loss(forward, batch)"
        )
    finally:
        model.train(was_training)
    if abs(whole - mean) > 1e-4 * max(1.0, abs(whole)):
        return (
            f"task {task_name(task)!r}'s loss is not the mean of its examples' losses (batch "
            f"{whole:.6g}, mean of examples {mean:.6g}); add per_example_loss(forward, batch)"
        )
    return None


def _stack_data(datas: Sequence[ClientData]) -> dict[str, torch.Tensor]:
    """Every client's tensors, padded to the largest client: (K, N_max, ...)."""
    if not all(hasattr(d, "tensors") for d in datas):
        raise TypeError("vectorised training needs tensor data (TensorData)")
    n_max = max(len(d) for d in datas)
    if all(len(d) == n_max for d in datas):  # equal sizes: one copy per tensor
        return {key: torch.stack([d.tensors[key] for d in datas]) for key in datas[0].tensors}
    out = {}
    for key in datas[0].tensors:
        first = datas[0].tensors[key]
        stacked = torch.zeros((len(datas), n_max, *first.shape[1:]), dtype=first.dtype)
        for k, d in enumerate(datas):
            stacked[k, : len(d)] = d.tensors[key]
        out[key] = stacked
    return out


@dataclass
class CohortUpdate:
    """A trained cohort (or chunk), still stacked: row k of every tensor is client k's."""

    deltas: dict[str, torch.Tensor]
    """name -> (K, *shape) float32 deltas on the training device; clipped when a ClipConfig
    was given (rows of clients whose training diverged are zeros: see ``finite``)."""
    finite: torch.Tensor
    """(K,) bool: the client's training stayed finite (false: drop it, as the sequential path
    drops a client whose training raised FloatingPointError)."""
    steps: list[int]
    num_examples: list[int]
    train_loss: list[float]
    clip_stats: StackedClipStats | None

    def results(self) -> list[LocalResult | FloatingPointError]:
        """One :class:`LocalResult` per client (deltas moved to the CPU), or the error of a
        client whose training diverged: what :func:`dpfl.client.train.local_update` returns."""
        out: list[LocalResult | FloatingPointError] = []
        finite = self.finite.tolist()
        cpu = {n: d.cpu() for n, d in self.deltas.items()}
        st = self.clip_stats
        if st is not None:
            norms, layers = st.norms.tolist(), st.layer_norms.tolist()
            clipped, scales = st.clipped.tolist(), st.scales.tolist()
            n_clipped, after = st.layers_clipped.tolist(), st.norm_after.tolist()
        for k, ok in enumerate(finite):
            if not ok:
                out.append(FloatingPointError("local training diverged: non-finite update"))
                continue
            stats = None
            if st is not None:
                stats = ClipStats(
                    norm=norms[k],
                    layer_norms=tuple(layers[k]),
                    scales=tuple(scales[k]),
                    clipped=bool(clipped[k]),
                    layers_clipped=int(n_clipped[k]),
                    norm_after=after[k],
                )
            out.append(
                LocalResult(
                    delta={n: d[k] for n, d in cpu.items()},
                    num_examples=self.num_examples[k],
                    steps=self.steps[k],
                    train_loss=self.train_loss[k],
                    clip_stats=stats,
                )
            )
        return out


def _plan(
    datas: Sequence[ClientData], cfg: LocalTrainConfig, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, mask) of shape (K, S, B): each client's batches, exactly those of the sequential
    path (:func:`dpfl.client.train.batches` with the same seed), padded with masked slots."""
    sizes = {len(d) for d in datas}
    if cfg.steps == 0 and cfg.batch_seconds == 0 and len(sizes) == 1:
        n = sizes.pop()
        if n > 0 and n % cfg.batch_size == 0:
            # Equal clients, whole batches: each epoch of batches() is one randperm of the
            # client's generator cut into consecutive batches, so the plan is those perms.
            perms = []
            for s in seeds:
                g = torch.Generator().manual_seed(int(s))
                perms.append(torch.cat([torch.randperm(n, generator=g) for _ in range(cfg.epochs)]))
            index = torch.stack(perms).view(len(datas), -1, cfg.batch_size)
            return index, torch.ones(index.shape)
    plans = [
        list(batches(d, cfg, torch.Generator().manual_seed(int(s))))
        for d, s in zip(datas, seeds, strict=True)
    ]
    steps = max(1, max((len(p) for p in plans), default=0))
    width = max((len(i) for p in plans for i in p), default=1)
    k_clients = len(datas)
    index = torch.zeros(k_clients * steps, width, dtype=torch.long)
    mask = torch.zeros(k_clients * steps, width)
    rows, flat = [], []
    for k, plan in enumerate(plans):
        for s, idx in enumerate(plan):
            if len(idx) == width:  # the common case: full batches, filled in one copy below
                rows.append(k * steps + s)
                flat.append(idx)
            else:
                index[k * steps + s, : len(idx)] = idx
                mask[k * steps + s, : len(idx)] = 1.0
    if rows:
        at = torch.tensor(rows)
        index[at] = torch.stack(flat)
        mask[at] = 1.0
    return index.view(k_clients, steps, width), mask.view(k_clients, steps, width)


def cohort_updates(
    model: nn.Module,
    task: Task,
    weights: Weights,
    datas: Sequence[ClientData],
    cfg: LocalTrainConfig,
    seeds: Sequence[int],
    clip: ClipConfig | None = None,
) -> list[LocalResult | FloatingPointError]:
    """Train every client of ``datas`` from ``weights`` at once; one result per client, in
    order, each as :func:`dpfl.client.train.local_update` would return it (the delta clipped on
    the client when ``clip`` is given), or the error of a client whose training diverged."""
    if not datas:
        return []
    return train_cohort(model, task, weights, datas, cfg, seeds, clip).results()


def train_cohort(
    model: nn.Module,
    task: Task,
    weights: Weights,
    datas: Sequence[ClientData],
    cfg: LocalTrainConfig,
    seeds: Sequence[int],
    clip: ClipConfig | None = None,
) -> CohortUpdate:
    """Train every client of ``datas`` from ``weights`` at once and keep the result stacked:
    each row as :func:`dpfl.client.train.local_update` computes that client's delta, clipped
    per client (:func:`dpfl.privacy.stacked.clip_stacked`) when ``clip`` is given, so no
    unclipped delta leaves this function."""
    reason = why_not(model, task, cfg)
    if reason is not None:
        raise ValueError(f"cannot vectorise: {reason}")
    k_clients = len(datas)
    if k_clients == 0:
        raise ValueError("a cohort needs at least one client")
    device = next(model.parameters()).device
    names = [n for n, p in model.named_parameters() if p.requires_grad and n in weights]
    frozen = {
        n: p.detach() for n, p in model.named_parameters() if n not in names
    }  # not trained, not sent
    with section("data"):
        index, mask = _plan(datas, cfg, seeds)
        steps = index.shape[1]
        active = mask.sum(-1) > 0  # (K, S)
        counts = active.sum(1).tolist()
        data = {key: t.to(device) for key, t in _stack_data(datas).items()}
        index, mask, active = index.to(device), mask.to(device), active.to(device)
    rows = torch.arange(k_clients, device=device)[:, None]
    example_loss = per_example_loss(task, model)
    start = {n: weights[n].to(device, torch.float32) for n in names}
    params = {n: start[n].expand(k_clients, *start[n].shape).clone() for n in names}
    opt = cfg.options
    state = {n: {} for n in names}

    def loss_fn(p, batch, m):
        def forward(x):
            return functional_call(model, {**frozen, **p}, (x,))

        losses = example_loss(forward, batch)
        return (losses * m).sum() / m.sum().clamp_min(1.0)

    client_losses = vmap(loss_fn)

    def grad_fn(params, batch, m):
        # One backward pass through the vmapped forward: client k's loss depends on its own
        # parameters only, so the gradient of the sum of the losses with respect to client k's
        # stacked parameters is exactly the gradient of its own loss (what grad_and_value under
        # vmap computes, without the cost of the functorch grad transform).
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            losses = client_losses(leaves, batch, m)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    loss_sums = torch.zeros(k_clients, device=device)
    was_training = model.training
    model.train()
    everyone = active.all(0).tolist()  # steps where no client is padded
    with section("local training"):
        # every step's batch gathered at once, (K, S, B, ...), unless that copy would be large
        per_example = sum(t[0, 0].numel() * t.element_size() for t in data.values())
        at_once = index.numel() * per_example <= GATHER_BYTES
        if at_once:
            gathered = {key: t[rows[:, :, None], index] for key, t in data.items()}
        for s in range(steps):
            if at_once:
                batch = {key: t[:, s] for key, t in gathered.items()}
            else:
                batch = {key: t[rows, index[:, s]] for key, t in data.items()}
            grads, losses = grad_fn(params, batch, mask[:, s])
            on = None if everyone[s] else active[:, s]
            loss_sums += losses.detach() if on is None else torch.where(on, losses.detach(), 0.0)
            if cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_, per client
                total = torch.sqrt(
                    sum(g.reshape(k_clients, -1).pow(2).sum(1) for g in grads.values())
                )
                coef = (cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
                grads = {n: g * coef.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}
            with torch.no_grad():
                for n in names:
                    params[n] = _step(cfg, opt, params[n], grads[n], state[n], on, k_clients)
    model.train(was_training)
    deltas = {n: params[n] - start[n] for n in names}
    stats = None
    if clip is not None:
        with section("clipping"):
            deltas, stats = clip_stacked(deltas, clip, {n: weights[n].shape for n in names})
            finite = stats.finite
    else:
        finite = torch.stack([torch.isfinite(d.reshape(k_clients, -1)).all(1)
                              for d in deltas.values()], 1).all(1)  # fmt: skip
    sums = loss_sums.tolist()
    return CohortUpdate(
        deltas=deltas,
        finite=finite,
        steps=counts,
        num_examples=[len(d) for d in datas],
        train_loss=[sums[k] / counts[k] if counts[k] else math.nan for k in range(k_clients)],
        clip_stats=stats,
    )


def _step(cfg, opt, p, g, st, on, k_clients):
    """One optimizer step for every client at once (``on``: the clients with a batch, or None
    when all have one)."""
    shape = (-1, *([1] * (p.dim() - 1)))
    if on is None:
        on = torch.ones(k_clients, dtype=torch.bool, device=p.device)
        if cfg.optimizer == "sgd" and not opt.momentum:  # the common case, without masking
            if opt.weight_decay:
                g = g + opt.weight_decay * p
            return p.add_(g, alpha=-cfg.lr)  # as torch's SGD; p is this function's own copy
    live = on.view(shape)
    if opt.weight_decay:
        g = g + opt.weight_decay * p
    if cfg.optimizer == "sgd":
        if opt.momentum:
            if "buf" not in st:  # torch: the first step's buffer is the gradient
                st["buf"] = torch.where(live, g, torch.zeros_like(g))
                st["started"] = on.clone()
            else:
                new = torch.where(st["started"].view(shape), opt.momentum * st["buf"] + g, g)
                st["buf"] = torch.where(live, new, st["buf"])
                st["started"] = st["started"] | on
            g = st["buf"]
        return torch.where(live, p - cfg.lr * g, p)
    # adam, torch's formula (no amsgrad)
    if "m" not in st:
        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        st["t"] = torch.zeros(k_clients, device=p.device)
    t = st["t"] + on.float()
    m = torch.where(live, opt.beta1 * st["m"] + (1 - opt.beta1) * g, st["m"])
    v = torch.where(live, opt.beta2 * st["v"] + (1 - opt.beta2) * g * g, st["v"])
    tt = t.clamp_min(1.0).view(shape)
    bc1 = 1 - opt.beta1**tt
    bc2 = 1 - opt.beta2**tt
    denom = v.sqrt() / bc2.sqrt() + opt.eps
    st["m"], st["v"], st["t"] = m, v, t
    return torch.where(live, p - (cfg.lr / bc1) * m / denom, p)
