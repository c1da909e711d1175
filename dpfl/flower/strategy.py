"""DP-FedAvg as a Flower strategy on the Message API.

The strategy only moves messages: ``configure_train`` addresses the users dpfl's sampler drew
(Poisson, from its secret key: only the ServerApp knows a cohort; a node learns only that it is
asked to train) to the nodes that hold them, and ``aggregate_train`` feeds the replies, in user
order, to the same :class:`~dpfl.server.aggregate.RoundAggregator` the simulator uses.
Validation, noise, the server optimizer, accounting, evaluation, checkpoints and the run folder
are :class:`dpfl.loop.run.FederatedRun`'s, shared with the simulator.

``aggregate_train`` returns no arrays: the new global model comes from the server step
(noise + server optimizer), which runs once the round's replies are in.

With ``dp-mode = "distributed"`` a round is a SecAgg+ round instead (:meth:`collect_secure`,
:mod:`dpfl.flower.secagg`): the sampled nodes mask their noised integer encodings and the server
learns only their sum, which the same loop decodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from dpfl.client.train import Weights
from dpfl.config import RunConfig
from dpfl.flower.node_state import CHECKPOINT_ROUND, LINEAGE, RUN_ID, encode_lineage
from dpfl.flower.nodes import (  # noqa: F401 (discover_users, load_node_registry: re-exported)
    NodeDirectory,
    discover_users,
    load_node_registry,
)
from dpfl.flower.secagg import NONCE_KEY, plan_config, ranges, secure_sum
from dpfl.loop.layer_shares import LayerShares
from dpfl.server.aggregate import RoundAggregator

log = logging.getLogger(__name__)

SYSTEM_METRICS = ("sys-steps-per-second", "sys-peak-memory-mb", "sys-device-cuda")
"""What clients report about their device (see :mod:`dpfl.flower.client_app`)."""


def summarize_system(system: dict[str, list[float]]) -> dict[str, float]:
    """Per-round figures of the clients' device reports: the slowest and mean client speed, the
    largest peak memory, and how many clients trained on CUDA (per-client facts, not DP)."""
    out: dict[str, float] = {}
    if speeds := system.get("sys-steps-per-second"):
        out["diag_sys_steps_per_second_min"] = min(speeds)
        out["diag_sys_steps_per_second_mean"] = float(np.mean(speeds))
    if memory := system.get("sys-peak-memory-mb"):
        out["diag_sys_peak_memory_mb_max"] = max(memory)
    if cuda := system.get("sys-device-cuda"):
        out["diag_sys_clients_cuda"] = int(sum(v > 0 for v in cuda))
    return out


QUERY_TIMEOUT = 60.0
"""Seconds to wait, at the start of a round, for nodes that joined to say which user they hold
(one that does not answer in time is asked again next round)."""

SERVER_ONLY_KEYS = frozenset({"noise-seed", "sampling-seed", "node-registry"})
"""Run-config keys that never leave the ServerApp: with them, anyone could recompute the noise
or the cohorts (reproducible mode), or learn the binding of nodes to users."""


class DPFedAvg(Strategy):
    """Flower's side of a dpfl round: cohort messages out, validated updates in."""

    def __init__(
        self,
        cfg: RunConfig,
        user_nodes: dict[int, int],
        *,
        task: Any = None,
        dataset: Any = None,
        overwrite: bool = False,
        resume: bool = False,
        directory: NodeDirectory | None = None,
    ) -> None:
        """``task`` and ``dataset`` follow :mod:`dpfl.api` (``start`` needs both): the server
        uses the task's model and evaluation and the dataset's number of users and test set,
        never users' data. ``directory``: refreshed before every round (nodes that join are
        asked which user they hold, nodes gone are dropped); without it, ``user_nodes`` is
        fixed. Either way the cohort is drawn from the whole population: a sampled user
        without a reachable node is a dropout, and the sum is still scaled as planned."""
        self.cfg = cfg
        self.task, self.dataset = task, dataset
        self.overwrite = overwrite  # replace a run that run-dir already holds
        self.resume = resume  # continue the run that run-dir holds, from its checkpoint
        self.name_users = False  # the run's (public cohorts only) once start() has made it
        self.directory = directory
        self.set_nodes(user_nodes)
        self._cohort: np.ndarray = np.array([], dtype=np.int64)
        self._agg: RoundAggregator | None = None
        self._extra: dict[str, Any] = {}
        self._run: Any = None  # the FederatedRun that start() drives
        self._gone = 0  # this round's sampled users whose node left after the refresh
        self._eval_users: np.ndarray = np.array([], dtype=np.int64)
        self._eval_results: list[tuple[int, dict[str, float]]] = []

    def set_nodes(self, user_nodes: dict[int, int]) -> None:
        self.user_nodes = dict(user_nodes)
        self.node_users = {node: user for user, node in self.user_nodes.items()}

    def refresh_nodes(self, grid: Grid, round_number: int) -> None:
        """Nodes that joined or left since the last round (logged by node id only)."""
        if self.directory is None:
            return
        joined, left = self.directory.refresh(grid, min(self.cfg.round_timeout, QUERY_TIMEOUT))
        self.set_nodes(self.directory.user_nodes)
        for node in joined:
            log.info("round %d: node %d joined", round_number, node)
        for node in left:
            log.info("round %d: node %d is gone (its user is unreachable)", round_number, node)

    # --- the Strategy contract ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages, unreachable = [], 0
        for user in self._cohort:
            node = self.user_nodes.get(int(user))
            if node is None:
                unreachable += 1  # sampled, but no connected node holds this user
                continue
            content = RecordDict(
                {
                    "arrays": arrays,
                    "config": ConfigRecord({**config, "server-round": server_round}),
                }
            )
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        self._extra["diag_unreachable"] = unreachable
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg = self._agg
        failed, losses, norms, clipped = 0, [], [], 0
        shares: LayerShares | None = None
        system: dict[str, list[float]] = {key: [] for key in SYSTEM_METRICS}
        by_user: list[tuple[int, Message]] = []
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            user = self.node_users.get(node)
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                # the SuperLink's answer for a node that left after this round's refresh
                self._gone += 1
                self._extra["diag_unreachable"] = self._extra.get("diag_unreachable", 0) + 1
            elif user is None:
                agg.reject("reply from an unknown node")
            elif node in seen:
                agg.reject("a second reply from the same node in one round")
            elif reply.has_error():
                failed += 1
                if self.name_users:
                    agg.events.warning(
                        log,
                        "user %d failed in round %d: %s",
                        user,
                        server_round,
                        reply.error.reason,
                    )
                else:
                    agg.events.warning(
                        log,
                        "a sampled client failed in round %d: %s",
                        server_round,
                        reply.error.reason,
                    )
            else:
                by_user.append((user, reply))
            seen.add(node)
        # Sum in user order, as the simulator does, so both give the same floats.
        for _user, reply in sorted(by_user, key=lambda pair: pair[0]):
            try:
                update = reply.content["arrays"].to_torch_state_dict()
            except Exception as err:  # a malformed record: reject, never crash the round
                agg.reject(f"unreadable update: {type(err).__name__}")
                continue
            metrics = reply.content.get("metrics")
            if metrics is not None:  # device facts: logged, never part of the privacy maths
                for key, values in system.items():
                    value = metrics.get(key)
                    if isinstance(value, (int, float)) and np.isfinite(value):
                        values.append(float(value))
            if agg.add(update) is not None:
                continue
            if self.cfg.diagnostics and metrics is not None:
                if "diag-train-loss" in metrics:
                    losses.append(float(metrics["diag-train-loss"]))
                if "diag-update-norm" in metrics:
                    norms.append(float(metrics["diag-update-norm"]))
                    clipped += int(metrics.get("diag-clipped", 0))
                layer_norms = metrics.get("diag-layer-norms")
                if isinstance(layer_norms, list) and len(layer_norms) == len(update):
                    if shares is None:
                        shares = LayerShares(list(update), [t.numel() for t in update.values()])
                    shares.add([float(x) for x in layer_norms])
        self._extra["diag_failed"] = failed
        if shares is not None:
            self._extra.update(shares.metrics())
        if self.cfg.diagnostics and losses:
            self._extra["diag_train_loss"] = float(np.mean(losses))
        if self.cfg.diagnostics and norms:
            self._extra["diag_update_norm_mean"] = float(np.mean(norms))
            self._extra["diag_fraction_clipped"] = clipped / len(norms)
        devices = summarize_system(system)
        self._extra.update(devices)
        if devices and self.cfg.diagnostics:
            log.info(
                "round %d devices (non-private diagnostics): %s",
                server_round,
                ", ".join(f"{k} {v:.4g}" for k, v in devices.items()),
            )
        return None, None  # the release is the server step's (noise, optimizer), not Flower's

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: the users the evaluation sampler drew, at their nodes (a user
        without a reachable node is not asked)."""
        messages = []
        for user in self._eval_users:
            node = self.user_nodes.get(int(user))
            if node is None:
                continue
            content = RecordDict(
                {"arrays": arrays, "config": ConfigRecord({**config, "server-round": server_round})}
            )
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The asked users' (examples, metrics); the release (noised or exact) is the run's."""
        asked = {self.user_nodes.get(int(u)) for u in self._eval_users}
        seen: set[int] = set()
        self._eval_results = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked or node in seen or reply.has_error():
                continue  # unknown, a second reply, or a failure: contributes nothing
            seen.add(node)
            metrics = reply.content.get("metrics")
            if metrics is None:
                continue
            n = int(metrics.get("num-examples", 0))
            values = {
                k: float(v)
                for k, v in metrics.items()
                if k != "num-examples" and isinstance(v, (int, float))
            }
            self._eval_results.append((n, values))
        return None

    def summary(self) -> None:
        log.info(
            "dpfl DP-FedAvg: %d users reachable of %d, cohort %g, %d rounds",
            len(self.user_nodes),
            self.cfg.population,
            self.cfg.cohort_size,
            self.cfg.rounds,
        )

    # --- the loop ----------------------------------------------------------------------------

    def run_mark(self, round_number: int) -> dict[str, Any]:
        """What a node needs to keep its own state across a resume (see
        :mod:`dpfl.flower.node_state`): the run's id, its lineage, and the last checkpoint (all
        public: no user, cohort or noise in them). Without checkpoints a node keeps only its
        newest state."""
        run = self._run
        if run is None:
            return {}
        checkpoint = run.checkpointed if self.cfg.checkpoint_every else round_number - 1
        return {
            RUN_ID: run.run_id,
            LINEAGE: encode_lineage(run.lineage),
            CHECKPOINT_ROUND: int(checkpoint),
        }

    def collector(self, grid: Grid) -> Callable[[int, np.ndarray, Weights, RoundAggregator], dict]:
        """The ``collect`` step of :class:`dpfl.loop.run.FederatedRun`, through Flower messages."""
        values = {k: v for k, v in self.cfg.to_dict().items() if k not in SERVER_ONLY_KEYS}

        if self.cfg.distributed:  # the clients' noise: in reproducible mode they need the seed
            values["noise-seed"] = self.cfg.noise_seed

        def collect(round_number, cohort, weights, agg) -> dict[str, Any]:
            self.refresh_nodes(grid, round_number)
            self._cohort, self._agg, self._extra, self._gone = cohort, agg, {}, 0
            if self.cfg.distributed:
                return self.collect_secure(grid, round_number, weights, agg, values)
            train_config = ConfigRecord({**values, **self.run_mark(round_number)})
            messages = list(
                self.configure_train(round_number, ArrayRecord(weights), train_config, grid)
            )
            replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
            self.aggregate_train(round_number, replies)
            self._extra["diag_missing"] = len(messages) - (
                agg.accepted + agg.num_rejected + self._extra.get("diag_failed", 0) + self._gone
            )
            return dict(self._extra)

        return collect

    def collect_secure(
        self, grid: Grid, round_number: int, weights: Weights, agg: RoundAggregator, values: dict
    ) -> dict[str, Any]:
        """Distributed DP: the cohort's nodes run SecAgg+ (:mod:`dpfl.flower.secagg`); the
        server receives masked vectors and learns only the sum of the encodings, noise shares
        included, which it hands to the aggregator with the number of contributions."""
        plan = self._run.spec.encoding
        nodes = [self.user_nodes[int(u)] for u in self._cohort if int(u) in self.user_nodes]
        config = {
            **values,
            **self.run_mark(round_number),
            **plan_config(plan),
            NONCE_KEY: agg.noise_nonce,
            "server-round": round_number,
        }
        total, contributors, failed = secure_sum(
            grid, round_number, nodes, weights, config, plan, self.cfg.round_timeout
        )
        if total is not None:
            agg.set_secure_sum(total, contributors)
        return {
            "diag_unreachable": len(self._cohort) - len(nodes),
            "diag_failed": failed,
            "diag_missing": len(nodes) - contributors - failed if total is not None else 0,
        }

    def eval_collector(self, grid: Grid) -> Callable:
        """The federated evaluation's replies, through Flower messages (EVALUATE)."""
        values = {k: v for k, v in self.cfg.to_dict().items() if k not in SERVER_ONLY_KEYS}

        def collect_eval(round_number, users, weights) -> list[tuple[int, dict[str, float]]]:
            self._eval_users = users
            config = ConfigRecord({**values, **self.run_mark(round_number + 1)})
            messages = list(
                self.configure_evaluate(round_number, ArrayRecord(weights), config, grid)
            )
            replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
            self.aggregate_evaluate(round_number, replies)
            return list(self._eval_results)

        return collect_eval

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable | None = None,
    ) -> Result:
        """Run the rounds. Flower's arguments: ``initial_arrays`` replace the initial model
        (else it is built from the seed and init-model); ``num_rounds`` and ``timeout`` replace
        the config's rounds and round-timeout; ``evaluate_fn(round, arrays) -> MetricRecord``
        adds its metrics (``eval_*``) wherever the run evaluates. ``train_config`` and
        ``evaluate_config`` are refused: the clients' config is the run config, whose privacy
        keys must not vary (federated evaluation is set by its eval-* keys)."""
        from dataclasses import replace

        from dpfl.loop.run import FederatedRun

        if self.task is None or self.dataset is None:
            raise TypeError(
                "DPFedAvg.start needs the task and dataset: DPFedAvg(..., task=, dataset=)"
            )
        for name, value in (("train_config", train_config), ("evaluate_config", evaluate_config)):
            if value is not None:
                raise TypeError(
                    f"DPFedAvg.start does not take {name}: every client receives the run "
                    "config (set its keys there)"
                )
        if num_rounds is not None:
            self.cfg = replace(self.cfg, rounds=int(num_rounds))
        if timeout is not None:
            self.cfg = replace(self.cfg, round_timeout=float(timeout))
        extra_eval = None
        if evaluate_fn is not None:

            def extra_eval(round_number: int, weights: Weights) -> dict[str, float]:
                record = evaluate_fn(round_number, ArrayRecord(weights))
                return {k: float(v) for k, v in (record or {}).items()}

        self.summary()
        run = FederatedRun(
            self.cfg,
            self.task,
            self.dataset,
            progress=False,
            overwrite=self.overwrite,
            resume=self.resume,
            initial_weights=(
                initial_arrays.to_torch_state_dict() if initial_arrays is not None else None
            ),
            extra_eval=extra_eval,
        )
        self.cfg = run.cfg
        self.name_users = run.name_users
        self._run = run
        if run.spec.encoding is not None:  # SecAgg+'s masks must hold the largest cohort's sum
            try:
                ranges(run.spec.encoding.bits, run.spec.encoding.max_cohort)
            except ValueError:
                run.writer.close()
                raise
        summary = run.run(self.collector(grid), collect_eval=self.eval_collector(grid))
        result = Result()
        result.arrays = ArrayRecord(run.state.weights())
        result.evaluate_metrics_serverapp = {
            summary["rounds_run"]: MetricRecord(
                {k: float(v) for k, v in (summary["final"] or {}).items()}
            )
        }
        return result
