"""Dropouts, failures and time-outs (on a simulated clock: nothing sleeps), and rounds with too
few replies. Fewer replies never lower the reported epsilon."""

import json

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.privacy.accounting import compute_epsilon
from dpfl.simulations.engine import simulate

BASE = {
    "population": 100, "cohort-size": 20, "rounds": 4, "examples-per-user": 20,
    "server-lr": 0.1, "noise-multiplier": 0.8, "target-epsilon": 0.0, "delta": 1e-4,
}  # fmt: skip


def run(tmp_path, name, **over):
    cfg = RunConfig.from_mapping({**BASE, "run-dir": str(tmp_path / name), **over})
    summary = simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, [r for r in rows if r.get("round", 0) > 0]


def eps(summary):
    return summary["privacy"]["epsilon"]["rdp"]["epsilon"]


def test_dropouts_and_failures_complete_the_round_at_the_scheduled_rate(tmp_path):
    _, clean, _ = run(tmp_path, "clean")
    cfg, faulty, rows = run(
        tmp_path, "faulty", **{"sim-dropout-rate": 0.3, "sim-failure-rate": 0.2}
    )
    assert faulty["rounds_run"] == 4
    rounds = [r for r in rows if "retry" not in r]
    assert sum(r["dropped"] for r in rounds) > 0 and sum(r["failed"] for r in rounds) > 0
    for r in rounds:
        assert r["accepted"] + r["dropped"] + r["failed"] == r["cohort"]
        # noise on the average is z*C/(q*K) whatever number replied
        assert r["noise_std_average"] == pytest.approx(0.8 * 0.5 * (1 + 1e-6) / 20)
    expected = compute_epsilon(0.8, cfg.sample_rate, 4, 1e-4).epsilon
    assert eps(faulty) == pytest.approx(expected) and eps(clean) == pytest.approx(expected)


def test_time_outs_on_a_simulated_clock(tmp_path):
    over = {"sim-step-seconds": 1.0, "sim-speed-spread": 1.0, "round-timeout": 2.0}
    cfg, summary, rows = run(tmp_path, "slow", **over)
    # 2 local steps (20 examples, batch 10) at 1 s x slowness: users slower than 1x time out
    assert sum(r["timed_out"] for r in rows) > 0
    for r in rows:
        assert r["accepted"] + r["timed_out"] == r["cohort"]
        assert 0 < r["sim_round_seconds"] <= 2.0
    assert eps(summary) == pytest.approx(compute_epsilon(0.8, cfg.sample_rate, 4, 1e-4).epsilon)


def test_too_few_replies_skip_or_retry_and_are_charged(tmp_path):
    # everyone drops: no round can reach min-replies
    _, skipped, rows = run(
        tmp_path, "skip", **{"sim-dropout-rate": 1.0, "min-replies": 3, "on-too-few": "skip"}
    )
    assert skipped["rounds_run"] == 4 and all(r["discarded"] == 1 for r in rows)
    before = RunConfig.from_mapping({**BASE, "run-dir": str(tmp_path / "x")})
    torch.manual_seed(0)
    saved = torch.load(tmp_path / "skip" / "model.pt", weights_only=True)
    from dpfl.runs import FederatedRun

    initial = FederatedRun(before, progress=False).state.weights()
    assert all(torch.equal(saved[n], initial[n]) for n in initial)  # nothing was applied
    q = 20 / 100
    assert eps(skipped) == pytest.approx(compute_epsilon(0.8, q, 4, 1e-4).epsilon)
    _, retried, rows = run(
        tmp_path, "retry",
        **{"sim-dropout-rate": 1.0, "min-replies": 3, "on-too-few": "retry", "max-retries": 2},
    )  # fmt: skip
    assert retried["rounds_run"] == 4
    assert sum(1 for r in rows if r.get("retry")) == 4 * 2  # 2 retries per round
    # every attempt was charged: 4 rounds x 3 attempts
    assert eps(retried) == pytest.approx(compute_epsilon(0.8, q, 12, 1e-4).epsilon)
    assert eps(retried) > eps(skipped)


def test_retry_draws_a_fresh_cohort_and_then_succeeds(tmp_path):
    # half the users drop; needing 12 of an expected 10 accepted forces retries, some succeed
    _, summary, rows = run(
        tmp_path, "mixed",
        **{"sim-dropout-rate": 0.5, "min-replies": 12, "on-too-few": "retry", "max-retries": 5},
    )  # fmt: skip
    cohorts = [r["cohort"] for r in rows if r.get("round") == 1]
    assert len(cohorts) >= 1
    applied = [r for r in rows if "retry" not in r and not r.get("discarded")]
    assert applied and all(r["accepted"] >= 12 for r in applied)
