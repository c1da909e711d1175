"""The server's step of one round: validate, sum, noise, average, optimizer step, account.

Framework-free: the Flower strategy and the in-process simulator both drive this class, so the
ways of running dpfl cannot disagree about the maths or the privacy accounting.

    state = ServerState(weights, spec, rounds)
    agg = state.begin_round()
    for update in replies:        # each a name -> tensor delta
        agg.add(update)           # validated; bad updates are rejected with a reason
    metrics = state.finish_round(agg)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from dpfl.models.optimizers import (
    OptimizerOptions,
    ScheduleOptions,
    make_optimizer,
    make_schedule,
)
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.privacy.clipping import (
    ClipConfig,
    check_stacked,
    clip_stacked,
    clip_update,
    non_finite_reason,
    norm_violation,
    stacked_norms,
    stacked_violations,
)
from dpfl.privacy.mechanisms import (
    GaussianMechanism,
    NoiseSource,
    effective_noise_multiplier,
    noisy_count,
)
from dpfl.privacy.updates import l2_norm
from dpfl.profiling import section
from dpfl.server.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401 (re-exported)

Weights = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSpec:
    """What the server needs to know to run rounds (a subset of the run configuration)."""

    sample_rate: float
    population: int
    clip: ClipConfig | None
    clip_location: str = "client"
    noise_multiplier: float = 0.0
    delta: float = 1e-6
    accountant: str = "rdp"
    sampling: str = "poisson"
    optimizer: str = "sgd"
    lr: float = 1.0
    options: OptimizerOptions = OptimizerOptions()
    schedule: str = "constant"
    schedule_options: ScheduleOptions = ScheduleOptions()
    noise_seed: int | None = None
    count_noise_multiplier: float = 0.0
    """z_c of the noisy count that ``min-replies`` decides on (0: no count is released)."""

    @property
    def expected_cohort(self) -> float:
        return self.sample_rate * self.population

    @property
    def charged_noise_multiplier(self) -> float:
        """What the ledger charges per attempt: z, or z_eff when a noisy count is released
        with the sum (one subsampled Gaussian mechanism on both)."""
        return effective_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)

    @property
    def dp(self) -> bool:
        return self.clip is not None

    @property
    def accounted(self) -> bool:
        """Whether an epsilon can be reported: DP on and a sampling the accountants cover."""
        return self.dp and self.sampling == "poisson"


class EventLog:
    """Per-client events (a rejected update, a failed client): each one is logged when
    diagnostics are on; otherwise only the first of a run, since a log line per event would
    record exact per-round counts, which are per-user facts not covered by DP."""

    def __init__(self, each: bool = True) -> None:
        self.each = each
        self.silenced = False

    def warning(self, logger: logging.Logger, message: str, *args: Any) -> None:
        if self.each:
            logger.warning(message, *args)
        elif not self.silenced:
            self.silenced = True
            logger.warning(
                message + " (further per-client events are not logged: diagnostics = false)",
                *args,
            )


@dataclass
class RoundAggregator:
    """Validates and sums the updates of one round; keeps only the running sum in memory."""

    shapes: dict[str, torch.Size]
    spec: ServerSpec
    total: Weights | None = None
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    clipped: int = 0
    norms: list[float] = field(default_factory=list)
    decision: Decision | None = None
    """Set once by :meth:`ServerState.decide`: one noisy count per attempt, never redrawn."""
    events: EventLog = field(default_factory=EventLog)

    def check(self, update: Any) -> str | None:
        """None when ``update`` may enter the sum, else the reason it may not."""
        if not isinstance(update, dict):
            return f"an update must be a name->tensor mapping, got {type(update).__name__}"
        names, expected = set(update), set(self.shapes)
        if names != expected:
            return (
                f"layers do not match the model: missing {sorted(expected - names)[:3]}, "
                f"unexpected {sorted(names - expected)[:3]}"
            )
        for name, t in update.items():
            if not isinstance(t, torch.Tensor):
                return f"{name} is not a tensor"
            if t.dtype != torch.float32:
                return f"{name} has dtype {t.dtype}, expected torch.float32"
            if t.shape != self.shapes[name]:
                return f"{name} has shape {tuple(t.shape)}, expected {tuple(self.shapes[name])}"
        if self.spec.dp and self.spec.clip_location == "client":
            # the client promised a clipped update: hold it to the bound (shared tolerance)
            return norm_violation(update, self.spec.clip, self.shapes)
        try:
            for name, t in update.items():
                l2_norm(t, name)  # finite values
        except ValueError as err:
            return str(err)
        return None

    def reject(self, reason: str) -> None:
        """Count an update that never reached :meth:`add` (e.g. unreadable), with its reason."""
        self.events.warning(log, "update rejected, not aggregated: %s", reason)
        self.rejected[reason.split(":")[0][:80]] += 1

    def add(self, update: Any) -> str | None:
        """Add one client's delta; returns the rejection reason, or None when accepted."""
        with section("aggregation"):
            return self._add(update)

    def _add(self, update: Any) -> str | None:
        reason = self.check(update)
        if reason is not None:
            self.reject(reason)
            return reason
        if self.spec.dp and self.spec.clip_location == "server":
            update, stats = clip_update(update, self.spec.clip, self.shapes)
            self.clipped += int(stats.clipped)
            self.norms.append(stats.norm)
        with torch.no_grad():
            if self.total is None:
                self.total = {n: t.detach().clone() for n, t in update.items()}
            else:
                for n, t in update.items():
                    self.total[n].add_(t)
        self.accepted += 1
        return None

    def add_stacked(self, stacked: dict[str, torch.Tensor]) -> list[str | None]:
        """Add K clients' deltas given as one stack (name -> (K, *shape), row k = client k),
        as K calls of :meth:`add` would: every row is checked on its own (finite values; under
        client-side clipping, within the clip bounds with the shared tolerance) and a row that
        fails is rejected with its reason while the others enter the sum; under server-side
        clipping every row is clipped here. Returns one reason (or None) per row.

        Stacks are built in process by a vectorised engine, so a malformed stack (wrong names,
        shapes or dtype) is a programming error and raises instead of being counted.
        """
        with section("aggregation"):
            return self._add_stacked(stacked)

    def _add_stacked(self, stacked: dict[str, torch.Tensor]) -> list[str | None]:
        for name, t in stacked.items():
            if isinstance(t, torch.Tensor) and t.dtype != torch.float32:
                raise TypeError(f"{name} has dtype {t.dtype}, expected torch.float32")
        spec = self.spec
        if spec.dp and spec.clip_location == "client":
            reasons = stacked_violations(stacked, spec.clip, self.shapes)
        else:
            stacked = check_stacked(stacked, self.shapes)
            total, layer = stacked_norms(stacked)
            names = list(stacked)
            reasons = [
                None if ok else non_finite_reason(names, layer[k])
                for k, ok in enumerate(torch.isfinite(total).tolist())
            ]
        for reason in reasons:
            if reason is not None:
                self.reject(reason)
        keep = [k for k, r in enumerate(reasons) if r is None]
        if not keep:
            return reasons
        if len(keep) < len(reasons):
            index = torch.tensor(keep, device=next(iter(stacked.values())).device)
            stacked = {n: t.index_select(0, index) for n, t in stacked.items()}
        if spec.dp and spec.clip_location == "server":
            stacked, stats = clip_stacked(stacked, spec.clip, self.shapes)
            self.clipped += int(stats.clipped.sum())
            self.norms.extend(stats.norms.tolist())
        with torch.no_grad():
            sums = {n: t.detach().sum(0).to("cpu") for n, t in stacked.items()}
            if self.total is None:
                self.total = {n: sums[n] for n in self.shapes}
            else:
                for n, t in sums.items():
                    self.total[n].add_(t)
        self.accepted += len(keep)
        return reasons

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def diagnostics(self) -> dict[str, Any]:
        """The round's exact counts: per-user facts, NOT covered by DP (``diag_*``)."""
        out: dict[str, Any] = {
            "diag_replies": self.accepted + self.num_rejected,
            "diag_accepted": self.accepted,
            "diag_rejected": self.num_rejected,
        }
        if self.rejected:
            out["diag_rejected_reasons"] = dict(self.rejected)
        return out


@dataclass(frozen=True)
class Decision:
    """Whether an attempt's sum is applied, and the noisy count it was decided on."""

    apply: bool
    noisy_count: float | None = None
    """The accepted count plus N(0, z_c^2) (DP runs with min-replies); None otherwise."""


class ServerState:
    """Global weights, server optimizer and schedule, privacy ledger, round counter."""

    def __init__(
        self,
        weights: Weights,
        spec: ServerSpec,
        total_rounds: int,
        averaged: frozenset[str] = frozenset(),
    ) -> None:
        """``averaged``: tensors (running statistics of norm layers) that take the average
        delta as it is, outside the server optimizer; they are clipped and noised with the
        rest of the update like any other tensor."""
        self.spec = spec
        self.total_rounds = total_rounds
        unknown = set(averaged) - set(weights)
        if unknown:
            raise ValueError(f"averaged tensors not in the weights: {sorted(unknown)[:5]}")
        self.averaged = frozenset(averaged)
        self.params = {
            # the server's state lives on the CPU whatever device the clients train on
            n: torch.nn.Parameter(w.detach().to("cpu", torch.float32, copy=True))
            for n, w in weights.items()
        }
        self.optimizer = make_optimizer(
            spec.optimizer,
            [p for n, p in self.params.items() if n not in self.averaged],
            spec.lr,
            spec.options,
        )
        self.schedule = make_schedule(
            spec.schedule, self.optimizer, total_rounds, spec.schedule_options
        )
        self.ledger = PrivacyLedger()
        self.events = EventLog()
        self.round = 0
        self.noise = NoiseSource(seed=spec.noise_seed)
        if spec.dp and spec.noise_multiplier > 0:
            self.noise.reserve(sum(p.numel() for p in self.params.values()))
        self.mechanism = (
            GaussianMechanism(spec.noise_multiplier, spec.clip.clip_norm, self.noise)
            if spec.dp
            else None
        )

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.params.items()}

    def weights(self) -> Weights:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def begin_round(self) -> RoundAggregator:
        return RoundAggregator(self.shapes, self.spec, events=self.events)

    def decide(self, agg: RoundAggregator, min_replies: int) -> Decision:
        """Whether the attempt just collected has enough accepted replies to be applied.

        Under DP the decision is made on a noisy count (std z_c users; the count changes by at
        most 1 with one user), never on the exact one: the ledger charges the attempt as one
        Gaussian mechanism on (sum, count) at z_eff (:attr:`ServerSpec.charged_noise_multiplier`),
        so the decision, and whether the round was applied, skipped or retried, are
        post-processing. Without ``min_replies`` nothing is decided and no count is released.
        """
        if agg.decision is not None:
            # a second draw would release a second noisy count of the same attempt, uncharged
            return agg.decision
        spec = self.spec
        if min_replies <= 0:
            agg.decision = Decision(True)
        elif spec.dp and spec.count_noise_multiplier > 0:
            with section("noise"):
                noisy = noisy_count(agg.accepted, spec.count_noise_multiplier, self.noise)
            agg.decision = Decision(noisy >= min_replies, noisy)
        elif spec.dp and spec.noise_multiplier > 0:
            raise ValueError(
                "min-replies under DP needs a noisy count (count_noise_multiplier > 0): the "
                "exact count of accepted updates is not private"
            )
        else:  # no DP (nothing to protect), or no noise at all (epsilon is unbounded anyway)
            agg.decision = Decision(agg.accepted >= min_replies)
        return agg.decision

    def _charge(self) -> None:
        spec = self.spec
        if spec.dp:
            self.ledger.record(spec.charged_noise_multiplier, spec.sample_rate)

    def _privacy_metrics(self, agg: RoundAggregator) -> dict[str, float]:
        spec, metrics, decision = self.spec, {}, agg.decision
        if decision is not None and decision.noisy_count is not None:
            metrics["noisy_accepted"] = decision.noisy_count  # DP: accounted with the sum
        if spec.accounted:
            with section("accounting"):  # RDP each round (cached per (q, z)); PLD/PRV at the end
                metrics["epsilon_rdp"] = self.ledger.epsilon(spec.delta, "rdp").epsilon
        return metrics

    def discard_round(self, agg: RoundAggregator, advance: bool) -> dict[str, float]:
        """An attempt with too few accepted replies: its sum is neither applied nor released.

        It is still charged to the ledger at the scheduled q and the full z_eff (conservative:
        only the noisy count was released), so failures never lower the reported epsilon.
        ``advance``: the round counts as run (skipped) rather than about to be retried.
        """
        self._charge()
        if advance:
            self.round += 1
            with warnings.catch_warnings():  # no optimizer step in a discarded round
                warnings.simplefilter("ignore", UserWarning)
                self.schedule.step()
        metrics: dict[str, float] = {
            "round": self.round if advance else self.round + 1,
            "discarded": 1,
        }
        metrics.update(self._privacy_metrics(agg))
        return metrics

    def finish_round(self, agg: RoundAggregator) -> dict[str, float]:
        """Noise, average, optimizer step and accounting for the round just collected.

        Under DP the noisy sum is divided by the expected cohort size q*K and the round is
        recorded in the ledger at the scheduled q, whatever number of clients replied. Without DP
        the sum is divided by the number of accepted replies (plain FedAvg).
        """
        spec = self.spec
        self.round += 1
        total = agg.total
        if total is None:  # nobody replied (or all were rejected): the sum is zero
            total = {n: torch.zeros_like(p) for n, p in self.params.items()}
        if spec.dp:
            with section("noise"):
                # in place: the round's sum is the server's own and is not needed afterwards
                average = self.mechanism.noisy_mean(total, spec.expected_cohort, inplace=True)
            self._charge()
        elif agg.accepted > 0:
            average = {n: t / agg.accepted for n, t in total.items()}
        else:
            average = None
        if average is not None:
            with section("server step"):
                self.optimizer.zero_grad(set_to_none=False)
                for n, p in self.params.items():
                    if n in self.averaged:
                        with torch.no_grad():
                            p.add_(average[n].to(p.dtype))
                    else:
                        # the pseudo-gradient: minus the average delta
                        p.grad = -average[n].to(p.dtype)
                self.optimizer.step()
        self.schedule.step()
        metrics: dict[str, float] = {
            "round": self.round,
            "noise_std_sum": self.mechanism.std if spec.dp else 0.0,
            "noise_std_average": (self.mechanism.std / spec.expected_cohort) if spec.dp else 0.0,
            "server_lr": self.optimizer.param_groups[0]["lr"],
        }
        if average is not None:
            # of the noisy average under DP: post-processing (without DP nothing is private)
            metrics["update_norm"] = math.sqrt(
                sum(float(a.double().pow(2).sum()) for a in average.values())
            )
        metrics.update(self._privacy_metrics(agg))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "round": self.round,
            "weights": self.weights(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ledger": self.ledger.to_dict(),
            "noise_secure": self.noise.secure,
        }
        if not self.noise.secure:
            # Reproducible mode only: the noise state lets a resumed run match an uninterrupted
            # one. In secure mode it is never written to disk.
            state["noise_generator"] = self.noise.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, w in state["weights"].items():
                self.params[n].copy_(w)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.ledger = PrivacyLedger.from_dict(state["ledger"])
        self.round = int(state["round"])
        if not self.noise.secure:
            if "noise_generator" not in state:
                raise ValueError("the checkpoint was written in secure mode: it has no noise state")
            self.noise.set_state(state["noise_generator"])
