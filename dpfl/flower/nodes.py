"""Which node holds which user: a deployment's node registry (authenticated node id -> user) and
the discovery of users by asking every connected node."""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

USER_KEY = "partition-id"
"""The node_config key naming the user whose data a node holds."""


def load_node_registry(path: str | Path, population: int) -> dict[int, int]:
    """An operator-written registry binding SuperNode ids to user ids: node id -> user.

    A TOML file with one table, ``[nodes]``, of ``"<node id>" = <user id>`` (the node id that
    ``flower-supernode`` logs as "SuperNode ID" once its key is registered with ``flwr supernode
    register``). Every user id must be in ``0 .. population - 1`` and bound to one node.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config key node-registry: {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config key node-registry: {path} is not valid TOML: {err}") from None
    table = data.get("nodes")
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f'config key node-registry: {path} needs a [nodes] table of "<node id>" = <user id>'
        )
    registry: dict[int, int] = {}
    owner: dict[int, int] = {}
    for key, user in table.items():
        if not str(key).isdigit():
            raise ValueError(f"node registry {path}: {key!r} is not a node id (digits)")
        if isinstance(user, bool) or not isinstance(user, int) or not 0 <= user < population:
            raise ValueError(
                f"node registry {path}: node {key} -> {user!r}: a user id must be an integer "
                f"in [0, {population - 1}] (population = {population})"
            )
        if user in owner:
            raise ValueError(
                f"node registry {path}: user {user} is bound to two nodes ({owner[user]} and "
                f"{key}); one user, one node"
            )
        owner[user] = int(key)
        registry[int(key)] = user
    return registry


def discover_users(
    grid: Grid,
    expected: int,
    timeout: float,
    population: int | None = None,
    registry: dict[int, int] | None = None,
) -> dict[int, int]:
    """Map user id -> node id by asking every node which user it holds (a QUERY message).

    Waits up to ``timeout`` seconds for ``expected`` nodes to connect (with a registry: for the
    registered ones, at most as many as it lists), then asks them all (see
    :class:`NodeDirectory` for the checks).
    """
    directory = NodeDirectory(population, registry)
    directory.wait(grid, expected, timeout)
    directory.refresh(grid, timeout)
    return directory.user_nodes


class NodeDirectory:
    """Which connected node holds which user, kept current round by round: nodes that connect
    later are asked which user they hold, nodes the SuperLink no longer lists are dropped.

    With a ``registry`` (node id -> user, see :func:`load_node_registry`) a node counts only if
    the registry lists it and its claim agrees with it; without one, a claim must name a user in
    ``0 .. population - 1``. Nodes that fail either check are refused (logged once, never
    sampled); when several connected nodes claim one user, none of them is used: none can be
    told genuine. Joins and departures are logged by node id only (which user a node holds is
    the operator's to know, not the logs')."""

    def __init__(self, population: int | None, registry: dict[int, int] | None = None) -> None:
        self.population, self.registry = population, registry
        self.claims: dict[int, int] = {}  # node -> the user it claimed (checked)
        self.refused: set[int] = set()
        self.listed: set[int] = set()
        self.user_nodes: dict[int, int] = {}  # user -> node, the users that can be reached
        self._duplicates: set[int] = set()

    def _counted(self, ids) -> int:
        return len(ids) if self.registry is None else sum(n in self.registry for n in ids)

    def wait(self, grid: Grid, expected: int, timeout: float) -> None:
        """Wait up to ``timeout`` for ``expected`` nodes (registered ones, with a registry)."""
        deadline = time.monotonic() + timeout
        if self.registry is not None:  # only registered nodes can take part: wait for those
            expected = min(expected, len(self.registry))
        node_ids = list(grid.get_node_ids())
        while self._counted(node_ids) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = list(grid.get_node_ids())
        if self._counted(node_ids) < expected:
            log.warning("only %d of %d expected nodes connected", self._counted(node_ids), expected)

    def refresh(self, grid: Grid, timeout: float) -> tuple[list[int], list[int]]:
        """Ask the nodes connected since the last refresh which user they hold, forget those
        gone; returns (nodes that joined, nodes that left). A node that does not answer is
        asked again next time."""
        ids = set(grid.get_node_ids())
        new = sorted(n for n in ids if n not in self.claims and n not in self.refused)
        if self.registry is not None:
            for node in new:
                if node not in self.registry:
                    log.warning("node %d is not in the node registry: refused", node)
                    self.refused.add(node)
            new = [n for n in new if n in self.registry]
        if new:
            self._ask(grid, new, timeout)
        before = set(self.user_nodes.values())
        left = sorted(self.listed - ids)
        self.listed = ids
        self._bind()
        joined = sorted(set(self.user_nodes.values()) - before)
        return joined, left

    def _ask(self, grid: Grid, node_ids: list[int], timeout: float) -> None:
        messages = [
            Message(
                content=RecordDict({"query": ConfigRecord({"what": USER_KEY})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in node_ids
        ]
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say which user it holds: %s", node, reply.error.reason)
                continue
            try:
                user = int(reply.content["info"][USER_KEY])
            except (KeyError, TypeError, ValueError):
                log.warning("node %d sent no readable %s: refused", node, USER_KEY)
                self.refused.add(node)
                continue
            if self.registry is not None and self.registry.get(node) != user:
                log.warning(
                    "node %d claims user %d, but the node registry binds it to user %s: refused",
                    node,
                    user,
                    self.registry.get(node),
                )
                self.refused.add(node)
                continue
            if self.population is not None and not 0 <= user < self.population:
                log.warning(
                    "node %d claims user %d, outside 0..%d (population %d): refused",
                    node,
                    user,
                    self.population - 1,
                    self.population,
                )
                self.refused.add(node)
                continue
            self.claims[node] = user

    def _bind(self) -> None:
        by_user: dict[int, list[int]] = {}
        for node, user in self.claims.items():
            if node in self.listed:
                by_user.setdefault(user, []).append(node)
        self.user_nodes = {}
        for user, nodes in sorted(by_user.items()):
            if len(nodes) > 1:
                if user not in self._duplicates:
                    log.warning(
                        "nodes %s all claim user %d: all of them dropped", sorted(nodes), user
                    )
                self._duplicates.add(user)
                continue
            self._duplicates.discard(user)
            self.user_nodes[user] = nodes[0]
