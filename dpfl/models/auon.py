"""AuON, written here because neither torch nor pytorch-optimizer 4.1 has it (registered by name
in :mod:`dpfl.models.optimizers`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

Params = Iterable[torch.Tensor] | Iterable[dict]

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024), as in the AuON code."""


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations X <- aX + (bA + cA^2)X, A = XX^T (Muon's).

    ``x`` must have spectral norm <= 1 (it has unit Frobenius norm here). The iteration runs on
    the wide orientation (rows <= columns), as in Muon.
    """
    a, b, c = _NS_COEFFICIENTS
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class AuON(torch.optim.Optimizer):
    r"""AuON: Alternative Unit-norm momentum updates by Normalized nonlinear scaling.

    D. Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
    arXiv:2509.24320 (2025), code github.com/ryyzn9/AuON. For a matrix parameter
    :math:`\theta \in \mathbb{R}^{m \times n}` (tensors with more dimensions are flattened to
    ``(shape[0], -1)`` as in Muon), with momentum :math:`\beta`, learning rate :math:`\eta` and
    decoupled weight decay :math:`\lambda`:

    .. math::

        M_t &= \beta M_{t-1} + (1 - \beta) G_t \\
        \hat G_t &= \beta M_t + (1 - \beta) G_t
            \quad \text{(Nesterov; } \hat G_t = M_t \text{ with nesterov=False)} \\
        X_t &= \hat G_t / (\lVert \hat G_t \rVert_F + 10^{-7}) \\
        U_t &= X_t \Big/ \Big(\sqrt{\tfrac{1}{mn} \textstyle\sum_{ij} \cosh^2 (X_t)_{ij}}
            + 10^{-8}\Big) \\
        \theta_t &= (1 - \eta\lambda)\, \theta_{t-1} - \eta \sqrt{\max(1, m/n)}\; U_t

    :math:`X_t` has unit Frobenius norm, so every entry is in [-1, 1] and the cosh-RMS
    :math:`r_t \ge 1` is a global "emergency brake": the more the energy is concentrated in a
    few entries, the larger :math:`r_t` and the shorter the step. The cost is linear in the size
    of the matrix (no SVD, no matrix products). This is the rule of the paper's training code
    (``Auon_Adam_train.py``: Nesterov momentum by ``lerp``, Frobenius normalisation, cosh-RMS,
    Muon's :math:`\sqrt{\max(1, m/n)}` scale); the repository's later packaged ``AuON`` class
    divides the *un-normalised* momentum by :math:`\mathrm{RMS}(\cosh(1.5\, X_t))` and drops the
    aspect-ratio scale, so its step grows with the gradient norm: we follow the paper's unit-norm
    rule. Weight decay is decoupled (:math:`\theta \leftarrow (1 - \eta\lambda)\theta` first),
    as in the packaged class. Everything is computed in the parameter's precision (float32 for
    half-precision parameters); the paper's code uses bfloat16.

    **Hybrid-AuON** (``ns_steps`` >= 1, the paper: one step): after the Frobenius normalisation,
    ``ns_steps`` Newton-Schulz iterations of Muon's quintic polynomial
    (:math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`,
    :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`) partly orthogonalise :math:`X_t`, and the
    cosh-RMS scaling is applied to the result. The paper describes the hybrid as one
    Newton-Schulz iteration combined with the cosh-RMS scaling without printing the order; we
    assume (our reading) normalise -> Newton-Schulz -> cosh-RMS, with no second normalisation
    between the last two.

    **Vectors and scalars** (biases, norm gains: ``ndim < 2``): the paper, like Muon, does not
    apply AuON to them; its code trains them with AdamW at one tenth of AuON's learning rate
    (``adamw_lr = 0.1 * auon_lr``, and the README's 0.008 vs 0.08). So do we: bias-corrected
    AdamW with ``betas``, ``eps``, the same decoupled ``weight_decay`` and learning rate
    ``vector_lr_ratio * lr``, so one schedule drives both.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        vector_lr_ratio: float = 0.1,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"AuON: learning rate must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"AuON: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"AuON: weight decay must be >= 0, got {weight_decay}")
        if ns_steps < 0:
            raise ValueError(f"AuON: ns_steps must be >= 0, got {ns_steps}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AuON: betas must be in [0, 1), got {betas}")
        if eps < 0 or vector_lr_ratio <= 0:
            raise ValueError("AuON: eps must be >= 0 and vector_lr_ratio > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
            vector_lr_ratio=vector_lr_ratio,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AuON does not support sparse gradients")
                if p.ndim >= 2:
                    self._matrix_step(p, group)
                else:
                    self._vector_step(p, group)
        return loss

    def _matrix_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        beta, lr = group["momentum"], group["lr"]
        buf.lerp_(p.grad, 1 - beta)  # M = beta M + (1 - beta) G
        u = p.grad.lerp(buf, beta) if group["nesterov"] else buf  # (1 - beta) G + beta M
        x = u.reshape(u.shape[0], -1)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        rows, cols = x.shape
        x = x / (torch.linalg.vector_norm(x) + 1e-7)
        if group["ns_steps"]:
            x = _newton_schulz(x, group["ns_steps"])
        brake = torch.sqrt(torch.mean(torch.cosh(x) ** 2))
        update = x / (brake + 1e-8)
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.view(p.shape).to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _vector_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["vector_lr_ratio"]
        grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
