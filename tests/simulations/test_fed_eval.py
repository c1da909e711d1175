"""Federated evaluation in the simulator: users evaluate on their own held-out data; the release
is exact and labelled non-private (diagnostic) or noised and charged to the ledger (dp)."""

import json
import math

import numpy as np
import pytest
import torch

from dpfl.config import RunConfig
from dpfl.loop.fed_eval import EvalPlan, release
from dpfl.privacy.accounting import PrivacyLedger
from dpfl.privacy.mechanisms import NoiseSource
from dpfl.recipes import build_data, build_task
from dpfl.server.sampling import CohortSampler
from dpfl.simulation import simulate

BASE = {
    "population": 60,
    "cohort-size": 12.0,
    "rounds": 4,
    "eval-every": 2,
    "classification.examples-per-user": 20,  # 4 held out each
    "eval-cohort-size": 10.0,
    "eval-max-examples": 4,
    "delta": 1e-5,
}


def run(tmp_path, name, **over):
    cfg = RunConfig.from_mapping({**BASE, **over, "run-dir": str(tmp_path / name)})
    summary = simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, rows


def test_diagnostic_evaluation_is_the_exact_mean_over_the_sampled_users(tmp_path):
    cfg, summary, rows = run(
        tmp_path, "diag", **{"eval-privacy": "diagnostic", "sampling-seed": 3, "target-epsilon": 0}
    )
    last = rows[-1]
    assert not any(k.startswith("eval_fed") for r in rows for k in r)
    # the same users, drawn again from the evaluation's own (seeded) sampler
    users = CohortSampler.from_seed(3, "eval-sampling").cohort(60, 10 / 60, 4)
    training = CohortSampler.from_seed(3).cohort(60, 0.2, 4)
    assert not np.array_equal(users, training[: len(users)])  # its own stream
    task, data = build_task(cfg), build_data(cfg)
    model = task.build_model()
    model.load_state_dict(torch.load(tmp_path / "diag" / "model.pt", weights_only=True))
    correct = [task.evaluate(model, data.user_test_data(int(u)))["accuracy"] for u in users]
    assert last["diag_fed_users"] == len(users) and last["diag_fed_examples"] == 4 * len(users)
    assert last["diag_fed_accuracy"] == pytest.approx(float(np.mean(correct)), abs=1e-6)
    assert summary["privacy"]["federated_evaluation"]["mode"] == "diagnostic"
    assert "NOT covered" in summary["privacy"]["federated_evaluation"]["note"]


def test_dp_evaluation_is_charged_and_leaves_the_training_epsilon_alone(tmp_path):
    fixed = {"noise-multiplier": 1.0, "target-epsilon": 0}
    _, off, rows_off = run(tmp_path, "off", **fixed, **{"eval-cohort-size": 0.0})
    _, on, rows_on = run(tmp_path, "on", **fixed)
    eps_off = off["privacy"]["epsilon"]["rdp"]["epsilon"]
    split = on["privacy"]["epsilon_split"]
    assert split["training"] == pytest.approx(eps_off, rel=1e-9)  # eval off: unchanged
    assert on["privacy"]["epsilon"]["rdp"]["epsilon"] == split["together"] > eps_off
    # the journal holds both kinds, the ledger composes them
    charges = [json.loads(x) for x in (tmp_path / "on" / "charges.jsonl").read_text().splitlines()]
    assert [c.get("kind", "train") for c in charges].count("eval") == 2
    ledger = PrivacyLedger()
    for c in charges:
        ledger.record(c["noise_multiplier"], c["sample_rate"])
    assert ledger.epsilon(1e-5).epsilon == pytest.approx(split["together"], rel=1e-9)
    evals = [r for r in rows_on if "eval_fed_weight" in r]
    assert [r["round"] for r in evals] == [2, 4]
    assert not any(k.startswith("diag_fed") for r in rows_on for k in r)
    assert "2 federated evaluations" in on["privacy"]["text"]


def test_a_calibrated_run_with_dp_evaluation_completes_its_rounds(tmp_path):
    _, summary, _ = run(tmp_path, "cal", **{"target-epsilon": 3.0})
    assert summary["rounds_run"] == 4 and not summary["stopped_for_budget"]
    split = summary["privacy"]["epsilon_split"]
    assert split["together"] <= 3.0 * (1 + 1e-9)
    assert split["together"] > 0.99 * 3.0  # the reserve is spent, not wasted
    assert split["training"] == pytest.approx(0.9 * 3.0, rel=0.01)  # eval-budget-share = 0.1


def test_the_dp_release_clips_caps_and_noises_with_the_stated_sensitivity():
    plan = EvalPlan("dp", 0.5, 4, {"accuracy": (0.0, 1.0)}, noise_multiplier=0.0)
    assert plan.sensitivity == pytest.approx(4 * math.sqrt(2))
    out = release(plan, [(10, {"accuracy": 0.5}), (2, {"accuracy": 1.5}), (3, {})], NoiseSource())
    # weights min(n, 4): 4 and 2; the second value clipped to 1; the third user contributes 0
    assert out["eval_fed_weight"] == 6
    assert out["eval_fed_accuracy"] == pytest.approx((4 * 0.5 + 2 * 1.0) / 6)
    noisy = EvalPlan("dp", 0.5, 4, {"accuracy": (0.0, 1.0)}, noise_multiplier=2.0)
    draws = [
        release(noisy, [(4, {"accuracy": 0.5})] * 50, NoiseSource(seed=s))["eval_fed_weight"]
        for s in range(200)
    ]
    assert np.std(draws) == pytest.approx(2.0 * 4 * math.sqrt(2), rel=0.15)
    assert np.mean(draws) == pytest.approx(200, abs=3)


def test_federated_evaluation_needs_held_out_data_and_bounds(tmp_path):
    from dpfl.data import from_arrays

    class Unbounded:
        metric = "score"

        def build_model(self):
            return torch.nn.Linear(2, 1)

        def loss(self, model, batch):
            return model(batch["x"]).pow(2).mean()

        def evaluate(self, model, data):
            return {"score": 1.0}

    x = torch.randn(40, 2)
    data = from_arrays({"x": x}, users=np.arange(40) % 4, test={"x": x[:4]})
    cfg = {**BASE, "population": 0, "cohort-size": 2.0, "eval-cohort-size": 2.0, "rounds": 1}
    from dpfl import simulate as api_simulate

    with pytest.raises(ValueError, match="eval_bounds"):
        api_simulate(Unbounded(), data, {**cfg, "run-dir": str(tmp_path / "a")})
    with pytest.raises(ValueError, match="needs DP on"):
        RunConfig.from_mapping({**BASE, "eval-privacy": "dp", "clip-norm": 0})
