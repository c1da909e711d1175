"""dpfl on Flower for real: `flwr run .` on a local simulation federation, and a deployment of a
SuperLink with two SuperNodes on loopback. Every process a test starts is stopped by PID."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.simulation import simulate
from tests.support.flower_local import (
    flwr_run_simulation,
    local_simulation_home,
    run_status,
    stop_local_superlink,
)

pytestmark = pytest.mark.slow

# Noise off (z = 0) so the two engines must agree to float precision; clipping stays on.
EQUIV = {
    "population": 6,
    "cohort-size": 3.0,
    "rounds": 3,
    "classification.examples-per-user": 20,
    "noise-multiplier": 0.0,
    "target-epsilon": 0.0,
    "server-optimizer": "lamb",
    "server-lr": 0.05,
    "seed": 4,
    "sampling-seed": 5,  # the same cohorts in both engines (reproducible mode)
    "diagnostics": True,
    # federated evaluation on the users' own held-out data (4 examples each): Flower's
    # EVALUATE messages against the simulator's in-process evaluation
    "eval-cohort-size": 3.0,
    "eval-max-examples": 4,
}


@pytest.fixture(scope="module")
def local_sim(tmp_path_factory):
    """One local-simulation federation (its SuperLink) for every `flwr run` of this module."""
    env = local_simulation_home(tmp_path_factory.mktemp("flwr"))
    yield env
    stop_local_superlink(env)


def test_flwr_run_simulation_matches_the_in_process_simulator(local_sim, tmp_path):
    run_dir = tmp_path / "flower-run"
    res = flwr_run_simulation({**EQUIV, "run-dir": str(run_dir)}, 6, local_sim, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    statuses = [r["status"] for r in run_status(local_sim, "local")]
    assert statuses and set(statuses) == {"finished:completed"}, (statuses, res.stdout[-3000:])

    cfg = RunConfig.from_mapping({**EQUIV, "run-dir": str(tmp_path / "sim-run")})
    simulate(cfg, progress=False)
    flower = torch.load(run_dir / "model.pt", weights_only=True)
    sim = torch.load(tmp_path / "sim-run" / "model.pt", weights_only=True)
    for name in sim:
        assert torch.allclose(flower[name], sim[name], atol=1e-5, rtol=0), name
    flower_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sim_rows = [
        json.loads(x) for x in (tmp_path / "sim-run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["diag_accepted"] for r in flower_rows[1:]] == [
        r["diag_accepted"] for r in sim_rows[1:]
    ]
    for f, s in zip(flower_rows[1:], sim_rows[1:], strict=True):  # per-layer ratios, both ways
        assert f["diag_layer_ratio_median"] == pytest.approx(s["diag_layer_ratio_median"], 1e-4)
        assert list(f["diag_layer_ratio_lowest"]) == list(s["diag_layer_ratio_lowest"])
    fed = [r[k] for r in flower_rows[1:] for k in ("eval_fed_weight", "eval_fed_accuracy")]
    assert len(fed) == 6 and min(fed[::2]) > 0
    expected = [r[k] for r in sim_rows[1:] for k in ("eval_fed_weight", "eval_fed_accuracy")]
    assert fed == pytest.approx(expected, abs=1e-6)
    # the model moved: the runs did train
    assert any(r["update_norm"] > 0 for r in flower_rows[1:])


def test_flwr_run_of_the_digits_example_equals_its_python_run(local_sim, tmp_path):
    """A newcomer's own model and data under Flower: examples/digits names dpfl's apps and its
    task and data by import path; two seeded rounds equal the Python run within 1e-5."""
    from tests.test_digits_example import EXAMPLE, SEEDED, USERS, assert_same, python_model

    app = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "dpfl.flower:server_app",
        "clientapp": "dpfl.flower:client_app",
    }
    sys.path.insert(0, str(EXAMPLE))
    try:
        import digits

        model, users = python_model(digits, tmp_path)
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("digits", None)
    values = {**SEEDED, "task-options.users": USERS, "run-dir": str(tmp_path / "flower")}
    res = flwr_run_simulation(values, users, local_sim, timeout=900, app=EXAMPLE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(model, tmp_path / "flower" / "model.pt")


def test_dpfl_new_writes_a_project_that_runs_in_process_and_under_flower(local_sim, tmp_path):
    """`dpfl new DIR`: the project runs as its README says, in dpfl's simulator and with
    `flwr run` in Flower's simulation (2 rounds each, a smaller federation)."""
    project = tmp_path / "my-app"
    res = subprocess.run(
        [sys.executable, "-m", "dpfl", "new", str(project)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    app = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "dpfl.flower:server_app",
        "clientapp": "dpfl.flower:client_app",
    }
    assert app["config"]["task"] == "my_app.task:make_task"
    readme = (project / "README.md").read_text()
    for command in ("dpfl simulate --config run.toml", "flwr run . local", "flwr run . edge"):
        assert command in readme
    again = subprocess.run(
        [sys.executable, "-m", "dpfl", "new", str(project)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "not an empty folder" in again.stderr

    small = {"rounds": 2, "cohort-size": 2.0, "task-options.users": 4}
    local = subprocess.run(
        [sys.executable, "-m", "dpfl", "simulate", "--config", "run.toml", "--quiet",
         "--rounds", "2", "--cohort-size", "2", "--task-options.users", "4"],
        cwd=project, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    summary = json.loads((project / "runs" / "local" / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and 0 < summary["privacy"]["epsilon"]["rdp"]["epsilon"] <= 8

    run_dir = tmp_path / "flower-run"
    res = flwr_run_simulation(
        {**small, "run-dir": str(run_dir)}, 4, local_sim, timeout=600, app=project
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and 0 < summary["privacy"]["epsilon"]["rdp"]["epsilon"] <= 8
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any(k.startswith("diag_") for r in rows for k in r)  # off
