"""What a node keeps between the rounds of a run, on its own disk: the parameters and statistics a
task keeps on the client (OFVL-MS's scene-specific weights, ``norm-stats = "client"`` running
statistics). Flower's ``context.state`` lives as long as one ``flwr run``; a resumed run is a new
``flwr run``, so the node keeps its state in a folder keyed by the dpfl run instead, one file per
round it trained in.

A run that crashed and resumed from its checkpoint at round c replays the rounds after c: a node
must then start from its state as of round c, not from what it trained in a lost round. The
server sends, with every train message, the run's id and its *lineage*: which start of the run
(incarnation) produced which rounds (``"a1b2:1,c3d4:7"``: rounds 1-6 by a1b2, 7 on by c3d4). A
file counts only if the incarnation that wrote it is the one the lineage names for its round;
the newest such file from before the round being trained is the state to start from. Files the
lineage disowns are deleted, and of those at or before the last checkpoint only the newest is
kept (the oldest state a resume can need).

The folder is the node's (``state-dir`` in its node config; default ``$FLWR_HOME/dpfl-node-state``
or ``~/.flwr/dpfl-node-state``): this state never leaves the node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dpfl.server.checkpoint import load_checkpoint, save_checkpoint

STATE_DIR_KEY = "state-dir"
"""Node-config key: the folder where this node keeps its per-run state."""
RUN_ID, LINEAGE, CHECKPOINT_ROUND = "dpfl-run-id", "dpfl-lineage", "dpfl-checkpoint-round"
MARK_KEYS = (RUN_ID, LINEAGE, CHECKPOINT_ROUND)
"""Train-config keys the server adds (not run-config keys: a client pops them)."""
_FILE = re.compile(r"round-(\d+)-([0-9a-f]+)\.pt$")


def default_state_dir() -> Path:
    home = os.environ.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "dpfl-node-state"


def encode_lineage(lineage: list[tuple[str, int]]) -> str:
    return ",".join(f"{inc}:{first}" for inc, first in lineage)


@dataclass(frozen=True)
class RunMark:
    """The server's word on which of a node's saved states are still part of the run."""

    run_id: str
    lineage: tuple[tuple[str, int], ...]
    checkpoint_round: int

    @classmethod
    def pop(cls, values: dict) -> RunMark | None:
        """Take the mark's keys out of a train config (None when the server sent none)."""
        raw = {key: values.pop(key, None) for key in MARK_KEYS}
        if raw[RUN_ID] is None:
            return None
        if not re.fullmatch(r"[0-9a-f]{1,64}", str(raw[RUN_ID])):
            raise ValueError(f"{RUN_ID} {raw[RUN_ID]!r} is not a hex run id")
        lineage = []
        for part in str(raw[LINEAGE] or "").split(","):
            inc, _, first = part.partition(":")
            if not re.fullmatch(r"[0-9a-f]{1,64}", inc) or not first.isdigit():
                raise ValueError(f"{LINEAGE} {raw[LINEAGE]!r} is not incarnation:round,...")
            lineage.append((inc, int(first)))
        return cls(str(raw[RUN_ID]), tuple(lineage), int(raw[CHECKPOINT_ROUND] or 0))

    def owner(self, round_number: int) -> str | None:
        """The incarnation whose release of ``round_number`` the run kept."""
        owner = None
        for inc, first in self.lineage:
            if first <= round_number:
                owner = inc
        return owner


class NodeStore:
    """One user's saved states for one run on this node."""

    def __init__(self, root: str | Path, mark: RunMark, user: int) -> None:
        self.mark = mark
        self.folder = Path(root) / mark.run_id / f"user-{int(user)}"

    def _files(self) -> list[tuple[int, str, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            if m := _FILE.fullmatch(path.name):
                found.append((int(m[1]), m[2], path))
        return sorted(found)

    def _kept(self) -> list[tuple[int, Path]]:
        return [(r, p) for r, inc, p in self._files() if self.mark.owner(r) == inc]

    def load(self, round_number: int) -> dict[str, torch.Tensor] | None:
        """The state to train round ``round_number`` from: the newest the run kept, before it."""
        before = [(r, p) for r, p in self._kept() if r < round_number]
        return load_checkpoint(before[-1][1]) if before else None

    def save(self, round_number: int, weights: dict[str, torch.Tensor]) -> None:
        inc = self.mark.owner(round_number)
        if inc is None:
            raise ValueError(f"round {round_number} is before the run's lineage")
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.folder / f"round-{round_number:08d}-{inc}.pt", weights)
        self.prune()

    def prune(self) -> None:
        """Delete what the lineage disowns, and every kept state at or before the checkpoint
        but the newest."""
        kept = {p for _, p in self._kept()}
        upto = [p for r, p in self._kept() if r <= self.mark.checkpoint_round]
        for _, _, path in self._files():
            if path not in kept or (path in upto and path != upto[-1]):
                path.unlink(missing_ok=True)
