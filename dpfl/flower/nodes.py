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
    registered ones, at most as many as it lists), then asks them all.
    With a ``registry`` (node id -> user, see :func:`load_node_registry`) a node counts only if
    the registry lists it and its claim agrees with it; without one, a claim must name a user in
    ``0 .. population - 1``. Nodes that fail either check are refused (logged, never sampled);
    when several nodes claim one user, all of them are dropped: none can be told genuine.
    """
    deadline = time.monotonic() + timeout
    if registry is not None:  # only registered nodes can take part: wait for those alone
        expected = min(expected, len(registry))

    def counted(ids: list[int]) -> int:
        return len(ids) if registry is None else sum(node in registry for node in ids)

    node_ids = list(grid.get_node_ids())
    while counted(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if counted(node_ids) < expected:
        log.warning("only %d of %d expected nodes connected", counted(node_ids), expected)
    if registry is not None:
        for node in node_ids:
            if node not in registry:
                log.warning("node %d is not in the node registry: refused", node)
        node_ids = [node for node in node_ids if node in registry]
    messages = [
        Message(
            content=RecordDict({"query": ConfigRecord({"what": USER_KEY})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    claims: dict[int, list[int]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say which user it holds: %s", node, reply.error.reason)
            continue
        try:
            user = int(reply.content["info"][USER_KEY])
        except (KeyError, TypeError, ValueError):
            log.warning("node %d sent no readable %s: refused", node, USER_KEY)
            continue
        if registry is not None and registry.get(node) != user:
            log.warning(
                "node %d claims user %d, but the node registry binds it to user %s: refused",
                node,
                user,
                registry.get(node),
            )
            continue
        if population is not None and not 0 <= user < population:
            log.warning(
                "node %d claims user %d, outside 0..%d (population %d): refused",
                node,
                user,
                population - 1,
                population,
            )
            continue
        claims.setdefault(user, []).append(node)
    users: dict[int, int] = {}
    for user, nodes in claims.items():
        if len(nodes) > 1:
            log.warning("nodes %s all claim user %d: all of them dropped", sorted(nodes), user)
            continue
        users[user] = nodes[0]
    return users
