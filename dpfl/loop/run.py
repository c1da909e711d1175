"""The round loop every way of running shares, over objects: a task, a federated dataset and
the run config (DP, local and server settings, the run folder).

The in-process simulator and the Flower strategy both drive :class:`FederatedRun`; only how a
round's updates are collected differs, so a run reads the same whichever way it was started.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.api import hook
from dpfl.client.train import (
    Weights,
    federated_split,
    global_weights,
    load_weights,
    private_weights,
)
from dpfl.config import RunConfig
from dpfl.loop.fed_eval import (
    EvalPlan,
    evaluate_users,
    evaluation_statement,
    federated_evaluation,
    resolve_eval,
)
from dpfl.loop.measure import budget_ahead, central_evaluation, epsilon_metrics
from dpfl.loop.plan import NoisePlan, privacy_statement, resolve_noise, server_spec
from dpfl.loop.progress import Progress
from dpfl.loop.resume import CHECKPOINT_FORMAT, read_checkpoint, resume_run
from dpfl.loop.setup import (  # noqa: F401 (client_seed, local_config: the engines' too)
    client_seed,
    load_model_file,
    local_config,
    pick_device,
    with_population,
)
from dpfl.loop.writer import CLIENT_STATE, RunWriter
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.profiling import round_done, section
from dpfl.server.round import (
    EventLog,
    RoundAggregator,
    ServerState,
    save_checkpoint,
)
from dpfl.server.sampling import CohortSampler

log = logging.getLogger(__name__)


# Collects one attempt's updates into the aggregator; returns its non-private diagnostics
# (``diag_*`` keys only: exact counts, per-client statistics), recorded only with diagnostics on.
Collect = Callable[[int, np.ndarray, Weights, RoundAggregator], dict[str, Any]]
# Rank 0's value of an object on every rank (torchrun); the identity in one process.
Share = Callable[[Any], Any]


def _alone(value: Any) -> Any:
    return value


class FederatedRun:
    """The loop every way of running shares: budget check before every attempt, secret cohort,
    collect, noisy decision, server step, evaluation, metrics, checkpoints, summary. Only
    ``collect`` differs: in process (the simulator) or through Flower messages (the strategy)."""

    def __init__(
        self,
        cfg: RunConfig,
        task: Any,
        dataset: Any,
        *,
        resume: bool = False,
        progress: bool = True,
        primary: bool = True,
        ranks: int = 1,
        share: Share | None = None,
        overwrite: bool = False,
        initial_weights: Weights | None = None,
        extra_eval: Callable[[int, Weights], dict[str, float]] | None = None,
    ) -> None:
        """``task`` and ``dataset`` follow :mod:`dpfl.api`; ``cfg``'s population is the
        dataset's number of users (0 there means exactly that).

        ``resume``: continue from the run folder's checkpoint (only ``rounds`` may differ from
        its config: an extension); ``overwrite``: replace the run the folder holds (a new run
        refuses such a folder). ``primary = False``: another rank of a distributed simulation
        (of ``ranks``), which runs the rounds but neither evaluates nor writes the run folder;
        ``share`` gives every rank rank 0's cohorts, decisions and ledger. ``initial_weights``
        (by name) replace the initial model's; ``extra_eval(round, weights)`` adds metrics
        wherever the run evaluates."""
        self.started = time.perf_counter()
        self.ranks = ranks
        cfg = with_population(cfg, dataset.num_users)
        self.cfg = cfg
        self.primary = primary
        self.share = share or _alone
        self.writer = RunWriter(cfg.run_dir, resume=resume, enabled=primary, overwrite=overwrite)
        try:  # a run that fails to start releases its folder
            # On resume: the checkpoint, checked against this config before anything is built.
            self.prior = self._read_checkpoint() if resume else None
            torch.manual_seed(cfg.seed)  # the initial model
            self.device = pick_device(cfg)
            self.task = task
            self.dataset = dataset
            self.model = self.task.build_model().to(self.device)
            if cfg.init_model:
                load_model_file(self.model, cfg.init_model)
            if initial_weights is not None:
                load_weights(self.model, initial_weights)
            self.extra_eval = extra_eval
            self.test_data = self.dataset.test_data()
            # Parameters a task keeps on the client (scene-specific, FedBN-style) are never sent:
            # the server holds the others; each client's private ones live in a store that costs
            # nothing for clients never sampled.
            # Running statistics of norm layers stay there too with norm-stats = "client"; with
            # "server" they are sent with the update and the server averages them (no optimizer).
            self.private, self.buffers = federated_split(self.task, self.model, cfg.norm_stats)
            self.initial_private = (
                private_weights(self.model, self.private, self.buffers) if self.private else {}
            )
            self.private_store: dict[int, Weights] = {}
            self.eval_uses_private = False
            sent = global_weights(self.model, self.private, self.buffers)
            # A resumed run keeps the noise it started with: an extension of its rounds is never
            # recalibrated (that would spend the old rounds' budget again at a lower noise).
            self.noise = (
                NoisePlan(**self.prior["noise"])
                if self.prior is not None and "noise" in self.prior
                else resolve_noise(cfg, sum(t.numel() for t in sent.values()))
            )
            self.rounds_planned: list[int] = (
                list(self.prior.get("rounds_planned", [self.prior["config"]["rounds"]]))
                if self.prior is not None
                else [cfg.rounds]
            )
            if self.rounds_planned[-1] != cfg.rounds:
                self.rounds_planned.append(cfg.rounds)
            self.initial: dict[str, float] | None = (
                self.prior.get("initial") if self.prior is not None else None
            )
            # A test set drawn from the federated users' own data (held-out utterances).
            self.eval_on_user_data = bool(hook(self.dataset, "test_from_users", False))
            self.spec = server_spec(cfg, self.noise)
            # Cohorts come from their own secret key (never from `seed`), or from sampling-seed.
            self.sampler = (
                CohortSampler.secret()
                if cfg.sampling_seed < 0
                else CohortSampler.from_seed(cfg.sampling_seed)
            )
            # Federated evaluation: its own plan (kept on resume, like the noise), its own
            # secret sampler, its charges in the ledger and, apart, in eval_ledger.
            self.eval_plan = (
                EvalPlan(**self.prior["eval_plan"])
                if self.prior is not None and "eval_plan" in self.prior
                else resolve_eval(cfg, task, self.noise.effective, self.noise.calibrated)
            )
            if self.eval_plan.mode != "off" and ranks > 1:
                raise ValueError(
                    "federated evaluation (eval-cohort-size > 0) does not run under torchrun "
                    "yet: run it in one process or under Flower"
                )
            self.eval_sampler = (
                CohortSampler.secret()
                if cfg.sampling_seed < 0
                else CohortSampler.from_seed(cfg.sampling_seed, "eval-sampling")
            )
            self.eval_ledger = PrivacyLedger()
            self.state = ServerState(
                sent, self.spec, cfg.rounds, averaged=frozenset(self.buffers) & set(sent)
            )
            self.state.events = EventLog(each=cfg.diagnostics)
            # Which start of the run (incarnation) produced which rounds: rounds first..next-1 of a
            # segment (incarnation, first); a resume truncates it at the checkpoint. Nodes keep
            # their own state per round and use only what this lineage says survived (Flower).
            self.run_id: str = (
                self.prior.get("run_id") if self.prior is not None else None
            ) or secrets.token_hex(8)
            self.lineage: list[tuple[str, int]] = []
            if resume:
                self._resume()
                self.lineage = [
                    (inc, first)
                    for inc, first in self.prior.get("lineage", [])
                    if first <= self.state.round
                ]
            self.lineage.append((secrets.token_hex(4), self.state.round + 1))
            self.checkpointed = self.state.round if resume else -1
            self.progress = progress and primary
            self.writer.write_config(
                cfg,
                {
                    "noise_multiplier": self.noise.noise_multiplier,
                    "count_noise_multiplier": self.noise.count_noise_multiplier,
                    "charged_noise_multiplier": self.noise.effective,
                    "noise_calibrated": self.noise.calibrated,
                    "rounds_planned": self.rounds_planned,
                    "delta": self.spec.delta,
                    "device": str(self.device),
                    **({"encoding": self.noise.encoding} if self.noise.encoding else {}),
                },
            )
        except BaseException:
            self.writer.close()
            raise

    @property
    def name_users(self) -> bool:
        """Whether logs may name the users of a round: only when the cohorts are not secret."""
        return not self.sampler.secure

    def _read_checkpoint(self) -> dict[str, Any]:
        return read_checkpoint(self.cfg, self.writer.checkpoint_path)

    def _resume(self) -> None:
        resume_run(self)

    def evaluate(self) -> dict[str, float]:
        if not self.primary:
            return {}
        values = central_evaluation(self)
        if self.extra_eval is not None:
            values = {**values, **self.extra_eval(self.state.round, self.state.weights())}
        return values

    def _eval_metrics(self, values: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {f"eval_{k}": v for k, v in values.items()}
        if values and (self.eval_uses_private or self.eval_on_user_data):
            out["eval_non_private"] = 1  # computed with per-user private state: a diagnostic
        return out

    def load_client(self, user: int) -> None:
        """Put ``user``'s private parameters into the workspace model (first time: fresh)."""
        if not self.private:
            return
        stored = self.private_store.get(user)
        load_weights(self.model, stored if stored is not None else self.initial_private)
        prepare = hook(self.task, "prepare_private")
        if stored is None and prepare is not None:
            prepare(self.model, self.dataset.user_data(user))

    def keep_client(self, user: int) -> None:
        if self.private:
            self.private_store[user] = private_weights(self.model, self.private, self.buffers)

    def _attempts(self, round_number: int, collect: Collect) -> dict[str, Any] | None:
        """Run round ``round_number`` (retrying as configured); its metrics, or None when the
        budget does not allow another attempt."""
        cfg, state = self.cfg, self.state
        attempt = 0
        while True:
            ahead = budget_ahead(self)  # before EVERY attempt: a retry is charged too
            if ahead is not None and ahead.epsilon > cfg.target_epsilon:
                log.warning(
                    "stopping before round %d%s: it would bring epsilon to %.4g > target %.4g",
                    round_number,
                    f" (attempt {attempt + 1})" if attempt else "",
                    ahead.epsilon,
                    cfg.target_epsilon,
                )
                return None
            with section("sampling"):
                cohort = self.share(
                    self.sampler.cohort(
                        cfg.population, cfg.sample_rate, round_number, attempt, cfg.sampling
                    )
                    if self.primary
                    else None
                )
            agg = state.begin_round()
            extra = collect(round_number, cohort, state.weights(), agg)
            unlabelled = [k for k in extra if not k.startswith("diag_")]
            if unlabelled:
                raise RuntimeError(f"collect returned unlabelled per-client values: {unlabelled}")
            diagnostics: dict[str, Any] = {}
            if cfg.diagnostics:
                diagnostics = {**agg.diagnostics(), "diag_cohort": len(cohort), **extra}
                if agg.norms:  # server-side clipping stats
                    diagnostics.setdefault("diag_update_norm_mean", float(np.mean(agg.norms)))
                    diagnostics.setdefault("diag_fraction_clipped", agg.clipped / len(agg.norms))
            # rank 0's decision on every rank (drawn once)
            agg.decision = self.share(state.decide(agg, cfg.min_replies) if self.primary else None)
            decision = agg.decision
            if decision.apply:
                metrics = state.finish_round(agg)
                self._journal(round_number, attempt)
                break
            give_up = cfg.on_too_few == "skip" or attempt >= cfg.max_retries
            why = decision.reason or (
                f"too few accepted replies for min-replies {cfg.min_replies}"
                + (
                    ""
                    if decision.noisy_count is None
                    else f" (noisy count {decision.noisy_count:.1f})"
                )
            )
            log.warning(
                "round %d: %s: %s (charged)",
                round_number,
                why,
                "skipped" if give_up else "retrying",
            )
            metrics = state.discard_round(agg, advance=give_up)
            self._journal(round_number, attempt)
            epsilon_metrics(self, metrics, ahead, last=False)
            if give_up:
                break
            self.writer.append({**metrics, **diagnostics, "retry": 1})
            attempt += 1
        metrics["attempts"] = attempt + 1  # post-processing of noisy counts: public
        epsilon_metrics(self, metrics, ahead, last=round_number == cfg.rounds)
        metrics.update(diagnostics)
        return metrics

    def _journal(self, round_number: int, attempt: int) -> None:
        if self.spec.dp and self.primary:
            spec = self.spec
            self.writer.record_charge(
                round_number, attempt, spec.charged_noise_multiplier, spec.sample_rate
            )

    def _checkpoint(self) -> None:
        cfg, state = self.cfg, self.state
        save_checkpoint(
            self.writer.checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(),
                "server": state.state_dict(),
                "noise": dataclasses.asdict(self.noise),
                "initial": self.initial,
                "rounds_planned": self.rounds_planned,
                "run_id": self.run_id,
                "lineage": self.lineage,
                "eval_plan": dataclasses.asdict(self.eval_plan),
                "eval_ledger": self.eval_ledger.to_dict(),
            },
        )
        self.checkpointed = state.round
        if self.private:
            path = Path(cfg.run_dir) / CLIENT_STATE
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, self.private_store)

    def run(
        self,
        collect: Collect,
        *,
        stop_after_round: int | None = None,
        collect_eval: Callable | None = None,
    ) -> dict[str, Any]:
        """Run the remaining rounds; ``stop_after_round`` ends early, as if the process stopped.
        ``collect_eval(round, users, weights) -> [(examples, metrics), ...]``: the federated
        evaluation's replies (default: in process, from the dataset's ``user_test_data``).
        The run folder is released at the end, whatever happens."""
        try:
            if self.eval_plan.mode != "off" and collect_eval is None:
                if hook(self.dataset, "user_test_data") is None:
                    raise ValueError(
                        "federated evaluation (eval-cohort-size > 0) needs users' held-out "
                        "data: the dataset has no user_test_data"
                    )
                collect_eval = self._evaluate_users
            return self._rounds(collect, stop_after_round, collect_eval)
        finally:
            self.writer.close()

    def _evaluate_users(self, round_number: int, users, weights: Weights):
        return evaluate_users(self, users, weights)

    def _rounds(self, collect: Collect, stop_after_round, collect_eval) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        if state.round == 0:
            self.initial = self.evaluate()
            self.writer.append({"round": 0, **self._eval_metrics(self.initial)})
        if self.initial is None and state.round > 0:
            self.initial = self.writer.initial_eval()  # a checkpoint from an older dpfl
        initial = self.initial  # a resumed run keeps the first run's
        last_eval: dict[str, float] = initial or {}
        stopped_for_budget = crashed = False
        round_times: list[float] = []
        bar = Progress(self.progress, cfg.rounds, state.round)
        try:
            while state.round < cfg.rounds:
                if stop_after_round is not None and state.round >= stop_after_round:
                    crashed = True  # as if the process stopped here: no final checkpoint
                    break
                t0 = time.perf_counter()
                round_number = state.round + 1
                metrics = self._attempts(round_number, collect)
                if metrics is None:
                    stopped_for_budget = True
                    break
                if round_number % cfg.eval_every == 0 or round_number == cfg.rounds:
                    with section("evaluation"):
                        last_eval = self.evaluate()
                    metrics.update(self._eval_metrics(last_eval))
                    if self.eval_plan.mode != "off":
                        with section("evaluation"):
                            metrics.update(federated_evaluation(self, round_number, collect_eval))
                with section("metrics"):
                    round_times.append(time.perf_counter() - t0)
                    metrics["seconds"] = round_times[-1]
                    self.writer.append(metrics)
                    checkpoint = cfg.checkpoint_every and round_number % cfg.checkpoint_every == 0
                    if checkpoint and self.primary:
                        self._checkpoint()
                    bar.update(metrics, self.task.metric)
                round_done(time.perf_counter() - t0)
        finally:
            bar.close()
        if (
            cfg.checkpoint_every
            and self.primary
            and not crashed
            and self.checkpointed != state.round
        ):
            self._checkpoint()  # the end too, so a finished run can be extended
        statement = privacy_statement(
            cfg,
            self.spec,
            state.ledger.segments,
            state.noise.label,
            state.round,
            self.sampler.label,
            rounds_planned=self.rounds_planned,
        )
        evaluation_statement(self, statement)
        summary = {
            "rounds_run": state.round,
            "stopped_for_budget": stopped_for_budget,
            "metric": self.task.metric,
            "initial": initial,
            "final": last_eval,
            "privacy": statement,
            "median_round_seconds": float(np.median(round_times)) if round_times else None,
            "wall_seconds": time.perf_counter() - self.started,
            "device": str(self.device),
            "ranks": self.ranks,
            "diagnostics_note": "diag_* metrics are exact counts and per-client statistics NOT "
            "covered by the DP guarantee (non-private diagnostics; off unless diagnostics = "
            "true)",
        }
        if self.eval_uses_private:
            summary["evaluation_note"] = (
                "eval_* metrics were computed with per-user private state (client-kept "
                "parameters or statistics trained on un-noised user data): non-private "
                "diagnostics, not covered by the DP guarantee"
            )
        elif self.eval_on_user_data:
            summary["evaluation_note"] = (
                "eval_* metrics were computed on utterances held out of the federated users' "
                "own data (test-split = 'utterance'): non-private diagnostics, not covered by "
                "the DP guarantee (test-split = 'speaker' keeps users' data out of the test set)"
            )
        self.writer.write_summary(summary)
        self.writer.write_model(state.weights())
        return summary
