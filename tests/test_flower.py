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
    deployment_home,
    flwr_run,
    flwr_run_simulation,
    free_port,
    kill,
    local_simulation_home,
    pids_matching,
    run_status,
    stop_local_superlink,
    superlink_command,
    supernode_command,
    wait_for_port,
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
    # the model moved: the runs did train
    assert any(r["update_norm"] > 0 for r in flower_rows[1:])


def test_deployment_on_loopback_two_supernodes(tmp_path):
    port = free_port()
    env = deployment_home(tmp_path / "flwr", "local-deployment", port, None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                superlink_command(port),
                env=env,
                stdout=open(logs / "superlink.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_for_port(port)  # a fresh environment can take a while to start it
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    supernode_command(port, i, 2),
                    env=env,
                    stdout=open(logs / f"supernode{i}.log", "w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        run_dir = tmp_path / "run"
        values = {
            "population": 2,
            "cohort-size": 2.0,
            "rounds": 1,  # each round costs a ClientApp process per node (~10 s)
            "target-epsilon": 0.0,
            "noise-multiplier": 1.0,
            "run-dir": str(run_dir),
        }
        res = flwr_run("local-deployment", values, env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        statuses = [r["status"] for r in run_status(env, "local-deployment")]
        assert statuses == ["finished:completed"], (
            statuses,
            (logs / "superlink.log").read_text()[-3000:],
        )
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all("update_norm" in r for r in rows[1:])
        assert not any(k.startswith("diag_") for r in rows for k in r)  # off by default
        torch.manual_seed(RunConfig.from_mapping(values).seed)
        from dpfl.recipes import build_task

        initial = build_task(RunConfig.from_mapping(values)).build_model().state_dict()
        final = torch.load(run_dir / "model.pt", weights_only=True)
        assert any(not torch.equal(initial[n], final[n]) for n in final)
    finally:
        started = [p.pid for p in procs]
        # SuperNodes and the SuperLink spawn SuperExec helpers tied to them by --parent-pid.
        helpers = [h for pid in started for h in pids_matching("--parent-pid", f" {pid} ")]
        kill(started + helpers)


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
