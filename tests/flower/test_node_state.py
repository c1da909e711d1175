"""A node's own state across a crash and resume: only what the run's lineage kept is used."""

import pytest
import torch

from dpfl.flower.node_state import (
    CHECKPOINT_ROUND,
    LINEAGE,
    RUN_ID,
    NodeStore,
    RunMark,
    encode_lineage,
)


def mark(lineage, checkpoint, run_id="abc123"):
    values = {RUN_ID: run_id, LINEAGE: encode_lineage(lineage), CHECKPOINT_ROUND: checkpoint}
    out = RunMark.pop(values)
    assert values == {}  # the keys are taken out of the train config
    return out


def state(value: float) -> dict[str, torch.Tensor]:
    return {"bn.running_mean": torch.full((3,), value)}


def saved_rounds(store: NodeStore) -> list[int]:
    return [r for r, _, _ in store._files()]


def test_a_resumed_run_starts_each_node_from_the_state_its_checkpoint_kept(tmp_path):
    # first start (incarnation aa): the node trains rounds 2, 4 and 5; checkpoint at 3
    first = NodeStore(tmp_path, mark([("aa", 1)], 3), user=7)
    assert first.load(1) is None
    for r in (2, 4, 5):
        first.save(r, state(r))
    assert first.load(5)["bn.running_mean"][0] == 4
    # crash after round 5; the resume (bb) replays from round 4: rounds 4 and 5 of aa are lost
    second = NodeStore(tmp_path, mark([("aa", 1), ("bb", 4)], 3), user=7)
    assert second.load(4)["bn.running_mean"][0] == 2  # not round 4's lost state
    assert second.load(6)["bn.running_mean"][0] == 2  # not round 5's either
    second.save(6, state(60))
    assert saved_rounds(second) == [2, 6]  # what the lineage disowns is deleted
    # bb checkpoints at 6 and crashes; cc resumes from 6; a stale aa file at 5 must not count
    NodeStore(tmp_path, mark([("aa", 1)], 3), user=7).folder.joinpath(
        "round-00000005-aa.pt"
    ).write_bytes((second.folder / "round-00000002-aa.pt").read_bytes())
    third = NodeStore(tmp_path, mark([("aa", 1), ("bb", 4), ("cc", 7)], 6), user=7)
    assert third.load(7)["bn.running_mean"][0] == 60
    third.save(8, state(80))
    assert saved_rounds(third) == [6, 8]  # of those up to the checkpoint, only the newest
    # other users and other runs are apart
    assert NodeStore(tmp_path, mark([("cc", 1)], 0), user=8).load(9) is None
    assert NodeStore(tmp_path, mark([("cc", 1)], 0, run_id="ff"), user=7).load(9) is None


def test_run_marks_are_checked():
    assert RunMark.pop({"server-round": 1}) is None  # an older server: context.state instead
    with pytest.raises(ValueError, match="hex run id"):
        RunMark.pop({RUN_ID: "../../etc", LINEAGE: "aa:1", CHECKPOINT_ROUND: 0})
    with pytest.raises(ValueError, match="incarnation:round"):
        RunMark.pop({RUN_ID: "ab", LINEAGE: "aa:x", CHECKPOINT_ROUND: 0})
