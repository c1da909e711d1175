"""The Flower strategy's message handling, with hand-made messages (no Flower runtime)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dpfl.config import RunConfig
from dpfl.flower.strategy import DPFedAvg
from dpfl.privacy.clipping import ClipConfig
from dpfl.server.round import ServerSpec, ServerState


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
    assert strategy._extra["diag_unreachable"] == 1
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
    assert agg.accepted == 2 and strategy._extra["diag_failed"] == 1
    assert agg.num_rejected == 3
    assert set(agg.rejected) == {
        "reply from an unknown node",
        "a second reply from the same node in one round",
        "w has shape (4,), expected (3,)",
    }
    assert torch.allclose(agg.total["w"], torch.full((3,), 0.3))


class QueryGrid:
    """Answers the user query with each node's claim (no Flower runtime)."""

    def __init__(self, claims):
        self.claims = claims

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, messages, timeout):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            info = ConfigRecord({"partition-id": self.claims[node]})
            out.append(Message(content=RecordDict({"info": info}), reply_to=msg))
        return out


def test_discovery_refuses_out_of_range_claims_and_drops_duplicates(caplog):
    from dpfl.flower.nodes import discover_users

    grid = QueryGrid({10: 0, 11: 1, 12: 1, 13: 7, 14: -1, 15: 2})
    with caplog.at_level("WARNING", logger="dpfl.flower.strategy"):
        users = discover_users(grid, expected=6, timeout=5, population=5)
    assert users == {0: 10, 2: 15}  # 11 and 12 both claim user 1: neither is trusted
    text = caplog.text
    assert "[11, 12] all claim user 1" in text and "outside 0..4" in text


def test_a_node_registry_binds_users_to_authenticated_nodes(tmp_path, caplog):
    from dpfl.flower.nodes import discover_users, load_node_registry

    path = tmp_path / "nodes.toml"
    path.write_text('[nodes]\n"10" = 0\n"11" = 1\n"12" = 2\n')
    registry = load_node_registry(path, population=3)
    assert registry == {10: 0, 11: 1, 12: 2}
    # 13 is not registered; 12 claims a user the registry does not give it
    grid = QueryGrid({10: 0, 11: 1, 12: 0, 13: 2})
    with caplog.at_level("WARNING", logger="dpfl.flower.strategy"):
        users = discover_users(grid, expected=4, timeout=5, population=3, registry=registry)
    assert users == {0: 10, 1: 11}
    assert "node 13 is not in the node registry" in caplog.text
    assert "node 12 claims user 0, but the node registry binds it to user 2" in caplog.text


def test_with_a_registry_discovery_waits_only_for_the_registered_nodes(monkeypatch):
    """A population of 3 with one registered node: nothing more can join, so discovery asks at
    once instead of waiting out the timeout for nodes that would be refused anyway."""
    from dpfl.flower import nodes

    slept = []
    monkeypatch.setattr(nodes.time, "sleep", slept.append)
    grid = QueryGrid({10: 0, 13: 2})  # 13 is connected but not registered
    users = nodes.discover_users(grid, expected=3, timeout=600, population=3, registry={10: 0})
    assert users == {0: 10} and slept == []
    waiting = QueryGrid({13: 2})  # the registered node is not there yet: discovery waits for it
    monkeypatch.setattr(nodes.time, "monotonic", iter(range(0, 10**6, 100)).__next__)
    nodes.discover_users(waiting, expected=3, timeout=600, population=3, registry={10: 0})
    assert len(slept) == 5


@pytest.mark.parametrize(
    "text, match",
    [
        ('[nodes]\n"10" = 5\n', r"integer in \[0, 2\]"),
        ('[nodes]\n"10" = 0\n"11" = 0\n', "bound to two nodes"),
        ("[nodes]\nabc = 0\n", "not a node id"),
        ("[users]\n", r"needs a \[nodes\] table"),
        ("nodes = [", "not valid TOML"),
    ],
)
def test_bad_node_registries_are_refused(tmp_path, text, match):
    from dpfl.flower.nodes import load_node_registry

    path = tmp_path / "nodes.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_node_registry(path, population=3)
    with pytest.raises(ValueError, match="does not exist"):
        load_node_registry(tmp_path / "missing.toml", population=3)


def test_train_messages_carry_no_noise_or_sampling_seed():
    cfg = RunConfig.from_mapping(
        {"population": 2, "cohort-size": 2.0, "noise-seed": 5, "sampling-seed": 6}
    )
    strategy = DPFedAvg(cfg, user_nodes={0: 100, 1: 101})
    sent = []

    class Grid:
        def send_and_receive(self, messages, timeout):
            sent.extend(messages)
            return []

    state = ServerState({"w": torch.zeros(3)}, ServerSpec(1.0, 2, ClipConfig(1.0)), 1)
    TaskIdentity.node_id = 0
    strategy.collector(Grid())(1, np.array([0, 1]), {"w": torch.zeros(3)}, state.begin_round())
    assert len(sent) == 2
    for msg in sent:
        config = dict(msg.content["config"])
        assert "noise-seed" not in config and "sampling-seed" not in config
        assert "node-registry" not in config and config["seed"] == 0


def test_start_honours_flowers_arguments_or_refuses_them(tmp_path):
    """initial_arrays, num_rounds and evaluate_fn change the run; train_config and
    evaluate_config are refused with a TypeError naming them (never silently ignored)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from dpfl.recipes import resolve
    from tests.support.grid import InProcessGrid

    KEYS = {"population": 6, "cohort-size": 3.0, "rounds": 5, "examples-per-user": 5,
            "target-epsilon": 0.0, "noise-multiplier": 0.5}  # fmt: skip

    def strategy(name: str) -> DPFedAvg:
        cfg = RunConfig.from_mapping({**KEYS, "run-dir": str(tmp_path / name)})
        made = resolve(cfg)
        users = {u: 1000 + u for u in range(6)}
        return DPFedAvg(made.cfg, users, task=made.task, dataset=made.dataset)

    for name in ("train_config", "evaluate_config"):
        with pytest.raises(TypeError, match=f"does not take {name}"):
            strategy(name).start(InProcessGrid(6), **{name: ConfigRecord({"lr": 0.1})})

    model = resolve(RunConfig.from_mapping(KEYS)).task.build_model()
    zeros = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append(server_round)
        total = sum(float(t.sum()) for t in arrays.to_torch_state_dict().values())
        return MetricRecord({"weight_sum": total})

    s = strategy("ok")
    result = s.start(InProcessGrid(6), initial_arrays=ArrayRecord(zeros), num_rounds=2,
                     evaluate_fn=evaluate_fn)  # fmt: skip
    assert seen == [0, 1, 2]  # before training, then every evaluation round
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]  # num_rounds replaced rounds = 5
    assert rows[0]["eval_weight_sum"] == 0.0  # the initial arrays were the zeros given
    assert set(result.arrays.to_torch_state_dict()) == set(zeros)


def test_a_node_gone_after_the_refresh_counts_as_unreachable():
    """The SuperLink answers a message to a node that left with NODE_UNAVAILABLE (from itself,
    not the node): the user is unreachable (a dropout), not a rejected update."""
    cfg = RunConfig.from_mapping({"population": 2, "cohort-size": 2.0, "diagnostics": True})
    strategy = DPFedAvg(cfg, user_nodes={0: 100, 1: 101})
    state = ServerState({"w": torch.zeros(3)}, ServerSpec(1.0, 2, ClipConfig(1.0)), 1)
    strategy._cohort, strategy._agg, strategy._extra = np.array([0, 1]), state.begin_round(), {}
    msgs = list(
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({}), None)
    )
    TaskIdentity.node_id = 0  # the SuperLink
    gone = Message(Error(code=5, reason="node unavailable"), reply_to=msgs[1])
    strategy.aggregate_train(1, [reply_from(100, msgs[0], {"w": torch.full((3,), 0.1)}), gone])
    assert strategy._agg.accepted == 1 and strategy._agg.num_rejected == 0
    assert strategy._extra["diag_unreachable"] == 1 and strategy._extra["diag_failed"] == 0
