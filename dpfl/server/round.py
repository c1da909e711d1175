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
from typing import Any

import torch

from dpfl.models.optimizers import make_optimizer, make_schedule
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.privacy.distributed import (
    boundary_limit,
    check_exact,
    decode,
    near_boundary,
    rotation_signs,
    unflatten,
)
from dpfl.privacy.mechanisms import GaussianMechanism, NoiseSource, noisy_count
from dpfl.profiling import section
from dpfl.server.aggregate import (  # noqa: F401 (re-exported)
    Decision,
    EventLog,
    RoundAggregator,
    ServerSpec,
    Weights,
)
from dpfl.server.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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
        if spec.dp and spec.noise_multiplier > 0 and spec.encoding is None:
            self.noise.reserve(sum(p.numel() for p in self.params.values()))
        self.mechanism = (  # distributed DP: the clients add the noise
            GaussianMechanism(spec.noise_multiplier, spec.clip.clip_norm, self.noise)
            if spec.dp and spec.encoding is None
            else None
        )

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.params.items()}

    def weights(self) -> Weights:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def begin_round(self) -> RoundAggregator:
        agg = RoundAggregator(self.shapes, self.spec, events=self.events)
        if self.spec.encoding is not None and not self.noise.secure:
            agg.noise_nonce = self.noise.nonce()  # the clients' reproducible shares, per attempt
        return agg

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
        if spec.encoding is not None:
            agg.decision = self._check_sum(agg)
        elif min_replies <= 0:
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

    def _check_sum(self, agg: RoundAggregator) -> Decision:
        """Distributed DP: a sum is released only with at least t contributions (its noise is
        then at least the accounted Sk(mu)) and when it shows no sign of a wrap. The simulator
        knows the exact integer sum and raises on any wrap; a deployment sees only the sum
        modulo 2^b and fails the round when more coordinates than the plan expects lie near
        the boundary (a heuristic: under secure aggregation a wrap cannot be detected with
        certainty)."""
        plan = self.spec.encoding
        if agg.accepted < plan.min_contributors:
            return Decision(
                False,
                reason=f"{agg.accepted} contributions < min-contributors {plan.min_contributors}",
            )
        check_exact(agg.modular)  # the simulator's: raises WrapError
        near = near_boundary(agg.modular.total, plan.bits)
        limit = boundary_limit(plan, agg.accepted)
        if near > limit:
            log.error(
                "the sum has %d coordinates near the modular boundary (limit %d): a likely "
                "wrap, the round is failed",
                near,
                limit,
            )
            return Decision(False, reason=f"{near} coordinates near the modular boundary")
        return Decision(True)

    def _charge(self) -> None:
        spec = self.spec
        if spec.dp:
            self.ledger.record(spec.charged_noise_multiplier, spec.sample_rate, 1, *spec.skellam)

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
        if total is not None:  # summed where the clients trained: to the CPU, once per round
            total = {n: t.to("cpu") for n, t in total.items()}
        if total is None and spec.encoding is None:  # nobody replied: the sum is zero
            total = {n: torch.zeros_like(p) for n, p in self.params.items()}
        if spec.encoding is not None:
            with section("noise"):  # the clients' noise is in the sum: decode it
                plan = spec.encoding
                signs = rotation_signs(spec.rotation_seed, self.round, plan.padded)
                flat = decode(agg.modular.total, plan, signs) / spec.expected_cohort
                average = unflatten(flat, self.shapes)
            self._charge()
        elif spec.dp:
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
        std = self._noise_std()
        metrics: dict[str, float] = {
            "round": self.round,
            "noise_std_sum": std,
            "noise_std_average": std / spec.expected_cohort if spec.dp else 0.0,
            "server_lr": self.optimizer.param_groups[0]["lr"],
        }
        if average is not None:
            # of the noisy average under DP: post-processing (without DP nothing is private)
            metrics["update_norm"] = math.sqrt(
                sum(float(a.double().pow(2).sum()) for a in average.values())
            )
        metrics.update(self._privacy_metrics(agg))
        return metrics

    def _noise_std(self) -> float:
        """The noise std per coordinate of the (decoded) sum that the accounting assumes: z*C
        centrally; distributed, that of min-contributors shares (the sum carries at least that;
        what it carries depends on the exact number of contributions, a per-user fact:
        ``diag_noise_std_sum``)."""
        if self.spec.encoding is not None:
            return self.spec.encoding.noise_std_float(self.spec.encoding.min_contributors)
        return self.mechanism.std if self.spec.dp else 0.0

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
