"""A deployment on loopback that loses pieces mid-run: the ServerApp (SIGKILL) and the SuperLink
(SIGKILL, restarted on its database) die and the run resumes from its checkpoint with
``resume = true``; a SuperNode joins after the first round, another leaves mid-run. One
federation (a SuperLink with a database file, three SuperNodes keeping their own state in their
own folders) serves the whole module."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.simulation import simulate
from tests.support.flower_local import LoopbackFederation, flwr_run, run_status

pytestmark = pytest.mark.slow

USERS = 3
BASE = {
    "population": USERS,
    "cohort-size": 2.0,
    "rounds": 4,
    "classification.examples-per-user": 20,
    "norm": "batchnorm",
    "norm-stats": "client",  # running statistics stay on each node, across the crash too
    "noise-multiplier": 0.8,
    "target-epsilon": 0.0,
    "delta": 1e-5,
    "checkpoint-every": 2,
    "round-timeout": 60.0,
    "diagnostics": True,
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LoopbackFederation(tmp_path_factory.mktemp("loopback"), USERS)
    yield fed
    fed.stop()


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def wait_for(condition, what: str, fed: LoopbackFederation, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(fed.logs.glob("*.log")))
            pytest.fail(f"no {what} after {timeout} s:\n{logs}")
        time.sleep(0.2)


def rounds_in(run_dir: Path) -> int:
    return max((r.get("round", 0) for r in rows(run_dir)), default=0)


def submit(fed: LoopbackFederation, values: dict) -> None:
    res = flwr_run(fed.connection, values, fed.env, timeout=120, stream=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def finish(fed: LoopbackFederation, values: dict) -> dict:
    res = flwr_run(fed.connection, values, fed.env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = Path(values["run-dir"]) / "summary.json"
    assert summary.exists(), res.stdout[-3000:]
    return json.loads(summary.read_text())


def journal(run_dir: Path, kind: str | None = None) -> list[tuple[float, float]]:
    """The charged releases (z, q), of one ``kind`` (train, eval) or all."""
    out = []
    for line in (run_dir / "charges.jsonl").read_text().splitlines():
        row = json.loads(line)
        if kind is None or row.get("kind", "train") == kind:
            out.append((row["noise_multiplier"], row["sample_rate"]))
    return out


def test_a_killed_serverapp_resumes_to_the_simulators_model(federation, tmp_path):
    """Reproducible mode (noise and sampling seeds): the crashed and resumed deployment ends
    with the model and epsilon of an uninterrupted in-process run, node-kept BatchNorm
    statistics included."""
    values = {
        **BASE,
        "rounds": 3,
        "checkpoint-every": 1,
        "noise-seed": 3,
        "sampling-seed": 8,
        "run-dir": str(tmp_path / "run"),
    }
    run_dir = tmp_path / "run"
    submit(federation, values)
    wait_for(lambda: rounds_in(run_dir) >= 2, "round 2", federation)
    apps = federation.serverapps()
    assert apps, "no ServerApp process found"
    for pid in apps:
        os.kill(pid, signal.SIGKILL)
    assert rounds_in(run_dir) < 3 and not (run_dir / "summary.json").exists()

    summary = finish(federation, {**values, "resume": True})
    assert summary["rounds_run"] == 3
    done = [r["round"] for r in rows(run_dir) if r.get("round", 0) > 0]
    assert done == [1, 2, 3]  # the metrics after the checkpoint were replaced, not doubled

    sim = simulate(
        RunConfig.from_mapping({**values, "run-dir": str(tmp_path / "sim")}), progress=False
    )
    flower = torch.load(run_dir / "model.pt", weights_only=True)
    ref = torch.load(tmp_path / "sim" / "model.pt", weights_only=True)
    for name in ref:
        assert torch.allclose(flower[name], ref[name], atol=1e-5, rtol=0), name
    # reproducible replays release nothing new: the ledger is the uninterrupted run's
    eps = summary["privacy"]["epsilon"]["rdp"]["epsilon"]
    assert eps == pytest.approx(sim["privacy"]["epsilon"]["rdp"]["epsilon"], rel=1e-9)
    assert len(journal(run_dir)) == 3


def test_a_killed_superlink_restarts_and_nodes_come_and_go(federation, tmp_path):
    """Secure mode (secret noise and cohorts), with DP federated evaluation after rounds 4 and
    5, over a population of 4 users of whom 3 have a node at the start (q = 1: every user every
    round):

    * the 4th user's node connects after round 1; it is asked which user it holds and trains;
    * the SuperLink (and its ServerApp) is killed after that; restarted on its database file,
      the nodes reconnect, the run resumes from its checkpoint and every release made after it
      is charged again: the final epsilon is the ledger of every release in the journal;
    * a node leaves mid-run (SIGTERM): its user is unreachable (a dropout), the run finishes.
    """
    run_dir = tmp_path / "run"
    values = {
        **BASE,
        "population": USERS + 1,
        "cohort-size": float(USERS + 1),
        "rounds": 5,
        "round-timeout": 30.0,  # also how long the start waits for the 4th node
        "eval-cohort-size": 2.0,
        "eval-every": 4,
        "eval-max-examples": 4,
        "run-dir": str(run_dir),
    }

    def accepted() -> list[int]:
        return [r.get("diag_accepted", 0) for r in rows(run_dir) if r.get("round", 0) > 0]

    submit(federation, values)
    wait_for(lambda: rounds_in(run_dir) >= 1, "round 1", federation)
    assert accepted() == [USERS]  # the 4th user has no node yet: unreachable
    federation.start_node(USERS)
    wait_for(lambda: USERS + 1 in accepted(), "the late node's first update", federation)
    wait_for(lambda: rounds_in(run_dir) >= 3, "round 3", federation)
    federation.kill_superlink()
    released = len(journal(run_dir, "train"))
    evals_released = len(journal(run_dir, "eval"))
    checkpoint = rounds_in(run_dir) // 2 * 2  # checkpoint-every 2
    assert 3 <= released < 5 and checkpoint >= 2
    federation.start_superlink()

    submit(federation, {**values, "resume": True})
    wait_for(lambda: rounds_in(run_dir) >= 4, "resumed round 4", federation)
    federation.kill_node(USERS - 1, signal.SIGTERM)  # leaves after round 4
    wait_for(lambda: (run_dir / "summary.json").exists(), "the end of the run", federation)
    federation.start_node(USERS - 1)  # back, for any test after this one
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 5

    metrics = rows(run_dir)
    assert [r["round"] for r in metrics] == [0, 1, 2, 3, 4, 5]
    last = metrics[-1]
    assert last["diag_accepted"] == USERS  # the one who left: sampled, not reached
    assert last["diag_unreachable"] + last["diag_missing"] == 1
    evaluated = [4, 5]  # every eval-every rounds, and the last
    assert [r["round"] for r in metrics if "eval_fed_weight" in r] == evaluated

    # what was released after the checkpoint stays charged, and its rounds are charged again
    trained = journal(run_dir, "train")
    assert len(trained) == 5 + released - checkpoint
    again = [r for r in evaluated if r > checkpoint]
    assert len(journal(run_dir, "eval")) == evals_released + len(again)
    ledger = PrivacyLedger()
    for z, q in journal(run_dir):
        ledger.record(z, q)
    expected = ledger.epsilon(BASE["delta"], "rdp").epsilon
    assert summary["privacy"]["epsilon"]["rdp"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    uninterrupted = PrivacyLedger()
    uninterrupted.record(*trained[0], steps=5)
    split = summary["privacy"]["epsilon_split"]
    assert split["training"] > uninterrupted.epsilon(BASE["delta"], "rdp").epsilon
    assert split["together"] == pytest.approx(expected, rel=1e-9)
    assert split["together"] > split["training"]
    statuses = [r["status"] for r in run_status(federation.env, federation.connection)]
    assert "finished:completed" in statuses
