"""DP-FedAvg as a Flower strategy on the Message API.

The strategy only moves messages: ``configure_train`` addresses the users dpfl's sampler drew
(Poisson, from user ids and the seed) to the nodes that hold them, and ``aggregate_train`` feeds
the replies, in user order, to the same :class:`~dpfl.server.round.RoundAggregator` the simulator
uses. Validation, noise, the server optimizer, accounting, evaluation, checkpoints and the run
folder are :class:`dpfl.runs.FederatedRun`'s, shared with the simulator.

``aggregate_train`` returns no arrays: the new global model comes from the server step
(noise + server optimizer), which runs once the round's replies are in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from dpfl.client.train import Weights
from dpfl.config import RunConfig
from dpfl.server.round import RoundAggregator

log = logging.getLogger(__name__)

USER_KEY = "partition-id"
"""The node_config key naming the user whose data a node holds."""


def discover_users(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """Map user id -> node id by asking every node which user it holds (a QUERY message).

    Waits up to ``timeout`` seconds for ``expected`` nodes to connect, then asks them all.
    """
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < expected:
        log.warning("only %d of %d expected nodes connected", len(node_ids), expected)
    messages = [
        Message(
            content=RecordDict({"query": ConfigRecord({"what": USER_KEY})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    users: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say which user it holds: %s", node, reply.error.reason)
            continue
        user = int(reply.content["info"][USER_KEY])
        if user in users:
            raise ValueError(f"two nodes ({users[user]} and {node}) claim user {user}")
        users[user] = node
    return users


SYSTEM_METRICS = ("sys-steps-per-second", "sys-peak-memory-mb", "sys-device-cuda")
"""What clients report about their device (see :mod:`dpfl.client.app`)."""


def summarize_system(system: dict[str, list[float]]) -> dict[str, float]:
    """Per-round figures of the clients' device reports: the slowest and mean client speed, the
    largest peak memory, and how many clients trained on CUDA (per-client facts, not DP)."""
    out: dict[str, float] = {}
    if speeds := system.get("sys-steps-per-second"):
        out["sys_steps_per_second_min"] = min(speeds)
        out["sys_steps_per_second_mean"] = float(np.mean(speeds))
    if memory := system.get("sys-peak-memory-mb"):
        out["sys_peak_memory_mb_max"] = max(memory)
    if cuda := system.get("sys-device-cuda"):
        out["sys_clients_cuda"] = int(sum(v > 0 for v in cuda))
    return out


class DPFedAvg(Strategy):
    """Flower's side of a dpfl round: cohort messages out, validated updates in."""

    def __init__(self, cfg: RunConfig, user_nodes: dict[int, int]) -> None:
        self.cfg = cfg
        self.user_nodes = user_nodes
        self.node_users = {node: user for user, node in user_nodes.items()}
        self._cohort: np.ndarray = np.array([], dtype=np.int64)
        self._agg: RoundAggregator | None = None
        self._extra: dict[str, Any] = {}

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
        self._extra["unreachable"] = unreachable
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg = self._agg
        failed, losses, norms, clipped = 0, [], [], 0
        system: dict[str, list[float]] = {key: [] for key in SYSTEM_METRICS}
        by_user: list[tuple[int, Message]] = []
        seen: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            user = self.node_users.get(node)
            if user is None:
                agg.reject("reply from an unknown node")
            elif node in seen:
                agg.reject("a second reply from the same node in one round")
            elif reply.has_error():
                failed += 1
                log.warning(
                    "user %d failed in round %d: %s", user, server_round, reply.error.reason
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
        self._extra["failed"] = failed
        if self.cfg.diagnostics and losses:
            self._extra["diag_train_loss"] = float(np.mean(losses))
        if self.cfg.diagnostics and norms:
            self._extra["diag_update_norm_mean"] = float(np.mean(norms))
            self._extra["diag_fraction_clipped"] = clipped / len(norms)
        devices = summarize_system(system)
        self._extra.update(devices)
        if devices:
            log.info(
                "round %d devices: %s",
                server_round,
                ", ".join(f"{k} {v:.4g}" for k, v in devices.items()),
            )
        return None, MetricRecord({"accepted": agg.accepted, "rejected": agg.num_rejected})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is central, on the server's test set

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
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

    def collector(self, grid: Grid) -> Callable[[int, np.ndarray, Weights, RoundAggregator], dict]:
        """The ``collect`` step of :class:`dpfl.runs.FederatedRun`, through Flower messages."""
        train_config = ConfigRecord(self.cfg.to_dict())

        def collect(round_number, cohort, weights, agg) -> dict[str, Any]:
            self._cohort, self._agg, self._extra = cohort, agg, {}
            messages = list(
                self.configure_train(round_number, ArrayRecord(weights), train_config, grid)
            )
            replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
            self.aggregate_train(round_number, replies)
            self._extra["missing"] = len(messages) - (
                agg.accepted + agg.num_rejected + self._extra.get("failed", 0)
            )
            return dict(self._extra)

        return collect

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
        """Run the configured rounds (the arguments of Flower's ``start`` come from the config:
        the initial model is built from the seed, rounds and timeout are config keys)."""
        from dpfl.runs import FederatedRun

        self.summary()
        run = FederatedRun(self.cfg, progress=False)
        summary = run.run(self.collector(grid))
        result = Result()
        result.arrays = ArrayRecord(run.state.weights())
        result.evaluate_metrics_serverapp = {
            summary["rounds_run"]: MetricRecord(
                {k: float(v) for k, v in (summary["final"] or {}).items()}
            )
        }
        return result
