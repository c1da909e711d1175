"""A Flower grid answered in process by dpfl's ClientApp body: strategy tests without a
SuperLink."""

from __future__ import annotations

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from dpfl.flower.client_app import handle_train

NODE = 1000
"""The node id of user u is NODE + u."""


class InProcessGrid:
    """A Flower grid whose nodes answer in process: the user query, and train messages run
    through the ClientApp's handler. Keeps every message it was asked to send."""

    def __init__(self, population: int, failing: frozenset[int] = frozenset()) -> None:
        self.population = population
        self.sent: list[Message] = []
        self.failing = failing  # users whose node answers a train message with an error

    def get_node_ids(self):
        return [NODE + u for u in range(self.population)]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            if msg.metadata.message_type == MessageType.QUERY:
                content = RecordDict({"info": ConfigRecord({"partition-id": node - NODE})})
            elif node - NODE in self.failing:
                replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                continue
            else:
                delta, metrics, _ = handle_train(
                    dict(msg.content["config"]),
                    msg.content["arrays"].to_torch_state_dict(),
                    {"partition-id": node - NODE},
                )
                content = RecordDict(
                    {"arrays": ArrayRecord(delta), "metrics": MetricRecord(metrics)}
                )
            replies.append(Message(content=content, reply_to=msg))
        TaskIdentity.node_id = 0
        return replies
