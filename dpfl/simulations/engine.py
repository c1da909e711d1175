"""The fast in-process simulator: rounds of DP-FedAvg with no serialisation.

One model instance is reused for every client of a cohort; users are looked up lazily from the
federated dataset; each client's work is :func:`dpfl.client.train.local_update` (a pure function of
global weights, data, config and seed) and the server's is :class:`dpfl.server.round.ServerState`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.client.train import global_weights, load_weights, local_update
from dpfl.config import RunConfig
from dpfl.runs import (
    RunWriter,
    build_dataset,
    build_task,
    local_config,
    pick_device,
    privacy_statement,
    resolve_noise,
    server_spec,
)
from dpfl.server.round import ServerState, load_checkpoint, save_checkpoint
from dpfl.server.sampling import sample_cohort

log = logging.getLogger(__name__)


def client_seed(seed: int, round_number: int, user: int) -> int:
    """The local-training seed of one user in one round (the same in every way of running)."""
    return int(
        np.random.SeedSequence([int(seed), 11, int(round_number), int(user)]).generate_state(1)[0]
    )


def simulate(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_round: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` in process, writing metrics and a summary to ``run_dir``; return the summary.

    ``resume`` continues from ``run_dir/checkpoint.pt``. ``stop_after_round`` ends the run early
    (as if the process stopped there), for tests of resumption.
    """
    started = time.perf_counter()
    writer = RunWriter(run_dir, resume=resume)
    torch.manual_seed(cfg.seed)  # the initial model
    device = pick_device(cfg)
    task = build_task(cfg)
    dataset = build_dataset(cfg)
    model = task.build_model().to(device)
    test_data = dataset.test_data()
    noise = resolve_noise(cfg)
    spec = server_spec(cfg, noise)
    state = ServerState(global_weights(model), spec, cfg.rounds)
    if resume:
        ckpt = load_checkpoint(writer.checkpoint_path)
        if ckpt["config"] != cfg.to_dict():
            raise ValueError("the run folder's checkpoint was written with a different config")
        state.load_state_dict(ckpt["server"])
        writer.truncate_after(state.round)
        log.info("resumed from round %d", state.round)
    local_cfg = local_config(cfg)
    clip_on_client = spec.clip if spec.dp and spec.clip_location == "client" else None
    writer.write_config(
        cfg,
        {
            "noise_multiplier": noise.noise_multiplier,
            "noise_calibrated": noise.calibrated,
            "delta": spec.delta,
            "device": str(device),
        },
    )

    def evaluate() -> dict[str, float]:
        load_weights(model, state.weights())
        return task.evaluate(model, test_data)

    initial = evaluate() if state.round == 0 else None
    if initial is not None:
        writer.append({"round": 0, **{f"eval_{k}": v for k, v in initial.items()}})
    stopped_for_budget = False
    bar = _progress(progress, cfg.rounds, state.round)
    last_eval: dict[str, float] = initial or {}
    round_times: list[float] = []
    while state.round < cfg.rounds:
        if stop_after_round is not None and state.round >= stop_after_round:
            break
        if cfg.target_epsilon > 0 and spec.accounted:
            ahead = state.ledger.epsilon_after(
                spec.noise_multiplier, spec.sample_rate, 1, spec.delta, cfg.accountant
            )
            if ahead.epsilon > cfg.target_epsilon:
                stopped_for_budget = True
                log.warning(
                    "stopping before round %d: it would bring epsilon to %.4g > target %.4g",
                    state.round + 1,
                    ahead.epsilon,
                    cfg.target_epsilon,
                )
                break
        t0 = time.perf_counter()
        round_number = state.round + 1
        cohort = sample_cohort(
            cfg.population, cfg.sample_rate, cfg.seed, round_number, cfg.sampling
        )
        agg = state.begin_round()
        weights = {n: w.to(device) for n, w in state.weights().items()}
        losses, failed = [], 0
        norms, clipped = [], 0
        for user in cohort:
            try:
                res = local_update(
                    model,
                    task,
                    weights,
                    dataset.user_data(int(user)),
                    local_cfg,
                    client_seed(cfg.seed, round_number, int(user)),
                    clip_on_client,
                )
            except FloatingPointError as err:
                failed += 1
                log.warning("user %d failed in round %d: %s", user, round_number, err)
                continue
            agg.add({n: d.cpu() for n, d in res.delta.items()})
            if cfg.diagnostics:
                losses.append(res.train_loss)
                if res.clip_stats is not None:
                    norms.append(res.clip_stats.norm)
                    clipped += int(res.clip_stats.clipped)
        metrics = state.finish_round(agg)
        metrics["cohort"] = len(cohort)
        metrics["failed"] = failed
        if cfg.diagnostics:
            norms += agg.norms
            clipped += agg.clipped
            metrics["diag_train_loss"] = (
                float(np.mean([x for x in losses if math.isfinite(x)])) if losses else math.nan
            )
            metrics["diag_update_norm_mean"] = float(np.mean(norms)) if norms else math.nan
            metrics["diag_fraction_clipped"] = clipped / len(norms) if norms else math.nan
        if round_number % cfg.eval_every == 0 or round_number == cfg.rounds:
            last_eval = evaluate()
            metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
        round_times.append(time.perf_counter() - t0)
        metrics["seconds"] = round_times[-1]
        writer.append(metrics)
        if on_round is not None:
            on_round(metrics)
        if cfg.checkpoint_every and round_number % cfg.checkpoint_every == 0:
            save_checkpoint(
                writer.checkpoint_path, {"config": cfg.to_dict(), "server": state.state_dict()}
            )
        bar.update(metrics, task.metric)
    bar.close()
    statement = privacy_statement(cfg, spec, state.ledger.segments, state.noise.label, state.round)
    summary = {
        "rounds_run": state.round,
        "stopped_for_budget": stopped_for_budget,
        "metric": task.metric,
        "initial": initial,
        "final": last_eval,
        "privacy": statement,
        "median_round_seconds": float(np.median(round_times)) if round_times else None,
        "wall_seconds": time.perf_counter() - started,
        "device": str(device),
        "diagnostics_note": "diag_* metrics are per-client statistics NOT covered by the DP "
        "guarantee (non-private diagnostics)",
    }
    writer.write_summary(summary)
    return summary


class _progress:
    """A rich progress bar (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.task = self.bar.add_task("rounds", total=total, completed=done, info="")
            self.bar.start()

    def update(self, metrics: dict[str, Any], metric: str) -> None:
        if self.bar is None:
            return
        parts = []
        if f"eval_{metric}" in metrics:
            parts.append(f"{metric} {metrics[f'eval_{metric}']:.4f}")
        if "epsilon" in metrics:
            parts.append(f"eps {metrics['epsilon']:.3g}")
        self.bar.update(self.task, advance=1, info="  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
