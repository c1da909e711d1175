"""The normalisation layers dpfl writes itself, since no maintained package ships them (each
cites its paper): PowerNorm, Unified Normalization, EvoNorm-B0/S0, Batch-Channel Normalisation
with Weight Standardisation, Normalize-and-Project's weight projection, and the layout adapters.
:mod:`dpfl.models.normalization` registers them (and torch's) by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYOUTS = ("last", "channels")


@dataclass(frozen=True)
class NormOptions:
    """Settings shared by name across layers (each uses the ones it has)."""

    eps: float = 1e-5
    groups: int = 4
    """GroupNorm, EvoNorm-S0 and BCN's channel part: number of groups (reduced to a divisor of
    the channel count when it does not divide it)."""
    momentum: float = 0.9
    """Weight of the old value in running averages (PowerNorm, UN, EvoNorm-B0, BCN)."""
    warmup: int = 4000
    """PowerNorm and Unified Normalization: training steps that normalise by the batch's own
    statistics before the running ones take over (the papers use thousands)."""
    window: int = 4
    """Unified Normalization: iterations whose statistics are smoothed (geometric mean)."""
    outlier_filter: bool = True
    """Unified Normalization: skip the smoothing for a batch whose statistics are outliers."""
    micro_batch: bool = True
    """BCN: normalise the batch part by running estimates updated with each batch (for the
    small batches of one client), instead of by the batch's own statistics."""


def _groups(channels: int, wanted: int) -> int:
    g = max(1, min(wanted, channels))
    while channels % g:
        g -= 1
    return g


def _other_dims(t: torch.Tensor) -> list[int]:
    """Every dimension but 1 (channels) of a (B, C, *) tensor."""
    return [d for d in range(t.dim()) if d != 1]


def _channels_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=_other_dims(t))


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _scaled(x: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(var + eps), ``var`` per channel: the quadratic-mean normalisation."""
    return x / (_per_channel(var, x) + eps).sqrt()


def _affine(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _per_channel(weight, z) * z + _per_channel(bias, z)


# --- PowerNorm ----------------------------------------------------------------------------------


class _PowerFunction(torch.autograd.Function):
    """PowerNorm's forward and approximate backward (Shen et al., ICML 2020, Algorithm 1).

    Forward: x_hat = x / sqrt(psi^2 + eps), y = gamma * x_hat + beta, no mean subtraction. psi^2
    is the batch's quadratic mean mean_B(x^2) during warm-up, the running one afterwards.
    Backward, approximated with a running correction nu (``ema_gz``):
        g = gamma * dL/dy;  g_tilde = g - (1 - alpha_bkw) * nu * x_hat;
        dL/dx = g_tilde / sqrt(psi^2 + eps);  nu += mean_B(g_tilde * x_hat).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, psi2, ema_gz, eps, alpha_bkw):
        z = _scaled(x, psi2, eps)
        ctx.save_for_backward(z, psi2, weight, ema_gz)
        ctx.eps, ctx.alpha_bkw = eps, alpha_bkw
        return _affine(z, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        z, psi2, weight, ema_gz = ctx.saved_tensors
        g = grad_out * _per_channel(weight, z)
        approx = g - (1 - ctx.alpha_bkw) * _per_channel(ema_gz, z) * z
        with torch.no_grad():
            ema_gz.add_(_channels_mean(approx * z))
        gx = _scaled(approx, psi2, ctx.eps)
        dims = _other_dims(z)
        return gx, (grad_out * z).sum(dims), grad_out.sum(dims), None, None, None, None


class PowerNorm(nn.Module):
    """PowerNorm for ``(B, C, *)`` inputs (Shen et al., "PowerNorm: Rethinking Batch
    Normalization in Transformers", ICML 2020): normalise by a running quadratic mean, no mean
    subtraction, approximate backward (see :class:`_PowerFunction`).

    Running statistics: ``running_phi`` (psi^2), ``ema_gz`` (nu) and ``steps``. For the first
    ``warmup`` training steps ``running_phi`` is the cumulative average of the batch quadratic
    means and the layer normalises by the batch's own; afterwards it normalises by the running
    value of the previous step and updates it as an exponential average (``momentum``). Eval
    always uses ``running_phi``. ``steps`` is a float so that a server can average it.
    """

    running_stats = ("running_phi", "ema_gz", "steps")

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__()
        self.eps, self.momentum, self.warmup = options.eps, options.momentum, options.warmup
        self.alpha_bkw = options.momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_phi", torch.ones(channels))
        self.register_buffer("ema_gz", torch.zeros(channels))
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return _affine(_scaled(x, self.running_phi, self.eps), self.weight, self.bias)
        with torch.no_grad():
            self.steps.add_(1)
            step = float(self.steps)
            batch = _channels_mean(x.detach().float() ** 2)
            if step <= self.warmup:
                psi2 = batch
                self.running_phi.mul_((step - 1) / step).add_(batch / step)
            else:
                psi2 = self.running_phi.clone()
                self.running_phi.mul_(self.momentum).add_((1 - self.momentum) * batch)
        return _PowerFunction.apply(
            x, self.weight, self.bias, psi2, self.ema_gz, self.eps, self.alpha_bkw
        )


# --- Unified Normalization ----------------------------------------------------------------------


class _UNFunction(torch.autograd.Function):
    """UN's forward by a given variance and its backward with gradient compensation."""

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, mean_gz_fn, eps):
        z = _scaled(x, var, eps)
        ctx.save_for_backward(z, var, weight, r)
        ctx.mean_gz_fn, ctx.eps = mean_gz_fn, eps
        return _affine(z, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        z, var, weight, r = ctx.saved_tensors
        g = grad_out * _per_channel(weight, z) * _per_channel(r, z)
        ema_gz = ctx.mean_gz_fn(_channels_mean(g * z))  # updates the running correction
        approx = g - _per_channel(ema_gz, z) * z
        gx = _scaled(approx, var, ctx.eps)
        dims = _other_dims(z)
        y = _per_channel(r, z) * z
        return gx, (grad_out * y).sum(dims), grad_out.sum(dims), None, None, None, None


class UnifiedNorm(nn.Module):
    """Unified Normalization for ``(B, C, *)`` inputs (Yang et al., "Unified Normalization for
    Accelerating and Stabilizing Transformers", ACM MM 2022).

    Like PowerNorm it divides by a quadratic mean without subtracting a mean, so at inference it
    is a per-channel scale and shift that fuses into the neighbouring linear layer. Training:
    * fluctuation smoothing: after ``warmup`` steps the forward divides by the geometric mean of
      the last ``window`` batch quadratic means, and the backward subtracts the arithmetic mean
      of the last ``window`` gradient corrections (then an exponential average, ``momentum``);
    * outlier filtration (``outlier_filter``): a batch whose window's arithmetic mean exceeds its
      geometric mean by more than ``window`` times the variance of the window's root quadratic
      means is an outlier: it is normalised by its own statistics and the window keeps the
      running value instead;
    * gradient compensation: the backward scales by r = sqrt(var / running_var), clamped to
      [1/5, 5] (1 until max(1000, warmup) steps and for outliers).
    Eval divides by ``running_var``. Running statistics: ``running_var``, ``ema_gz``, the two
    windows, ``steps`` and ``skipped`` (outliers seen).
    """

    running_stats = ("running_var", "ema_gz", "window_x2", "window_gz", "steps", "skipped")

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__()
        self.eps, self.momentum, self.warmup = options.eps, options.momentum, options.warmup
        self.window, self.outlier_filter = options.window, options.outlier_filter
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("ema_gz", torch.zeros(channels))
        self.register_buffer("window_x2", torch.ones(self.window, channels))
        self.register_buffer("window_gz", torch.zeros(self.window, channels))
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("skipped", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return _affine(_scaled(x, self.running_var, self.eps), self.weight, self.bias)
        with torch.no_grad():
            self.steps.add_(1)
            step = int(self.steps)
            slot = step % self.window
            x2 = _channels_mean(x.detach().float() ** 2)
            recorded = torch.sqrt(self.window_x2).var() if self.window > 1 else torch.zeros(())
            self.window_x2[slot] = x2
            skip = self.window <= 1
            if step >= self.warmup and self.outlier_filter and self.window > 1:
                am = self.window_x2.mean(0)
                gm = self.window_x2.clamp_min(1e-30).log().mean(0).exp()
                if bool(((am - gm) > recorded * self.window).any()):
                    self.window_x2[slot] = self.running_var
                    self.skipped.add_(1)
                    skip = True
            if step <= self.window or step < self.warmup or skip:
                var = x2
            else:
                var = self.window_x2.clamp_min(1e-30).log().mean(0).exp()
            if step <= max(1000, self.warmup) or skip:
                r = torch.ones_like(var)
            else:
                r = ((var + self.eps) / (self.running_var + self.eps)).sqrt().clamp(0.2, 5.0)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
        use_window = not (step <= self.window or step < self.warmup or skip)

        def mean_gz(gz: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if skip:
                    self.window_gz[slot] = self.ema_gz
                    current = gz
                else:
                    self.window_gz[slot] = gz
                    current = self.window_gz.mean(0) if use_window else gz
                self.ema_gz.mul_(self.momentum).add_((1 - self.momentum) * current)
                return current if skip else self.ema_gz.clone()

        return _UNFunction.apply(x, self.weight, self.bias, var, r, mean_gz, self.eps)


# --- EvoNorm ------------------------------------------------------------------------------------


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020), for
    ``(B, C, H, W)`` maps: y = x / max(sqrt(s_B^2 + eps), v * x + sqrt(s_I^2 + eps)) * gamma + beta,
    with s_B^2 the batch variance per channel (running average in eval) and s_I^2 the per-sample,
    per-channel variance over positions. It includes the nonlinearity: use no ReLU after it."""

    running_stats = ("running_var",)
    fused_activation = True

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__()
        self.eps, self.momentum = options.eps, options.momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.v = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = _other_dims(x)
            batch_var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * batch_var)
        else:
            batch_var = self.running_var
        inst_var = x.var(dim=tuple(range(2, x.dim())), keepdim=True, unbiased=False)
        den = torch.maximum(
            (_per_channel(batch_var, x) + self.eps).sqrt(),
            _per_channel(self.v, x) * x + (inst_var + self.eps).sqrt(),
        )
        return _affine(x / den, self.weight, self.bias)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., 2020): y = x * sigmoid(v * x) / group_std(x) * gamma + beta, the
    group standard deviation over (C/G, *spatial) per sample. No batch statistics (nothing
    running). It includes the nonlinearity: use no ReLU after it."""

    running_stats: tuple[str, ...] = ()
    fused_activation = True

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__()
        self.eps, self.groups = options.eps, _groups(channels, options.groups)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.v = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        grouped = x.reshape(b, self.groups, -1)
        std = (grouped.var(dim=-1, keepdim=True, unbiased=False) + self.eps).sqrt()
        std = std.expand(b, self.groups, c // self.groups).reshape(b, c, *([1] * (x.dim() - 2)))
        num = x * torch.sigmoid(_per_channel(self.v, x) * x)
        return _affine(num / std, self.weight, self.bias)


# --- Batch-Channel Normalisation + Weight Standardisation ---------------------------------------


class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalisation (Qiao et al., "Micro-Batch Training with Batch-Channel
    Normalization and Weight Standardization", 2019), for ``(B, C, *)`` maps: a batch part (per
    channel, affine) followed by a channel part (GroupNorm, affine).

    With ``micro_batch`` (the paper's micro-batch form) the batch part normalises by running
    estimates mu, sigma^2 that each training batch first moves towards its own statistics
    (mu += (1 - momentum) (mu_B - mu), likewise sigma^2), with no gradient through them; without
    it the batch part is plain BatchNorm. Use it after a weight-standardised convolution
    (:func:`standardize_weight`)."""

    running_stats = ("running_mean", "running_var")

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__()
        self.eps, self.momentum, self.micro_batch = (
            options.eps,
            options.momentum,
            options.micro_batch,
        )
        self.batch_weight = nn.Parameter(torch.ones(channels))
        self.batch_bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.channel = nn.GroupNorm(_groups(channels, options.groups), channels, eps=options.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = _other_dims(x)
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
            if self.micro_batch:
                mean, var = self.running_mean.clone(), self.running_var.clone()
        else:
            mean, var = self.running_mean, self.running_var
        x = _affine(
            _scaled(x - _per_channel(mean, x), var, self.eps), self.batch_weight, self.batch_bias
        )
        return self.channel(x)


def standardize_weight(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weight Standardisation (Qiao et al., 2019): each output filter of a convolution weight
    (O, I, kh, kw) to zero mean and unit variance over its fan-in."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = (flat.var(dim=1, keepdim=True, unbiased=False) + eps).sqrt()
    return ((flat - mean) / std).reshape_as(w)


# --- Normalize-and-Project ----------------------------------------------------------------------


def record_projection_norms(model: nn.Module) -> None:
    """Normalize-and-Project (Lyle et al., "Normalization and effective learning rates in
    reinforcement learning", NeurIPS 2024): record the Frobenius norm at initialisation of every
    weight matrix or convolution kernel (each parameter with >= 2 dimensions), which
    :func:`project_weights` restores after every optimizer step, so the effective learning rate
    of the normalised layers stays constant. Kept as a plain attribute of the model (never
    sent, never checkpointed): every process builds the model from the same seed, hence the
    same targets."""
    model.nap_norms = {
        n: float(p.detach().norm()) for n, p in model.named_parameters() if p.dim() >= 2
    }


@torch.no_grad()
def project_weights(model: nn.Module) -> None:
    """Rescale every recorded parameter to its recorded norm (no-op for other models)."""
    targets = getattr(model, "nap_norms", None)
    if not targets:
        return
    for n, p in model.named_parameters():
        target = targets.get(n)
        if target is not None:
            p.mul_(target / p.norm().clamp_min(1e-12))


# --- wrappers and registry ----------------------------------------------------------------------


class ChannelsFirst(nn.Module):
    """Apply a ``(B, C, *)`` layer to features in the last dimension: ``(B, C)``, ``(B, T, C)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.layer(x[:, :, None])[:, :, 0]
        return self.layer(x.movedim(-1, 1)).movedim(1, -1)


class ChannelsLast(nn.Module):
    """Apply a last-dimension layer (LayerNorm, RMSNorm) to ``(B, C, *)`` maps, per position."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.movedim(1, -1)).movedim(-1, 1)


class TorchBatchNorm(nn.BatchNorm1d):
    """torch's BatchNorm over ``(B, C, *)`` (any number of spatial dimensions)."""

    running_stats = ("running_mean", "running_var")

    def __init__(self, channels: int, options: NormOptions = NormOptions()) -> None:
        super().__init__(channels, eps=options.eps, momentum=1 - options.momentum)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects (B, C, *) input, got {tuple(input.shape)}")


