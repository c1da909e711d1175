import json
import math

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.privacy.accounting import compute_epsilon
from dpfl.simulation import simulate

SMALL = {
    "population": 300,
    "cohort-size": 30,
    "rounds": 8,
    "examples-per-user": 20,
    "server-lr": 0.05,
}


def cfg(tmp_path, **over):
    values = {**SMALL, "run-dir": str(tmp_path / "run"), **over}
    return RunConfig.from_mapping(values)


def metrics(c: RunConfig):
    with open(f"{c.run_dir}/metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_a_private_run_learns_and_reports_its_budget(tmp_path):
    c = cfg(
        tmp_path,
        rounds=15,
        **{"target-epsilon": 8.0, "cohort-size": 60, "server-lr": 0.1, "diagnostics": True},
    )
    summary = simulate(c, progress=False)
    # ~0.1 (chance) before, ~0.48 after on 2,000 test examples
    assert summary["final"]["accuracy"] > summary["initial"]["accuracy"] + 0.25
    p = summary["privacy"]
    assert p["epsilon"]["rdp"]["epsilon"] <= 8.0
    assert p["epsilon"]["rdp"]["epsilon"] >= 8.0 * 0.99  # calibrated to spend the budget
    assert p["epsilon"]["pld"]["epsilon"] <= p["epsilon"]["rdp"]["epsilon"]
    assert p["text"].startswith("(epsilon, delta) = (")
    assert "Poisson sampling, q=0.2, T=15" in p["text"]
    assert p["delta"] < 1 / c.population
    rows = metrics(c)
    assert rows[0]["round"] == 0 and "eval_accuracy" in rows[0]
    eps = [r["epsilon_rdp"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(p["epsilon"]["rdp"]["epsilon"])
    assert all(r["noise_std_average"] > 0 for r in rows[1:])
    assert {"diag_train_loss", "diag_fraction_clipped", "diag_replies"} <= set(rows[1])
    assert "NOT covered by the DP guarantee" in summary["diagnostics_note"]
    saved = torch.load(f"{c.run_dir}/model.pt", weights_only=True)
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_run_stops_before_exceeding_the_budget(tmp_path):
    c = cfg(tmp_path, rounds=50, **{"noise-multiplier": 0.8, "target-epsilon": 8.0})
    summary = simulate(c, progress=False)
    assert summary["stopped_for_budget"]
    assert 0 < summary["rounds_run"] < 50
    assert summary["privacy"]["epsilon"]["rdp"]["epsilon"] <= 8.0


def test_resume_in_reproducible_mode_matches_an_uninterrupted_run(tmp_path):
    common = {
        "noise-seed": 123,
        "sampling-seed": 4,
        "checkpoint-every": 2,
        "noise-multiplier": 1.0,
        "target-epsilon": 0.0,
    }
    full = cfg(tmp_path / "a", **common)
    simulate(full, progress=False)
    part = cfg(tmp_path / "b", **common)
    simulate(part, progress=False, stop_after_round=5)  # checkpoint at 4: round 5 is redone
    resumed = simulate(part, progress=False, resume=True)
    a = torch.load(f"{full.run_dir}/model.pt", weights_only=True)
    b = torch.load(f"{part.run_dir}/model.pt", weights_only=True)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert resumed["rounds_run"] == 8
    assert [r["round"] for r in metrics(part)] == list(range(9))
    assert "INSECURE" in resumed["privacy"]["noise_source"]
    assert "INSECURE" in resumed["privacy"]["cohort_source"]
    first = json.load(open(f"{full.run_dir}/summary.json"))
    assert resumed["privacy"]["epsilon"] == first["privacy"]["epsilon"]


def test_resume_in_secure_mode_charges_replayed_rounds(tmp_path):
    c = cfg(tmp_path, **{"checkpoint-every": 4, "noise-multiplier": 1.0, "target-epsilon": 0.0})
    simulate(c, progress=False, stop_after_round=6)  # rounds 5 and 6 ran, then a "crash"
    resumed = simulate(c, progress=False, resume=True)
    assert resumed["rounds_run"] == 8
    # 8 rounds kept + 2 replayed with fresh noise: 10 rounds are charged
    expected = compute_epsilon(1.0, c.sample_rate, 10, c.resolved_delta).epsilon
    assert resumed["privacy"]["epsilon"]["rdp"]["epsilon"] == pytest.approx(expected)


def test_resume_refuses_a_different_config(tmp_path):
    c = cfg(tmp_path, **{"checkpoint-every": 1})
    simulate(c, progress=False, stop_after_round=2)
    changed = RunConfig.from_mapping({**c.to_dict(), "server-lr": 0.5})
    with pytest.raises(ValueError, match="different config"):
        simulate(changed, progress=False, resume=True)


def test_diverging_clients_are_dropped_and_counted(tmp_path):
    c = cfg(
        tmp_path,
        rounds=2,
        **{"client-lr": 1e30, "target-epsilon": 0.0, "noise-multiplier": 1.0, "diagnostics": True},
    )
    simulate(c, progress=False)
    rows = metrics(c)[1:]
    assert all(r["diag_failed"] == r["diag_cohort"] and r["diag_accepted"] == 0 for r in rows)
    assert all(math.isfinite(r["eval_loss"]) for r in rows)


def test_server_side_clipping_and_no_dp_runs(tmp_path):
    server = cfg(tmp_path / "s", rounds=2, **{"clip-location": "server", "diagnostics": True})
    simulate(server, progress=False)
    assert 0 <= metrics(server)[1]["diag_fraction_clipped"] <= 1
    nodp = cfg(tmp_path / "n", rounds=2, **{"clip-norm": 0.0, "target-epsilon": 0.0})
    summary = simulate(nodp, progress=False)
    assert summary["privacy"]["dp"] is False
    assert not any(k.startswith("epsilon") for k in metrics(nodp)[1])


@pytest.mark.parametrize(
    "values, match",
    [
        ({"lerning-rate": 1}, "unknown config key 'lerning-rate'"),
        ({"cohort-size": 500}, r"cohort-size = 500.*\(0, population = 300\]"),
        ({"server-optimizer": "adamm"}, "server-optimizer = 'adamm': expected one of adagrad"),
        ({"clip-scheme": "layer"}, "expected one of flat, uniform, dim"),
        ({"clip-mode": "rescale", "clip-scheme": "flat"}, "set clip-mode = 'clip', or a per-l"),
        ({"clip-mode": "clipp"}, "expected one of clip, normalize, rescale.*did you mean 'clip'"),
        ({"rounds": "ten"}, "rounds = 'ten': expected an integer"),
        ({"delta": 1.5}, "delta"),
        ({"sampling": "fixed"}, "target-epsilon needs sampling = poisson"),
    ],
)
def test_bad_config_names_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_mapping({**SMALL, **values})


def test_fixed_size_cohorts_report_no_epsilon(tmp_path):
    c = cfg(
        tmp_path,
        rounds=2,
        sampling="fixed",
        **{"target-epsilon": 0.0, "noise-multiplier": 1.0, "diagnostics": True},
    )
    summary = simulate(c, progress=False)
    assert "epsilon" not in summary["privacy"]
    assert "no epsilon is reported" in summary["privacy"]["text"]
    assert all(r["diag_cohort"] == 30 for r in metrics(c)[1:])


def test_unseeded_runs_draw_different_noise_and_a_seeded_run_is_reproducible(tmp_path):
    def final_model(name, **over):
        c = cfg(
            tmp_path / name, rounds=2, **{"noise-multiplier": 1.0, "target-epsilon": 0.0, **over}
        )
        summary = simulate(c, progress=False)
        return summary, torch.load(tmp_path / name / "run" / "model.pt", weights_only=True)

    s1, a = final_model("a", **{"sampling-seed": 1})
    _, b = final_model("b", **{"sampling-seed": 1})
    assert any(not torch.equal(a[n], b[n]) for n in a)  # same data and cohorts, fresh noise
    assert "secure" in s1["privacy"]["noise_source"]
    s3, c = final_model("c", **{"noise-seed": 5, "sampling-seed": 1})
    _, d = final_model("d", **{"noise-seed": 5, "sampling-seed": 1})
    assert all(torch.equal(c[n], d[n]) for n in c)
    assert "INSECURE" in s3["privacy"]["noise_source"] and "INSECURE" in s3["privacy"]["text"]
    # the same seed and noise-seed, but secret cohorts: the runs differ
    _, e = final_model("e", **{"noise-seed": 5})
    _, f = final_model("f", **{"noise-seed": 5})
    assert any(not torch.equal(e[n], f[n]) for n in e)


PUBLIC = {
    "round", "epsilon_rdp", "noise_std_sum", "noise_std_average", "server_lr", "update_norm",
    "seconds", "attempts", "discarded", "retry", "noisy_accepted",
}  # fmt: skip


def test_by_default_no_exact_count_is_released_and_the_report_still_works(tmp_path):
    from dpfl.tools.report import report

    c = cfg(
        tmp_path,
        rounds=3,
        **{"sim-dropout-rate": 0.2, "sim-failure-rate": 0.1, "min-replies": 5},
    )
    assert RunConfig().diagnostics is False  # the default in every way of running
    summary = simulate(c, progress=False)
    rows = metrics(c)
    for r in rows:
        extra = {k for k in r if not k.startswith("eval_") and k != "time"} - PUBLIC
        assert not extra, extra  # no accepted, replies, failed, dropped, cohort, ...
    assert all("noisy_accepted" in r for r in rows[1:])  # what the decision was made on
    lines, paths = report(c.run_dir)
    assert {p.name for p in paths} == {"metrics.png", "epsilon.png"}
    assert any(line.startswith("count:") for line in lines)
    p = summary["privacy"]
    assert p["count_noise_multiplier"] == pytest.approx(10 * p["noise_multiplier"])


@pytest.mark.long
def test_a_pld_run_names_its_epsilon_and_stays_within_its_target(tmp_path):
    c = cfg(tmp_path, rounds=30, **{"noise-multiplier": 1.0, "target-epsilon": 3.0,
                                     "accountant": "pld"})  # fmt: skip
    summary = simulate(c, progress=False)
    rows = metrics(c)[1:]
    assert summary["stopped_for_budget"]
    assert rows[-1]["epsilon_pld"] <= 3.0  # the budget's own accountant, every round
    assert all(r["epsilon_pld"] <= r["epsilon_rdp"] for r in rows)
    assert summary["privacy"]["epsilon"]["pld"]["epsilon"] == pytest.approx(rows[-1]["epsilon_pld"])
    assert "epsilon" not in rows[-1]  # never an unnamed figure


def test_the_reports_extrapolation_counts_every_charged_attempt(tmp_path):
    from dpfl.tools.report import statement_lines

    c = cfg(
        tmp_path,
        rounds=2,
        **{"noise-multiplier": 1.0, "target-epsilon": 0.0, "sim-dropout-rate": 1.0,
           "min-replies": 6, "count-noise-multiplier": 1.0, "on-too-few": "retry",
           "max-retries": 1},
    )  # fmt: skip
    summary = simulate(c, progress=False)
    assert summary["privacy"]["rounds_charged"] == 4 and summary["rounds_run"] == 2
    lines = statement_lines({}, summary)
    assert any("T = 4 charged" in line for line in lines)
    # the noise in the paper's and ml-pfl4asr's terms too: sigma_DP = z/S, dp_sigma = C*sigma_DP
    sigma = 1.0 / summary["privacy"]["expected_cohort"]
    conventions = next(line for line in lines if "the paper's sigma_DP" in line)
    assert f"sigma_DP = z/S = {sigma:.4g}" in conventions
    assert f"dp_sigma = C*sigma_DP = {c.clip_norm * sigma:.4g}" in conventions
    # the default delta stays below 1/K at every extrapolated population: no warning
    assert not any("choose a smaller delta" in line for line in lines)


def test_charges_survive_a_lost_metrics_file_and_a_torn_line(tmp_path):
    """Every attempt is journalled (charges.jsonl, fsynced) before anything it produced is
    released: a resume charges the replayed rounds even when metrics.jsonl is gone or torn."""
    common = {"checkpoint-every": 2, "noise-multiplier": 1.0, "target-epsilon": 0.0}
    c = cfg(tmp_path / "gone", rounds=4, **common)
    simulate(c, progress=False, stop_after_round=3)  # round 3 ran after the checkpoint at 2
    (tmp_path / "gone" / "run" / "metrics.jsonl").unlink()
    resumed = simulate(c, progress=False, resume=True)
    assert resumed["privacy"]["rounds_charged"] == 5  # 4 run + round 3's first release
    expected = compute_epsilon(1.0, c.sample_rate, 5, c.resolved_delta).epsilon
    assert resumed["privacy"]["epsilon"]["rdp"]["epsilon"] == pytest.approx(expected)
    t = cfg(tmp_path / "torn", rounds=4, **common)
    simulate(t, progress=False, stop_after_round=3)
    path = tmp_path / "torn" / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 4, "epsi')  # killed mid-write
    assert simulate(t, progress=False, resume=True)["privacy"]["rounds_charged"] == 6


def test_a_noise_seed_with_secret_cohorts_never_reuses_noise_on_replay(tmp_path):
    from tests.support.runs import federated_run

    c = cfg(tmp_path, rounds=4, **{"checkpoint-every": 2, "noise-multiplier": 1.0,
                                    "target-epsilon": 0.0, "noise-seed": 5})  # fmt: skip
    simulate(c, progress=False, stop_after_round=3)
    saved = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[2])
    assert saved["round"] == 2
    run = federated_run(c, progress=False, resume=True)
    # round 3 ran once on another cohort: its noise is not drawn again, and it stays charged
    assert run.state.noise._streams.next_stream >= 2**40
    assert run.state.ledger.rounds == 3
