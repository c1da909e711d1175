"""Federated evaluation: users evaluate the global model on their own held-out data, where the
data is, and the server releases the example-weighted means of their metrics.

At every evaluation (every ``eval-every`` rounds and the last), users are drawn by Poisson
sampling at ``q_e = eval-cohort-size / population`` from a sampler of their own (secret, like the
cohorts, and independent of them). Each asked user replies with its number of held-out examples
``n`` and the task's metrics on them. Two releases:

* ``dp`` (the default when DP is on): a user's weight is ``w = min(n, B)`` (``B`` =
  ``eval-max-examples``, public) and each released metric is clipped to the task's public
  bounds ``[lo, hi]`` (``eval_bounds``; accuracy is in [0, 1] by default). The server sums
  ``(w, w (m_1 - lo_1), ..., w (m_k - lo_k))`` over the users who replied and adds Gaussian noise
  of std ``z_e * Delta`` to every coordinate, ``Delta = B sqrt(1 + sum_k (hi_k - lo_k)^2)``: the
  L2 norm of one user's contribution, so adding or removing a user is covered. The released
  means ``lo + noisy sum / noisy weight`` are post-processing. Each evaluation is a
  Poisson-subsampled Gaussian mechanism ``(z_e, q_e)``, charged to the run's ledger next to the
  training rounds; ``target-epsilon`` covers both (``eval-budget-share``).
* ``diagnostic``: exact means over the users who replied, weighted by ``n``, recorded as
  ``diag_fed_*``: non-private diagnostics, not covered by DP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpfl.api import hook
from dpfl.config import RunConfig
from dpfl.privacy.accounting import Segment, epsilon_for_segments

log = logging.getLogger(__name__)

DEFAULT_BOUNDS = {"accuracy": (0.0, 1.0)}
"""Metrics whose range is known without the task saying so."""

MIN_EVAL_NOISE, MAX_EVAL_NOISE = 0.05, 100.0
"""The range calibrate_eval_noise searches."""

Results = list[tuple[int, dict[str, float]]]
"""What the asked users replied: (held-out examples, metrics) per user who answered."""


@dataclass(frozen=True)
class EvalPlan:
    mode: str = "off"  # off, dp or diagnostic
    sample_rate: float = 0.0
    max_examples: int = 0
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    noise_multiplier: float = 0.0
    evaluations: int = 0  # planned
    calibrated: bool = False

    @property
    def sensitivity(self) -> float:
        """L2 norm bound of one user's contribution to the released sums."""
        spread = sum((hi - lo) ** 2 for lo, hi in self.bounds.values())
        return self.max_examples * math.sqrt(1.0 + spread)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sample_rate": self.sample_rate,
            "max_examples": self.max_examples,
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity if self.mode == "dp" else None,
            "evaluations_planned": self.evaluations,
        }


def planned_evaluations(rounds: int, every: int) -> int:
    """Evaluations of a run of ``rounds``: every ``every`` rounds, and the last."""
    return rounds // every + (1 if rounds % every else 0)


def eval_bounds(task: Any) -> dict[str, tuple[float, float]]:
    declared = hook(task, "eval_bounds", None)
    if declared is None:
        return {k: v for k, v in DEFAULT_BOUNDS.items() if k == task.metric}
    bounds = {}
    for name, pair in dict(declared).items():
        lo, hi = (float(x) for x in pair)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"task eval_bounds[{name!r}] = {pair!r}: expected finite lo < hi")
        bounds[str(name)] = (lo, hi)
    return bounds


def calibrate_eval_noise(
    target: float,
    delta: float,
    train: Segment,
    sample_rate: float,
    evaluations: int,
    accountant: str,
) -> float:
    """The smallest z_e (to 0.5 %) with which the planned training and evaluations together
    spend at most ``target`` (searched in [0.05, 100]: Opacus' RDP slows down far above)."""

    def eps(z: float) -> float:
        segments = [train, Segment(z, sample_rate, evaluations)]
        return epsilon_for_segments(segments, delta, accountant, fallback=True).epsilon

    lo = hi = 1.0  # bracket: eps(lo) > target >= eps(hi)
    if eps(hi) <= target:
        while eps(lo) <= target:
            if lo <= MIN_EVAL_NOISE:
                return lo
            hi, lo = lo, lo / 4
    else:
        while eps(hi) > target:
            if hi >= MAX_EVAL_NOISE:
                raise ValueError(
                    f"target-epsilon = {target:g} leaves too little for the {evaluations} "
                    f"planned federated evaluations (z_e > {MAX_EVAL_NOISE:g}): raise "
                    "eval-budget-share"
                )
            lo, hi = hi, hi * 4
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def resolve_eval(cfg: RunConfig, task: Any, train_charged: float, calibrated: bool) -> EvalPlan:
    """The run's federated evaluation: what is released and with which noise. ``train_charged``:
    the z every training attempt is charged at; ``calibrated``: whether it was calibrated for
    the target (then the evaluations' z_e is calibrated to spend the rest)."""
    mode = cfg.eval_mode
    if mode == "off":
        return EvalPlan()
    evaluations = planned_evaluations(cfg.rounds, cfg.eval_every)
    base = dict(
        mode=mode,
        sample_rate=cfg.eval_sample_rate,
        max_examples=cfg.eval_max_examples,
        evaluations=evaluations,
    )
    if mode == "diagnostic":
        return EvalPlan(**base)
    bounds = eval_bounds(task)
    if not bounds:
        raise ValueError(
            f"federated evaluation with DP needs public bounds of the metrics it releases: "
            f"give the task an eval_bounds attribute ({{'{task.metric}': (lo, hi)}}), or set "
            "eval-privacy = 'diagnostic'"
        )
    if cfg.eval_noise_multiplier > 0:
        z_e, cal = cfg.eval_noise_multiplier, False
    elif calibrated:
        z_e = calibrate_eval_noise(
            cfg.target_epsilon,
            cfg.resolved_delta,
            Segment(train_charged, cfg.sample_rate, cfg.rounds),
            cfg.eval_sample_rate,
            evaluations,
            cfg.accountant,
        )
        cal = True
    else:
        z_e, cal = train_charged, False
    return EvalPlan(**base, bounds=bounds, noise_multiplier=z_e, calibrated=cal)


def release(plan: EvalPlan, results: Results, noise) -> dict[str, float]:
    """The metrics of one federated evaluation: ``eval_fed_*`` (dp) or ``diag_fed_*``.
    ``noise``: the run's :class:`~dpfl.privacy.mechanisms.NoiseSource` (dp)."""
    if plan.mode == "diagnostic":
        total = sum(n for n, _ in results)
        out: dict[str, float] = {"diag_fed_users": len(results), "diag_fed_examples": total}
        if total > 0:
            names = set.intersection(*(set(m) for n, m in results if n > 0))
            for name in sorted(names):
                out[f"diag_fed_{name}"] = sum(n * m[name] for n, m in results) / total
        return out
    names = sorted(plan.bounds)
    sums = np.zeros(1 + len(names))
    for n, metrics in results:
        values = [metrics.get(name) for name in names]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            continue  # a user whose evaluation failed contributes nothing
        w = min(max(int(n), 0), plan.max_examples)
        sums[0] += w
        for j, (name, v) in enumerate(zip(names, values, strict=True)):
            lo, hi = plan.bounds[name]
            sums[1 + j] += w * (min(max(float(v), lo), hi) - lo)
    std = plan.noise_multiplier * plan.sensitivity
    draw = noise.standard_normal(len(sums), torch.float64).numpy()
    noisy = sums + std * draw
    out = {"eval_fed_weight": float(noisy[0])}
    if noisy[0] >= plan.max_examples:  # at least one user's worth: the ratio means something
        for j, name in enumerate(names):
            lo, hi = plan.bounds[name]
            out[f"eval_fed_{name}"] = lo + min(max(noisy[1 + j] / noisy[0], 0.0), hi - lo)
    return out


def evaluate_users(run, users, weights) -> Results:
    """In process (the simulator): each user evaluates ``weights`` on its held-out data, with its
    own kept parameters and statistics."""
    from dpfl.client.train import load_weights

    held_out = hook(run.dataset, "user_test_data")
    out: Results = []
    for user in users:
        data = held_out(int(user))
        if len(data) == 0:
            out.append((0, {}))
            continue
        load_weights(run.model, weights)
        run.load_client(int(user))
        out.append((len(data), dict(run.task.evaluate(run.model, data))))
    return out


def federated_evaluation(run, round_number: int, collect_eval) -> dict[str, float]:
    """One federated evaluation of ``run`` (a FederatedRun) after round ``round_number``: the
    budget check, the secret sample, the users' replies, the charge (journaled before anything
    is released), the release."""
    plan, cfg, spec = run.eval_plan, run.cfg, run.spec
    dp = plan.mode == "dp" and plan.noise_multiplier > 0
    if dp and cfg.target_epsilon > 0 and spec.accounted:
        ahead = run.state.ledger.epsilon_after(
            plan.noise_multiplier, plan.sample_rate, 1, spec.delta, cfg.accountant, fallback=True
        )
        if ahead.epsilon > cfg.target_epsilon:
            log.warning(
                "skipping the federated evaluation after round %d: it would bring epsilon to "
                "%.4g > target %.4g",
                round_number,
                ahead.epsilon,
                cfg.target_epsilon,
            )
            return {}
    users = run.eval_sampler.cohort(cfg.population, plan.sample_rate, round_number)
    results = collect_eval(round_number, users, run.state.weights())
    if plan.mode == "dp" and spec.dp:  # charged (and journaled) before anything is released
        run.state.ledger.record(plan.noise_multiplier, plan.sample_rate)
        run.eval_ledger.record(plan.noise_multiplier, plan.sample_rate)
        if run.primary:
            run.writer.record_charge(
                round_number, 0, plan.noise_multiplier, plan.sample_rate, kind="eval"
            )
    return release(plan, results, run.state.noise)


def evaluation_statement(run, statement: dict[str, Any]) -> None:
    """Add the federated evaluation to a privacy statement: its release, bounds and noise, and
    epsilon for training alone, evaluation alone and both (the statement's own figure)."""
    plan = run.eval_plan
    if plan.mode == "off":
        return
    statement["federated_evaluation"] = plan.describe()
    if plan.mode == "diagnostic":
        statement["federated_evaluation"]["note"] = (
            "diag_fed_* metrics: exact means of the asked users' own evaluations, NOT covered "
            "by the DP guarantee"
        )
        return
    spec = run.spec
    if not (spec.accounted and "epsilon" in statement and plan.noise_multiplier > 0):
        return
    accountant = run.cfg.accountant
    evals = run.eval_ledger.rounds
    trained = run.state.ledger.rounds - evals
    parts = {
        "training": [Segment(spec.charged_noise_multiplier, spec.sample_rate, trained)],
        "evaluation": list(run.eval_ledger.segments),
    }
    split = {}
    for name, segments in parts.items():
        segments = [s for s in segments if s.steps > 0]
        split[name] = (
            epsilon_for_segments(segments, spec.delta, accountant, fallback=True).epsilon
            if segments
            else 0.0
        )
    total = statement["epsilon"][accountant]["epsilon"]
    statement["epsilon_split"] = {**split, "together": total, "accountant": accountant}
    lo_hi = ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in plan.bounds.items())
    statement["text"] += (
        f"; includes {evals} federated evaluations (q_e={plan.sample_rate:.4g}, "
        f"z_e={plan.noise_multiplier:.4g}, a user's weight capped at {plan.max_examples} "
        f"examples, {lo_hi}): epsilon {split['training']:.4g} for training alone, "
        f"{split['evaluation']:.4g} for evaluation alone, {total:.4g} together"
    )
