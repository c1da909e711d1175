"""Distributed DP in the in-process simulator: the clients' encodings summed modulo 2^b, decoded
by the server, accounted as the subsampled Skellam mechanism at the threshold's noise."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dpfl.config import RunConfig
from dpfl.loop.plan import encoding_for, resolve_noise, server_spec
from dpfl.privacy.accounting import Segment, epsilon_for_segments
from dpfl.privacy.distributed import WrapError, encode_update, rounded_l2_bound
from dpfl.server.round import ServerState
from dpfl.simulation import simulate
from dpfl.tools.report import statement_lines

BASE = {
    "population": 60, "cohort-size": 12, "rounds": 6, "examples-per-user": 20,
    "server-lr": 0.1, "noise-multiplier": 0.8, "target-epsilon": 0.0, "delta": 1e-4,
    "dp-mode": "distributed", "seed": 3,
}  # fmt: skip


def run(tmp_path, name, **over):
    cfg = RunConfig.from_mapping({**BASE, "run-dir": str(tmp_path / name), **over})
    summary = simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r.get("round", 0) > 0]


def test_a_distributed_run_learns_and_is_accounted_as_skellam(tmp_path):
    over = {"min-contributors": 4, "noise-multiplier": 0.3, "server-lr": 0.3}
    summary, rows = run(tmp_path, "dist", **over)
    p = summary["privacy"]
    assert p["dp_mode"] == "distributed" and "secure aggregation" in p["threat_model"]
    d = p["distributed"]
    assert d["sum_bits"] == 20 and d["min_contributors"] == 4
    assert d["wrap_probability_per_round"] == 1e-9
    assert "clipping" in d["moved_to_the_client"] and "contributions" in d["kept_by_the_server"]
    # the reported epsilon is the Skellam accountant's at the run's encoding
    segment = Segment(0.3, 0.2, 6, d["l2_sensitivity_integer"], d["l1_sensitivity_integer"])
    expected = epsilon_for_segments([segment], 1e-4).epsilon
    assert p["epsilon"]["rdp"]["epsilon"] == pytest.approx(expected)
    assert summary["final"]["accuracy"] > summary["initial"]["accuracy"] + 0.05  # 0.087 -> 0.2
    # the report states the threat model, the encoding and the wrap bound
    text = "\n".join(statement_lines({}, summary))
    assert "distributed DP" in text and "20-bit" in text and "wrap bound 1e-09" in text
    assert all(r["noise_std_sum"] > 0 for r in rows if "discarded" not in r)


def test_central_and_distributed_give_the_accountant_the_same_inputs(tmp_path):
    central, _ = run(tmp_path, "central", **{"dp-mode": "central"})
    dist, _ = run(tmp_path, "dist", **{"min-contributors": 4})
    pc, pd = central["privacy"], dist["privacy"]
    for key in ("noise_multiplier", "sample_rate", "rounds_charged", "delta", "clip_norm"):
        assert pc[key] == pd[key]
    # the mechanism differs only by the integers' sensitivities, whose cost vanishes at 20 bits
    ec, ed = pc["epsilon"]["rdp"]["epsilon"], pd["epsilon"]["rdp"]["epsilon"]
    assert ec <= ed <= 1.3 * ec


def test_a_sum_with_too_few_contributions_is_not_released_but_charged(tmp_path):
    summary, rows = run(tmp_path, "few", **{"min-contributors": 14, "population": 40,
                                             "cohort-size": 8})  # fmt: skip
    discarded = [r for r in rows if r.get("discarded")]
    assert discarded, "a cohort of 8 on average rarely reaches 14"
    assert summary["privacy"]["rounds_charged"] == 6  # skipped rounds are charged
    for r in discarded:  # nothing of a discarded round was released
        assert "update_norm" not in r and "noise_std_sum" not in r


def test_the_simulator_fails_loudly_on_a_wrap():
    cfg = RunConfig.from_mapping({**BASE, "run-dir": "unused", "min-contributors": 2})
    plan = encoding_for(cfg, 8, 0.8)
    noise = resolve_noise(cfg, 8)
    scale = plan.scale * 1e4  # far beyond what the wrap bound allows
    l2 = rounded_l2_bound(scale * plan.clip_norm, plan.padded)
    wild = dataclasses.replace(plan, scale=scale, l2=l2, l1=l2 * l2, noise_multiplier=1e-9)
    spec = dataclasses.replace(server_spec(cfg, noise), encoding=wild)
    state = ServerState({"w": torch.zeros(8)}, spec, 1)
    agg = state.begin_round()
    for user in range(3):
        values = encode_update(
            {"w": torch.full((8,), 0.17)}, wild, spec.rotation_seed, 1, user, 0, reduce=False
        )
        agg.add_encoded(np.mod(values, wild.modulus), values)
    with pytest.raises(WrapError):
        state.decide(agg, 0)


def test_a_sum_near_the_boundary_fails_the_round_in_deployment():
    cfg = RunConfig.from_mapping({**BASE, "run-dir": "unused", "min-contributors": 2})
    noise = resolve_noise(cfg, 64)
    state = ServerState({"w": torch.zeros(64)}, server_spec(cfg, noise), 1)
    agg = state.begin_round()
    total = np.zeros(64, dtype=np.int64)
    total[:8] = (1 << 19) - 5  # what a wrapped coordinate looks like, modulo 2^20
    agg.set_secure_sum(total, 3)
    decision = state.decide(agg, 0)
    assert not decision.apply and "boundary" in decision.reason
    quiet = state.begin_round()
    quiet.set_secure_sum(np.zeros(64, dtype=np.int64), 3)
    assert state.decide(quiet, 0).apply


def test_the_server_decodes_with_the_rounds_rotation():
    over = {"run-dir": "unused", "min-contributors": 1, "noise-multiplier": 1e-6,
            "server-optimizer": "sgd", "server-lr": 1.0}  # fmt: skip
    cfg = RunConfig.from_mapping({**BASE, **over})
    spec = server_spec(cfg, resolve_noise(cfg, 16))
    update = {"w": torch.linspace(-0.1, 0.1, 16)}
    for round_number, signs_round in ((1, 1), (1, 2)):
        state = ServerState({"w": torch.zeros(16)}, spec, 1)
        agg = state.begin_round()
        values = encode_update(update, spec.encoding, spec.rotation_seed, signs_round, 0, None)
        agg.add_encoded(values)
        assert state.decide(agg, 0).apply
        state.finish_round(agg)  # decodes with round 1's rotation
        new = state.weights()["w"]
        # SGD at lr 1: the weights move by the average, the sum over the expected cohort
        expected = update["w"] / spec.expected_cohort
        close = torch.allclose(new, expected, atol=1e-3 / spec.expected_cohort)
        assert close == (signs_round == round_number)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"eval-cohort-size": 5}, "federated evaluation"),
        ({"clip-location": "server"}, "clip-location"),
        ({"min-replies": 3}, "min-contributors"),
        ({"sum-bits": 40}, "sum-bits"),
    ],
)
def test_settings_distributed_dp_refuses(over, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_mapping({**BASE, **over})


def test_reproducible_client_noise_is_keyed_per_attempt_and_metrics_show_the_floor(tmp_path):
    cfg = RunConfig.from_mapping({**BASE, "run-dir": "unused", "noise-seed": 3})
    spec = server_spec(cfg, resolve_noise(cfg, 8))
    state = ServerState({"w": torch.zeros(8)}, spec, 2)
    first, second = state.begin_round(), state.begin_round()
    assert first.noise_nonce != second.noise_nonce  # a retry never reuses a share
    again = ServerState({"w": torch.zeros(8)}, spec, 2).begin_round()
    assert again.noise_nonce == first.noise_nonce  # reproducible
    summary, rows = run(tmp_path, "floor", **{"min-contributors": 4, "diagnostics": True})
    floor = summary["privacy"]["distributed"]["noise_std_float_at_min_contributors"]
    for r in rows:
        if not r.get("discarded"):
            assert r["noise_std_sum"] == pytest.approx(floor)  # public: the accounted floor
            assert r["diag_noise_std_sum"] >= floor  # the exact count's: a diagnostic
