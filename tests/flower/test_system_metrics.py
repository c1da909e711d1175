"""The strategy records the clients' device reports (sys-* metrics) per round, from hand-made
replies, and they change nothing in the round's sum."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dpfl.config import RunConfig
from dpfl.flower.strategy import DPFedAvg, summarize_system
from dpfl.privacy.clipping import ClipConfig
from dpfl.server.round import ServerSpec, ServerState


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def round_with(metrics_by_node):
    cfg = RunConfig.from_mapping({"population": 3, "cohort-size": 2.0})
    strategy = DPFedAvg(cfg, user_nodes={0: 100, 1: 101, 2: 102})
    state = ServerState({"w": torch.zeros(3)}, ServerSpec(0.4, 3, ClipConfig(1.0)), 1)
    strategy._cohort, strategy._agg, strategy._extra = np.array([0, 1, 2]), state.begin_round(), {}
    msgs = list(
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({}), None)
    )
    replies = []
    for msg in msgs:
        node = msg.metadata.dst_node_id
        TaskIdentity.node_id = node
        content = {"arrays": ArrayRecord({"w": torch.full((3,), 0.1)})}
        if metrics_by_node.get(node) is not None:
            content["metrics"] = MetricRecord(metrics_by_node[node])
        replies.append(Message(content=RecordDict(content), reply_to=msg))
    strategy.aggregate_train(1, replies)
    return strategy


def test_device_reports_are_recorded_per_round_and_do_not_touch_the_sum():
    sys_metrics = {
        100: {"num-examples": 5, "sys-steps-per-second": 4.0, "sys-peak-memory-mb": 900.0,
              "sys-device-cuda": 1},
        101: {"num-examples": 5, "sys-steps-per-second": 1.0, "sys-peak-memory-mb": 300.5,
              "sys-device-cuda": 0},
        102: None,  # an older client without a report
    }  # fmt: skip
    strategy = round_with(sys_metrics)
    extra = strategy._extra
    assert extra["diag_sys_steps_per_second_min"] == 1.0
    assert extra["diag_sys_steps_per_second_mean"] == 2.5
    assert extra["diag_sys_peak_memory_mb_max"] == 900.0
    assert extra["diag_sys_clients_cuda"] == 1
    assert strategy._agg.accepted == 3
    assert torch.allclose(strategy._agg.total["w"], torch.full((3,), 0.3))
    quiet = round_with({100: {"num-examples": 5}, 101: None, 102: None})
    assert not any(k.startswith("diag_sys_") for k in quiet._extra)
    assert torch.equal(quiet._agg.total["w"], strategy._agg.total["w"])


def test_summaries_of_empty_or_partial_reports():
    assert summarize_system({"sys-steps-per-second": [], "sys-peak-memory-mb": []}) == {}
    summary = summarize_system({"sys-peak-memory-mb": [5.0, 7.0]})
    assert summary == {"diag_sys_peak_memory_mb_max": 7.0}
