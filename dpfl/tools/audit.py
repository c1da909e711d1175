"""An empirical privacy audit: a lower bound on epsilon from a canary attack.

Setting (the threat model of user-level DP, worst case for the attacker's target):

* one round of dpfl's real release path: each client clips its delta (``clip_update``), the
  server's :class:`~dpfl.server.aggregate.RoundAggregator` validates and sums the updates (its norm
  check included), and :class:`~dpfl.privacy.mechanisms.GaussianMechanism` returns the noisy
  average, with the OS-seeded noise source;
* the other clients' updates are fixed (random directions, each clipped), so the two worlds
  differ only by the canary: a client whose update is a fixed large vector (``canary_scale`` x C
  along one direction). The canary is NOT Poisson-sampled: it is in every "with" trial and in no
  "without" trial (sampling rate 1 for it, so the accountant is asked with q = 1, T = 1: no
  amplification is claimed);
* the attack: project the released average on the canary's direction; say "canary present" above
  a threshold. The threshold is chosen on the first half of the trials and the rates are measured
  on the second half, so the bound is not fitted to the data it is computed on;
* the bound: with 95 % Clopper-Pearson intervals on the true- and false-positive rates,
  epsilon >= max(ln((TPR_lo - delta) / FPR_hi), ln((TNR_lo - delta) / FNR_hi)). With n trials per
  world it can certify at most about ln(n / 3).

Broken mechanisms, to show the audit detects a leak: ``no-noise`` (the noise is not added, the
accountant still claims z) and ``no-clip`` (the canary is not clipped and the server's norm check
is bypassed). A correct mechanism's bound stays below the accountant's epsilon; a broken one's
exceeds it.

Written by hand: no maintained package audits a federated release path like this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import beta

from dpfl.privacy.accounting import compute_epsilon
from dpfl.privacy.clipping import ClipConfig, clip_update
from dpfl.privacy.mechanisms import GaussianMechanism, NoiseSource

MODES = ("correct", "no-noise", "no-clip")


@dataclass(frozen=True)
class AuditResult:
    mode: str
    trials_per_world: int
    noise_multiplier: float
    delta: float
    claimed_epsilon: float
    """What dpfl's RDP accountant reports for this round (q = 1, T = 1, z)."""
    epsilon_lower_bound: float
    """95 % confidence lower bound from the attack (0 when nothing is certified)."""
    max_certifiable: float
    """ln of (trials used for the bound / 3): about the most this many trials can show."""
    tpr: float
    fpr: float
    threshold: float
    canary_poisson_sampled: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "LEAK: bound exceeds the claim" if self.exceeds_claim else "consistent"
        return (
            f"{self.mode:9s} z={self.noise_multiplier:g}:"
            f" claimed epsilon {self.claimed_epsilon:.3f}"
            f" (rdp, delta {self.delta:g}), audit lower bound {self.epsilon_lower_bound:.3f}"
            f" (TPR {self.tpr:.3f}, FPR {self.fpr:.3f}; {self.trials_per_world} trials per world,"
            f" at most {self.max_certifiable:.2f} certifiable): {verdict}"
        )

    @property
    def exceeds_claim(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) Clopper-Pearson interval for a binomial proportion k / n."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, delta: float) -> float:
    """The epsilon any (epsilon, delta)-DP mechanism needs to allow these attack outcomes, at
    95 % confidence per rate (Clopper-Pearson), from both the positive and negative sides."""
    tpr_lo, _ = clopper_pearson(tp, tp + fn)
    _, fpr_hi = clopper_pearson(fp, fp + tn)
    tnr_lo, _ = clopper_pearson(tn, fp + tn)
    _, fnr_hi = clopper_pearson(fn, tp + fn)
    bounds = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        bounds.append(math.log((tpr_lo - delta) / fpr_hi))
    if tnr_lo - delta > 0 and fnr_hi > 0:
        bounds.append(math.log((tnr_lo - delta) / fnr_hi))
    return max(bounds)


def _release(
    others: list[dict[str, torch.Tensor]],
    canary: dict[str, torch.Tensor] | None,
    clip: ClipConfig,
    mechanism: GaussianMechanism,
    cohort: float,
    mode: str,
) -> torch.Tensor:
    """One round's released average, flattened, through dpfl's client and server code."""
    from dpfl.server.aggregate import RoundAggregator, ServerSpec

    shapes = {n: t.shape for n, t in others[0].items()}
    spec = ServerSpec(sample_rate=1.0, population=int(cohort), clip=clip)
    agg = RoundAggregator(shapes, spec)
    for update in others:
        assert agg.add(update) is None
    if canary is not None:
        if mode == "no-clip":  # broken on purpose: unclipped, past the server's check
            for n, t in canary.items():
                agg.total[n].add_(t)
        else:
            clipped, _ = clip_update(canary, clip, shapes)
            reason = agg.add(clipped)
            if reason is not None:
                raise RuntimeError(f"the server rejected the clipped canary: {reason}")
    total = agg.total
    if mode == "no-noise":  # broken on purpose: no noise
        average = {n: t / cohort for n, t in total.items()}
    else:
        average = mechanism.noisy_mean(total, cohort)
    return torch.cat([average[n].reshape(-1) for n in shapes])  # the update's layer order


def run_audit(
    trials: int = 10_000,
    noise_multiplier: float = 4.0,
    mode: str = "correct",
    delta: float = 1e-5,
    clients: int = 10,
    dim: int = 64,
    clip_norm: float = 1.0,
    canary_scale: float = 10.0,
    seed: int = 0,
) -> AuditResult:
    """``trials`` rounds with the canary and ``trials`` without; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"unknown audit mode {mode!r}; known: {', '.join(MODES)}")
    if trials < 100:
        raise ValueError(f"an audit needs >= 100 trials per world, got {trials}")
    gen = torch.Generator().manual_seed(seed)
    clip = ClipConfig(clip_norm, "flat", "clip")
    # a two-layer "model" so the update is a realistic name -> tensor mapping
    half = dim // 2
    layer_shapes = {"layer.weight": (half,), "layer.bias": (dim - half,)}

    def as_update(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"layer.weight": v[:half].clone(), "layer.bias": v[half:].clone()}

    others = []
    for _ in range(clients):
        v = torch.randn(dim, generator=gen)
        others.append(clip_update(as_update(v), clip, layer_shapes)[0])
    direction = torch.randn(dim, generator=gen)
    direction /= direction.norm()
    canary = as_update(direction * canary_scale * clip_norm)
    mechanism = GaussianMechanism(noise_multiplier, clip_norm, NoiseSource())
    cohort = float(clients + 1)  # expected cohort: the others and the canary

    def scores(with_canary: bool) -> np.ndarray:
        out = np.empty(trials)
        for i in range(trials):
            released = _release(
                others, canary if with_canary else None, clip, mechanism, cohort, mode
            )
            out[i] = float(released @ direction)  # same layer order as as_update
        return out

    pos, neg = scores(True), scores(False)
    half_n = trials // 2
    # choose the threshold on the first half of each world
    cand = np.unique(np.concatenate([pos[:half_n], neg[:half_n]]))
    best, threshold = -1.0, float(cand[0])
    for t in cand[:: max(1, len(cand) // 2000)]:
        tp = int((pos[:half_n] > t).sum())
        fp = int((neg[:half_n] > t).sum())
        e = epsilon_lower_bound(tp, half_n - tp, fp, half_n - fp, delta)
        if e > best:
            best, threshold = e, float(t)
    # measure on the second half
    n = trials - half_n
    tp = int((pos[half_n:] > threshold).sum())
    fp = int((neg[half_n:] > threshold).sum())
    bound = epsilon_lower_bound(tp, n - tp, fp, n - fp, delta)
    claimed = compute_epsilon(noise_multiplier, 1.0, 1, delta, "rdp").epsilon
    return AuditResult(
        mode=mode,
        trials_per_world=trials,
        noise_multiplier=noise_multiplier,
        delta=delta,
        claimed_epsilon=claimed,
        epsilon_lower_bound=bound,
        max_certifiable=math.log(n / 3),
        tpr=tp / n,
        fpr=fp / n,
        threshold=threshold,
    )
