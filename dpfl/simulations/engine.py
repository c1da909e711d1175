"""The fast in-process simulator: rounds of DP-FedAvg with no serialisation.

One model instance is reused for every client of a cohort; users are looked up lazily from the
federated dataset; each client's work is :func:`dpfl.client.train.local_update` (a pure function of
global weights, data, config and seed) and the round loop is :class:`dpfl.runs.FederatedRun`,
shared with the Flower strategy.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from dpfl.client.train import Weights, local_update
from dpfl.client.vectorized import cohort_updates, why_not
from dpfl.config import RunConfig
from dpfl.runs import FederatedRun, client_seed, local_config
from dpfl.server.round import RoundAggregator

log = logging.getLogger(__name__)


class SimulatedFailure(RuntimeError):
    """A client failure injected by ``sim-failure-rate``."""


def simulate(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_round: int | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` in process, writing metrics and a summary to ``cfg.run_dir``; return the
    summary. ``resume`` continues from the run folder's ``checkpoint.pt``; ``stop_after_round``
    ends the run early (as if the process stopped there), for tests of resumption.
    """
    run = FederatedRun(cfg, resume=resume, progress=progress)
    local_cfg = local_config(cfg)
    spec = run.spec
    clip_on_client = spec.clip if spec.dp and spec.clip_location == "client" else None

    def faults(user: int, round_number: int) -> str | None:
        """Simulated faults, fixed by (seed, round, user): "drop", "fail" or None."""
        if cfg.sim_dropout_rate == 0 and cfg.sim_failure_rate == 0:
            return None
        u = np.random.default_rng([cfg.seed, 11, round_number, user]).random()
        if u < cfg.sim_dropout_rate:
            return "drop"
        if u < cfg.sim_dropout_rate + cfg.sim_failure_rate:
            return "fail"
        return None

    def slowness(user: int) -> float:
        """A user's fixed factor on the simulated clock: exp(N(0, spread^2))."""
        if cfg.sim_speed_spread == 0:
            return 1.0
        z = np.random.default_rng([cfg.seed, 13, user]).standard_normal()
        return float(np.exp(cfg.sim_speed_spread * z))

    reason = why_not(run.model, run.task, local_cfg, run.private)
    vectorized = cfg.vectorize == "on" or (cfg.vectorize == "auto" and reason is None)
    if cfg.vectorize == "on" and reason is not None:
        raise ValueError(f"config key vectorize = 'on': cannot vectorise here: {reason}")
    if vectorized:
        log.info("training each cohort vectorised (chunks of %d clients)", cfg.vectorize_chunk)
    else:
        log.info("training clients one by one: %s", reason or "vectorize = 'off'")

    def trained(round_number: int, users: list[int], weights: Weights):
        """(user, LocalResult or the FloatingPointError of a diverged client), in order."""
        if vectorized:
            for start in range(0, len(users), cfg.vectorize_chunk):
                chunk = users[start : start + cfg.vectorize_chunk]
                results = cohort_updates(
                    run.model,
                    run.task,
                    weights,
                    [run.dataset.user_data(u) for u in chunk],
                    local_cfg,
                    [client_seed(cfg.seed, round_number, u) for u in chunk],
                    clip_on_client,
                )
                yield from zip(chunk, results, strict=True)
            return
        for user in users:
            run.load_client(user)
            try:
                res = local_update(
                    run.model,
                    run.task,
                    weights,
                    run.dataset.user_data(user),
                    local_cfg,
                    client_seed(cfg.seed, round_number, user),
                    clip_on_client,
                )
            except FloatingPointError as err:
                yield user, err
                continue
            yield user, res

    def collect(
        round_number: int, cohort: np.ndarray, weights: Weights, agg: RoundAggregator
    ) -> dict[str, Any]:
        weights = {n: w.to(run.device) for n, w in weights.items()}
        losses, norms, clipped, failed = [], [], 0, 0
        dropped = timed_out = 0
        finish_times: list[float] = []
        users = []
        for user in cohort:
            user = int(user)
            fault = faults(user, round_number)
            if fault == "drop":  # gone mid-round: no reply at all
                dropped += 1
            elif fault == "fail":
                failed += 1
                log.warning("user %d failed in round %d: simulated failure", user, round_number)
            else:
                users.append(user)
        for user, res in trained(round_number, users, weights):
            if isinstance(res, FloatingPointError):
                failed += 1
                log.warning("user %d failed in round %d: %s", user, round_number, res)
                continue
            run.keep_client(user)  # the client trained (and keeps its state) even if late
            if cfg.sim_step_seconds > 0:
                seconds = res.steps * cfg.sim_step_seconds * slowness(user)
                if seconds > cfg.round_timeout:  # the server stopped waiting: reply discarded
                    timed_out += 1
                    continue
                finish_times.append(seconds)
            agg.add(res.delta)  # already on the CPU: what leaves a client
            if cfg.diagnostics:
                losses.append(res.train_loss)
                if res.clip_stats is not None:
                    norms.append(res.clip_stats.norm)
                    clipped += int(res.clip_stats.clipped)
        extra: dict[str, Any] = {"failed": failed, "dropped": dropped, "timed_out": timed_out}
        if cfg.sim_step_seconds > 0:
            # simulated round time: the last accepted reply, or the deadline if anyone was late
            extra["sim_round_seconds"] = (
                cfg.round_timeout if timed_out else max(finish_times, default=0.0)
            )
        if cfg.diagnostics:
            finite = [x for x in losses if math.isfinite(x)]
            extra["diag_train_loss"] = float(np.mean(finite)) if finite else math.nan
            if norms:
                extra["diag_update_norm_mean"] = float(np.mean(norms))
                extra["diag_fraction_clipped"] = clipped / len(norms)
        return extra

    return run.run(collect, stop_after_round=stop_after_round)
