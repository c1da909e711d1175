"""The Flower strategy's message handling, with hand-made messages (no Flower runtime)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dpfl.config import RunConfig
from dpfl.privacy.clipping import ClipConfig
from dpfl.server.round import ServerSpec, ServerState
from dpfl.server.strategy import DPFedAvg


@pytest.fixture(autouse=True)
def identity():
    # Messages are stamped with the sender's identity; set one as a SuperLink would.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def reply_from(node, request, arrays=None, error=None):
    TaskIdentity.node_id = node
    if error is not None:
        return Message(Error(code=0, reason=error), reply_to=request)
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays)}), reply_to=request)


def test_configure_and_aggregate_train():
    cfg = RunConfig.from_mapping({"population": 5, "cohort-size": 2.0})
    strategy = DPFedAvg(cfg, user_nodes={0: 100, 1: 101, 3: 103, 4: 104})  # user 2 is not connected
    state = ServerState({"w": torch.zeros(3)}, ServerSpec(0.4, 5, ClipConfig(1.0)), 1)
    strategy._cohort, strategy._agg, strategy._extra = (
        np.array([0, 1, 2, 3, 4]),
        state.begin_round(),
        {},
    )
    TaskIdentity.node_id = 0
    msgs = list(
        strategy.configure_train(
            4, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({"seed": 0}), grid=None
        )
    )
    assert [m.metadata.dst_node_id for m in msgs] == [100, 101, 103, 104]
    assert strategy._extra["unreachable"] == 1
    assert msgs[0].content["config"]["server-round"] == 4
    stranger = Message(content=RecordDict(), dst_node_id=999, message_type=MessageType.TRAIN)
    replies = [
        reply_from(103, msgs[2], {"w": torch.full((3,), 0.1)}),
        reply_from(100, msgs[0], {"w": torch.full((3,), 0.2)}),
        reply_from(101, msgs[1], error="client crashed"),
        reply_from(101, msgs[1], {"w": torch.zeros(3)}),  # a second reply
        reply_from(999, stranger, {"w": torch.zeros(3)}),  # unknown node
    ]
    bad = reply_from(104, msgs[3], {"w": torch.zeros(4)})  # wrong shape
    strategy.aggregate_train(4, replies + [bad])
    agg = strategy._agg
    assert agg.accepted == 2 and strategy._extra["failed"] == 1
    assert agg.num_rejected == 3
    assert set(agg.rejected) == {
        "reply from an unknown node",
        "a second reply from the same node in one round",
        "w has shape (4,), expected (3,)",
    }
    assert torch.allclose(agg.total["w"], torch.full((3,), 0.3))
