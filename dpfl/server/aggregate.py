"""One round's updates on the server: the settings of the server step (:class:`ServerSpec`), the
validating running sum (:class:`RoundAggregator`) and the apply-or-discard decision."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from dpfl.models.optimizers import OptimizerOptions, ScheduleOptions
from dpfl.privacy.clipping import ClipConfig, clip_update, norm_violation
from dpfl.privacy.distributed import EncodingPlan, ModularSum
from dpfl.privacy.mechanisms import effective_noise_multiplier
from dpfl.privacy.stacked import (
    check_stacked,
    clip_stacked,
    non_finite_reason,
    stacked_norms,
    stacked_violations,
)
from dpfl.privacy.updates import l2_norms
from dpfl.profiling import section

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
    encoding: EncodingPlan | None = None
    """Distributed DP: the clients' integer encoding (noise added by them); None: central."""
    rotation_seed: int = 0
    """Distributed DP: the public seed of every round's random rotation (the run's seed)."""

    @property
    def skellam(self) -> tuple[float, float]:
        """(Delta_2, Delta_1) of the Skellam mechanism the rounds are charged as (distributed
        DP), or (0, 0): the Gaussian."""
        if self.encoding is None:
            return (0.0, 0.0)
        return (self.encoding.l2, self.encoding.l1)

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
    modular: ModularSum | None = None
    """Distributed DP: the sum of the clients' encodings modulo 2^b (``total`` stays None)."""
    noise_nonce: int = 0
    """Distributed DP, reproducible mode: this attempt's key for the clients' noise shares."""

    def add_encoded(self, encoded, unreduced=None) -> None:
        """Add one client's encoding (int64 modulo 2^b, its noise share in it), as secure
        aggregation adds it: nothing about it can be checked here. ``unreduced`` (the
        simulator's): the same before the reduction, so that a wrap is detected exactly."""
        if self.spec.encoding is None:
            raise RuntimeError("an encoded update in a central-DP round")
        with section("aggregation"):
            if self.modular is None:
                self.modular = ModularSum(self.spec.encoding, exact=unreduced is not None)
            self.modular.add(encoded, unreduced)
            self.accepted += 1

    def set_secure_sum(self, total, contributors: int) -> None:
        """The sum modulo 2^b that secure aggregation computed over ``contributors`` clients."""
        if self.spec.encoding is None:
            raise RuntimeError("a secure sum in a central-DP round")
        self.modular = ModularSum(self.spec.encoding)
        self.modular.total = total
        self.modular.count = contributors
        self.accepted = contributors

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
            l2_norms(list(update.values()), list(update))  # finite values
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
                names = list(self.total)
                dst, src = [self.total[n] for n in names], [update[n] for n in names]
                if all(a.device == b.device for a, b in zip(dst, src, strict=True)):
                    torch._foreach_add_(dst, src)
                else:
                    for a, b in zip(dst, src, strict=True):
                        a.add_(b.to(a.device))
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
            sums = {n: t.detach().sum(0) for n, t in stacked.items()}  # on their device
            if self.total is None:
                self.total = {n: sums[n] for n in self.shapes}
            else:
                for n, t in sums.items():
                    self.total[n].add_(t.to(self.total[n].device))
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
        if self.spec.encoding is not None and self.accepted:
            # the noise the sum actually carries: one share per contribution
            out["diag_noise_std_sum"] = self.spec.encoding.noise_std_float(self.accepted)
        return out


@dataclass(frozen=True)
class Decision:
    """Whether an attempt's sum is applied, and the noisy count it was decided on."""

    apply: bool
    noisy_count: float | None = None
    """The accepted count plus N(0, z_c^2) (DP runs with min-replies); None otherwise."""
    reason: str | None = None
    """Why an attempt is not applied, when it is not min-replies (distributed DP's checks)."""
