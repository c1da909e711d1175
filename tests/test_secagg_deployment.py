"""Distributed DP in a Flower deployment on loopback: five SuperNodes run SecAgg+ for two rounds,
one node drops out at the unmask stage (after its masked vector is in the sum) in every
round; the rounds complete, epsilon accounts min-contributors, and the model is the simulator's
with the same integer noise seed (reproducible mode) within the quantisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.privacy.accounting import Segment, epsilon_for_segments
from dpfl.privacy.distributed import EncodingPlan
from dpfl.simulation import simulate
from tests.support.flower_local import ROOT, LoopbackFederation, flwr_run

pytestmark = pytest.mark.slow

USERS = 5
VALUES = {
    "population": USERS,
    "cohort-size": float(USERS),
    "rounds": 2,
    "classification.examples-per-user": 20,
    "noise-multiplier": 0.8,
    "target-epsilon": 0.0,
    "delta": 1e-5,
    "dp-mode": "distributed",
    "min-contributors": 3,
    "noise-seed": 5,  # reproducible (INSECURE) integer noise: the simulator draws the same
    "sampling-seed": 1,
    "round-timeout": 120.0,
    "diagnostics": True,  # the exact contributions per round (diag_*) are checked below
}


def exit_app(folder: Path) -> Path:
    """dpfl's Flower app with the test ClientApp (a node exits at SecAgg+'s unmask stage)."""
    folder.mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace('clientapp = "dpfl.flower:client_app"', 'clientapp = "exit_app:app"')
    text = text.replace('name = "dpfl"', 'name = "dpfl-exit-test"', 1)
    (folder / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "tests" / "support" / "secagg_exit_app.py", folder / "exit_app.py")
    return folder


def test_secagg_rounds_complete_when_a_node_exits_at_unmask(tmp_path):
    app = exit_app(tmp_path / "app")
    run_dir = tmp_path / "deployed"
    fed = LoopbackFederation(
        tmp_path / "fed",
        USERS,
        node_env={2: {"DPFL_TEST_EXIT_AT_UNMASK": "1"}},
        node_config="allow-reproducible-noise=true",  # each node's operator opts in to noise-seed
    )
    try:
        result = flwr_run(
            fed.connection, {**VALUES, "run-dir": str(run_dir)}, fed.env, app=app, timeout=900
        )
    finally:
        fed.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("round", 0) > 0]
    assert len(rounds) == 2 and not any(r.get("discarded") for r in rounds)
    # the chosen node left at the unmask stage in both rounds (its masked vector was in)
    logs = (tmp_path / "fed" / "logs" / "supernode-2.log").read_text()
    assert logs.count("DroppedAtUnmask") >= 2

    # epsilon: the Skellam accountant at min-contributors' noise (3 shares), not the 5 present
    p = summary["privacy"]
    d = p["distributed"]
    assert d["min_contributors"] == 3
    segment = Segment(0.8, 1.0, 2, d["l2_sensitivity_integer"], d["l1_sensitivity_integer"])
    assert p["epsilon"]["rdp"]["epsilon"] == pytest.approx(
        epsilon_for_segments([segment], 1e-5).epsilon
    )
    plan = EncodingPlan(**json.loads((run_dir / "config.json").read_text())["encoding"])
    for r in rounds:  # all five masked vectors are in each sum, with their noise shares
        assert r["diag_accepted"] == 5
        assert r["diag_noise_std_sum"] == pytest.approx(plan.noise_std_float(5))
        assert r["noise_std_sum"] == pytest.approx(plan.noise_std_float(3))  # the public floor

    # the same run in the simulator: the same cohorts, updates and integer noise
    sim_dir = tmp_path / "simulated"
    simulate(RunConfig.from_mapping({**VALUES, "run-dir": str(sim_dir)}), progress=False)
    deployed = torch.load(run_dir / "model.pt")
    simulated = torch.load(sim_dir / "model.pt")
    for name, w in simulated.items():
        assert torch.allclose(deployed[name], w, atol=1e-4), name
