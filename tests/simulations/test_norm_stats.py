"""Running statistics of normalisation layers in federated runs: kept per user or aggregated."""

import json

import torch

from dpfl.config import RunConfig
from dpfl.server.round import load_checkpoint
from dpfl.simulation import simulate
from dpfl.tools.report import statement_lines
from tests.support.runs import federated_run


def config(tmp_path, mode, **over):
    return RunConfig.from_mapping({
        "population": 60, "cohort-size": 12, "rounds": 3, "examples-per-user": 20,
        "server-lr": 0.1, "norm": "batchnorm", "norm-stats": mode, "noise-multiplier": 0.5,
        "target-epsilon": 0.0, "checkpoint-every": 1, "run-dir": str(tmp_path / mode), **over,
    })  # fmt: skip


def test_client_kept_statistics_cost_nothing_for_users_never_sampled(tmp_path):
    cfg = config(tmp_path, "client")
    summary = simulate(cfg, progress=False)
    assert summary["rounds_run"] == 3
    saved = torch.load(tmp_path / "client" / "model.pt", weights_only=True)
    assert not any("running" in n for n in saved)  # the server never held them
    # the simulated clients' own state lives apart from the server's checkpoint, which holds
    # no per-user entry (nothing in it tells who trained)
    checkpoint = load_checkpoint(tmp_path / "client" / "checkpoint.pt")
    assert set(checkpoint) == {
        "format", "config", "server", "noise", "initial", "rounds_planned", "run_id", "lineage",
        "eval_plan", "eval_ledger",
    }  # fmt: skip
    store = load_checkpoint(tmp_path / "client" / "clients" / "state.pt")
    assert 0 < len(store) < cfg.population  # only users that were sampled
    for stats in store.values():
        assert set(stats) == {"1.layer.running_mean", "1.layer.running_var"}
    means = torch.stack([s["1.layer.running_mean"] for s in store.values()])
    assert (means.std(0) > 0).any()  # each user's own statistics
    # evaluated with the users' own statistics: labelled non-private
    rows = [json.loads(x) for x in (tmp_path / "client" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("eval_non_private") == 1 for r in rows[1:] if "eval_accuracy" in r)
    assert "non-private" in summary["evaluation_note"]
    lines = statement_lines({}, summary)
    assert any(line.startswith("evaluation: NON-PRIVATE") for line in lines)


def test_server_aggregated_statistics_are_averaged_not_optimised(tmp_path):
    cfg = config(tmp_path, "server", **{"server-optimizer": "lamb"})
    run = federated_run(cfg, progress=False)
    assert run.state.averaged == {"1.layer.running_mean", "1.layer.running_var"}
    optimised = {id(p) for g in run.state.optimizer.param_groups for p in g["params"]}
    assert all(id(run.state.params[n]) not in optimised for n in run.state.averaged)
    # one round by hand: the statistics move by exactly the (noisy) average delta
    before = run.state.params["1.layer.running_var"].detach().clone()
    agg = run.state.begin_round()
    delta = {n: torch.zeros_like(p) for n, p in run.state.params.items()}
    delta["1.layer.running_var"] = torch.full_like(before, 0.01)
    agg.add(delta)
    metrics = run.state.finish_round(agg)
    moved = run.state.params["1.layer.running_var"].detach() - before
    noise_sd = metrics["noise_std_average"]
    expected = 0.01 / run.spec.expected_cohort
    assert (moved - expected).abs().max() < 6 * noise_sd
    summary = simulate(cfg, progress=False, overwrite=True)  # the hand-made round's folder
    saved = torch.load(tmp_path / "server" / "model.pt", weights_only=True)
    assert {"1.layer.running_mean", "1.layer.running_var"} <= set(saved)
    assert summary["rounds_run"] == 3
