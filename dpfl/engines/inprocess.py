"""The fast in-process simulator: rounds of DP-FedAvg with no serialisation.

One model instance is reused for every client of a cohort; users are looked up lazily from the
federated dataset; each client's work is :func:`dpfl.client.train.local_update` (a pure function of
global weights, data, config and seed), or a whole chunk of the cohort at once
(:mod:`dpfl.client.vectorized`), and the round loop is :class:`dpfl.loop.run.FederatedRun`,
shared with the Flower strategy. Launched by torchrun, the ranks share each cohort
(:mod:`dpfl.engines.torchrun`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from dpfl.client.train import Weights, local_update
from dpfl.client.vectorized import derived_loss_check, train_cohort, why_not
from dpfl.config import RunConfig
from dpfl.engines import torchrun as distributed
from dpfl.loop.layer_shares import LayerShares
from dpfl.loop.run import FederatedRun, client_seed, local_config
from dpfl.privacy.distributed import UpdateRefused, encode_update
from dpfl.privacy.stacked import stacked_norms
from dpfl.profiling import section
from dpfl.server.aggregate import EventLog, RoundAggregator

log = logging.getLogger(__name__)


class SimulatedFailure(RuntimeError):
    """A client failure injected by ``sim-failure-rate``."""


def run_in_process(
    task: Any,
    dataset: Any,
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_round: int | None = None,
) -> tuple[dict[str, Any], FederatedRun]:
    """Train ``task`` on ``dataset`` as ``cfg`` says, in process, writing metrics and a summary
    to ``cfg.run_dir``; return (summary, the finished run). ``resume`` continues from the run
    folder's ``checkpoint.pt`` (a larger ``rounds`` extends the run); ``overwrite`` replaces a
    run the folder holds (refused otherwise); ``stop_after_round`` ends the run early (as if the
    process stopped there), for tests of resumption.
    """
    group = distributed.join(cfg)  # None unless launched by torchrun with several ranks
    run = FederatedRun(
        cfg,
        task,
        dataset,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        primary=group is None or group.primary,
        ranks=1 if group is None else group.size,
        share=None if group is None else group.broadcast_object,
    )
    cfg = run.cfg  # population: the dataset's number of users
    if group is not None:
        if run.private:
            raise ValueError(
                "a distributed simulation cannot keep clients' private parameters or statistics "
                "(a user may train on another rank each round); run it in one process"
            )
        if run.spec.dp:
            run.state.mechanism = distributed.SharedNoise(run.state.mechanism, group)
            if not group.primary:
                run.state.noise.release()  # rank 0 alone draws the noise
    local_cfg = local_config(cfg)
    spec = run.spec
    clip_on_client = spec.clip if spec.dp and spec.clip_location == "client" else None
    if spec.encoding is not None and group is not None:
        raise ValueError(
            "dp-mode = 'distributed' does not run under torchrun yet: run it in one process"
        )

    def send(agg: RoundAggregator, round_number: int, user: int, delta: Weights) -> bool:
        """What leaves a client: its clipped delta (central DP), or (distributed DP) its
        integer encoding with its noise share; False when the update is refused."""
        if spec.encoding is None:
            return agg.add(delta) is None
        try:
            values = encode_update(
                delta,
                spec.encoding,
                spec.rotation_seed,
                round_number,
                user,
                spec.noise_seed,
                agg.noise_nonce,
                reduce=False,
            )
        except UpdateRefused as err:  # above the clip bound, or not finite: never encoded
            agg.reject(str(err))
            return False
        agg.add_encoded(np.mod(values, spec.encoding.modulus), values)
        return True

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

    reason = None
    if cfg.vectorize != "off":
        reason = why_not(run.model, run.task, local_cfg, run.private)
        if reason is None:  # the data's form, and a per-example loss derived from `loss`
            with section("data"):
                probe = run.dataset.user_data(0)
            reason = derived_loss_check(run.model, run.task, probe)
    vectorized = cfg.vectorize == "on" or (cfg.vectorize == "auto" and reason is None)
    if cfg.vectorize == "on" and reason is not None:
        raise ValueError(f"config key vectorize = 'on': cannot vectorise here: {reason}")
    if vectorized:
        log.info("training each cohort vectorised (chunks of %d clients)", cfg.vectorize_chunk)
    else:
        log.info("training clients one by one: %s", reason or "vectorize = 'off'")

    def sequential(round_number: int, users: list[int], weights: Weights, agg, tally) -> None:
        """Train the users one by one and add each accepted delta to ``agg``."""
        for user in users:
            run.load_client(user)
            with section("data"):
                data = run.dataset.user_data(user)
            try:  # local_update times its own phases (batches, weights, steps, clipping)
                res = local_update(
                    run.model,
                    run.task,
                    weights,
                    data,
                    local_cfg,
                    client_seed(cfg.seed, round_number, user),
                    clip_on_client,
                    to_cpu=spec.encoding is not None,  # else summed where it was trained
                )
            except FloatingPointError as err:
                tally.fail(user, round_number, err)
                continue
            run.keep_client(user)  # the client trained (and keeps its state) even if late
            if tally.late(user, res.steps):
                continue
            send(agg, round_number, user, res.delta)
            tally.diagnose(res.train_loss, res.clip_stats)
            if cfg.diagnostics:  # pre-clip tensor norms (the delta's own when unclipped)
                norms = (
                    res.clip_stats.layer_norms
                    if res.clip_stats is not None
                    else [float(torch.linalg.vector_norm(t.double())) for t in res.delta.values()]
                )
                tally.layers({n: t.numel() for n, t in res.delta.items()}, [norms])

    def vectorised(round_number: int, users: list[int], weights: Weights, agg, tally) -> None:
        """Train the users a chunk at a time as one computation; each chunk's clipped deltas
        are checked row by row and summed by the aggregator without leaving the stack."""
        for start in range(0, len(users), cfg.vectorize_chunk):
            chunk = users[start : start + cfg.vectorize_chunk]
            with section("data"):
                many = getattr(run.dataset, "users_data", None)  # a batched fetch, if offered
                datas = many(chunk) if many else [run.dataset.user_data(u) for u in chunk]
            cohort = train_cohort(
                run.model,
                run.task,
                weights,
                datas,
                local_cfg,
                [client_seed(cfg.seed, round_number, u) for u in chunk],
                clip_on_client,
            )
            keep = []
            finite = cohort.finite.tolist()
            st = cohort.clip_stats
            norms = st.norms.tolist() if st is not None else None
            clipped = st.clipped.tolist() if st is not None else None
            for k, user in enumerate(chunk):
                if not finite[k]:
                    tally.fail(user, round_number, "local training diverged: non-finite update")
                    continue
                if tally.late(user, cohort.steps[k]):
                    continue
                keep.append(k)
                if cfg.diagnostics:
                    tally.losses.append(cohort.train_loss[k])
                    if norms is not None:
                        tally.norms.append(norms[k])
                        tally.clipped += int(clipped[k])
            if not keep:
                continue
            if cfg.diagnostics:  # pre-clip tensor norms of the kept rows
                layer = st.layer_norms if st is not None else stacked_norms(cohort.deltas)[1]
                sizes = {n: t[0].numel() for n, t in cohort.deltas.items()}
                tally.layers(sizes, layer[keep].tolist())
            deltas = cohort.deltas
            if spec.encoding is not None:  # each client encodes its own row
                for k in keep:
                    send(agg, round_number, chunk[k], {n: d[k].cpu() for n, d in deltas.items()})
                continue
            if len(keep) < len(chunk):
                at = torch.tensor(keep, device=next(iter(deltas.values())).device)
                deltas = {n: d.index_select(0, at) for n, d in deltas.items()}
            agg.add_stacked(deltas)

    train = vectorised if vectorized else sequential

    def collect(
        round_number: int, cohort: np.ndarray, weights: Weights, agg: RoundAggregator
    ) -> dict[str, Any]:
        weights = {n: w.to(run.device) for n, w in weights.items()}
        tally = _Tally(cfg, slowness, run.name_users, run.state.events)
        users = []
        members = [int(u) for u in cohort]
        if group is not None:  # this rank's share, balanced by data size
            members = group.share(members, [distributed.user_size(run.dataset, u) for u in members])
        for user in members:
            fault = faults(user, round_number)
            if fault == "drop":  # gone mid-round: no reply at all
                tally.dropped += 1
            elif fault == "fail":
                tally.fail(user, round_number, "simulated failure")
            else:
                users.append(user)
        train(round_number, users, weights, agg, tally)
        if group is not None:
            group.sum_round(agg, tally)  # the whole cohort's sum and counts, on every rank
        return tally.metrics()

    if group is None:
        return run.run(collect, stop_after_round=stop_after_round), run
    try:
        summary = run.run(collect, stop_after_round=stop_after_round)
        group.check_same(run.state.weights())
        group.barrier()  # no rank tears the group down while another still talks in it
    finally:
        group.close()
    return summary, run


class _Tally:
    """What a round's clients did, for its metrics: failures, drop-outs, time-outs on the
    simulated clock, and the (non-private) diagnostics when asked for."""

    def __init__(
        self, cfg: RunConfig, slowness, name_users: bool = False, events: EventLog | None = None
    ) -> None:
        """``name_users``: logs may name a failed user (only when the cohorts are not secret:
        a failure in a round tells that the user was sampled); ``events``: how many failures
        are logged (each, or with diagnostics off only the first)."""
        self.cfg, self.slowness, self.name_users = cfg, slowness, name_users
        self.events = events or EventLog()
        self.failed = self.dropped = self.timed_out = self.clipped = 0
        self.finish_times: list[float] = []
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.layer_names: list[str] = []
        self.layer_sizes: list[int] = []
        self.layer_norms: list[list[float]] = []

    def fail(self, user: int, round_number: int, why) -> None:
        self.failed += 1
        if self.name_users:
            self.events.warning(log, "user %d failed in round %d: %s", user, round_number, why)
        else:
            self.events.warning(log, "a sampled client failed in round %d: %s", round_number, why)

    def late(self, user: int, steps: int) -> bool:
        """True when the user's reply misses the round deadline (the server stops waiting)."""
        cfg = self.cfg
        if cfg.sim_step_seconds <= 0:
            return False
        seconds = steps * cfg.sim_step_seconds * self.slowness(user)
        if seconds > cfg.round_timeout:
            self.timed_out += 1
            return True
        self.finish_times.append(seconds)
        return False

    def diagnose(self, loss: float, clip_stats) -> None:
        if self.cfg.diagnostics:
            self.losses.append(loss)
            if clip_stats is not None:
                self.norms.append(clip_stats.norm)
                self.clipped += int(clip_stats.clipped)

    def layers(self, sizes: dict[str, int], rows: list[list[float]]) -> None:
        """Clients' pre-clip tensor norms (one row each, in the order of ``sizes``: tensor name
        -> entries), for the per-layer ratios."""
        if not self.layer_names:
            self.layer_names, self.layer_sizes = list(sizes), list(sizes.values())
        for row in rows:
            by_name = dict(zip(sizes, row, strict=True))
            self.layer_norms.append([by_name[n] for n in self.layer_names])

    _COUNTS = ("failed", "dropped", "timed_out", "clipped")
    _LISTS = ("finish_times", "losses", "norms", "layer_norms")

    def state(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._COUNTS + self._LISTS}
        return {**out, "layer_names": self.layer_names, "layer_sizes": self.layer_sizes}

    def merge(self, states: list[dict[str, Any]]) -> None:
        """Replace this tally by the union of several ranks' tallies."""
        for k in self._COUNTS:
            setattr(self, k, sum(s[k] for s in states))
        for k in self._LISTS:
            setattr(self, k, [x for s in states for x in s[k]])
        named = next((s for s in states if s["layer_names"]), None)
        if named is not None:
            self.layer_names, self.layer_sizes = named["layer_names"], named["layer_sizes"]

    def metrics(self) -> dict[str, Any]:
        """The round's exact counts and per-client statistics: non-private (``diag_*``)."""
        cfg = self.cfg
        extra: dict[str, Any] = {
            "diag_failed": self.failed,
            "diag_dropped": self.dropped,
            "diag_timed_out": self.timed_out,
        }
        if cfg.sim_step_seconds > 0:
            # simulated round time: the last accepted reply, or the deadline if anyone was late
            extra["diag_sim_round_seconds"] = (
                cfg.round_timeout if self.timed_out else max(self.finish_times, default=0.0)
            )
        if cfg.diagnostics:
            finite = [x for x in self.losses if math.isfinite(x)]
            extra["diag_train_loss"] = float(np.mean(finite)) if finite else math.nan
            if self.norms:
                extra["diag_update_norm_mean"] = float(np.mean(self.norms))
                extra["diag_fraction_clipped"] = self.clipped / len(self.norms)
            if self.layer_norms:
                shares = LayerShares(self.layer_names, self.layer_sizes)
                shares.add(self.layer_norms)
                extra.update(shares.metrics())
        return extra
