import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp

from dpfl.cli import main

PAPER = ["--cohort", "204800", "--population", "6950600", "--rounds", "2006", "--delta", "1e-9"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("dpfl")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)


def test_budget_reports_each_accountant_and_its_assumptions():
    res = run_cli("budget", "--sigma-dp", "1e-5", *PAPER)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "add/remove one user" in out and "Poisson sampling" in out and "delta = 1e-09" in out
    rows = {
        parts[0]: parts[1]
        for parts in map(str.split, out.splitlines())
        if parts and parts[0] in ("rdp", "prv", "pld")
    }
    # independent references: Google's dp-accounting RDP and PLD on the same plan
    event = dp_accounting.PoissonSampledDpEvent(
        204_800 / 6_950_600, dp_accounting.GaussianDpEvent(2.048)
    )
    rdp_ref = dpa_rdp.RdpAccountant()
    pld_ref = dpa_pld.PLDAccountant(value_discretization_interval=1e-4)
    rdp_ref.compose(event, 2006)
    pld_ref.compose(event, 2006)
    assert float(rows["rdp"]) == pytest.approx(rdp_ref.get_epsilon(1e-9), rel=0.02)
    assert float(rows["prv"]) == pytest.approx(pld_ref.get_epsilon(1e-9), rel=0.02)
    assert float(rows["pld"]) == pytest.approx(pld_ref.get_epsilon(1e-9), rel=0.02)


def test_budget_json_and_extrapolation(capsys):
    code = main(
        [
            "budget",
            "--sigma-dp",
            "1e-5",
            "--cohort",
            "1024",
            "--population",
            "34753",
            "--rounds",
            "2006",
            "--delta",
            "1e-9",
            "--extrapolate",
            "200",
            "204800:69506000",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {row["accountant"]: row for row in report["accountants"]}
    assert by_name["rdp"]["epsilon"] > 1e5  # the real cohort: meaningless epsilon
    assert "refuses" in by_name["prv"]["refused"] and "refuses" in by_name["pld"]["refused"]
    ext = report["extrapolation"]
    assert ext["accountant"] == "rdp"
    first, second = ext["rows"]
    assert (first["cohort"], first["population"]) == (204_800, 6_950_600)
    assert first["epsilon"] == pytest.approx(4.5, abs=0.1)
    assert second["scale"] == "200:2000" and second["noise_multiplier"] == pytest.approx(2.048)
    assert report["assumptions"]["adjacency"] == "add/remove one user"


def test_budget_target_epsilon(capsys):
    code = main(["budget", "--target-epsilon", "4.44", "--accountants", "rdp", *PAPER, "--json"])
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)["accountants"]
    assert row["noise_multiplier"] == pytest.approx(2.048, rel=0.01)
    assert row["sigma_dp"] == pytest.approx(1e-5, rel=0.01)


def test_budget_prints_the_noise_in_the_three_conventions(capsys):
    """dpfl's z on the sum, the paper's sigma_DP = z/S on the average, ml-pfl4asr's dp_sigma =
    C*sigma_DP: paper.toml's noise (z = 0.01024, S = 1024, C = 0.01) read all three ways."""
    args = ["budget", "-z", "0.01024", "--cohort", "1024", "--population", "34753", "-T", "10"]
    assert main([*args, "--accountants", "rdp", "--clip-norm", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "z = 0.01024: std z*C on the sum of clipped updates (dpfl)" in out
    assert "sigma_DP = z/S = 1e-05: std sigma_DP*C on the average" in out
    assert "dp_sigma = C*sigma_DP = 1e-07 with C = 0.01 (ml-pfl4asr's config)" in out
    assert main([*args, "--accountants", "rdp", "--clip-norm", "0.01", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["sigma_dp"] == pytest.approx(1e-5) and plan["dp_sigma"] == pytest.approx(1e-7)
    assert main([*args, "--accountants", "rdp"]) == 0  # without C: no absolute figure
    assert "dp_sigma" not in capsys.readouterr().out
    target = ["budget", "--target-epsilon", "4.44", "--accountants", "rdp", *PAPER]
    assert main([*target, "--clip-norm", "0.01"]) == 0
    assert "dp_sigma" in capsys.readouterr().out  # a column beside z and sigma_DP
    assert main([*args, "--clip-norm", "0"]) == 2
    assert "--clip-norm must be > 0" in capsys.readouterr().err


def test_an_accountant_that_refuses_is_reported_not_fatal(capsys):
    args = ["budget", "--target-epsilon", "1e4", "-q", "0.1", "-T", "10", "--delta", "1e-5"]
    assert main([*args, "--accountants", "rdp,pld", "--json"]) == 0
    rdp, pld = json.loads(capsys.readouterr().out)["accountants"]
    assert rdp["noise_multiplier"] < 0.1
    assert "already met at noise multiplier 0.1" in pld["refused"]


def test_every_accountant_refusing_exits_one_with_the_table(capsys):
    args = ["budget", "-z", "0.01", "-q", "0.03", "-T", "2000", "--delta", "1e-9"]
    assert main([*args, "--accountants", "prv,pld"]) == 1
    assert main([*args, "--accountants", "prv,pld,rdp"]) == 0
    assert "refuses" in capsys.readouterr().out


def test_json_is_strict_even_for_unbounded_epsilon(capsys):
    assert (
        main(
            [
                "budget",
                "-z",
                "0",
                "-q",
                "0.1",
                "-T",
                "10",
                "--delta",
                "1e-5",
                "--json",
                "--accountants",
                "rdp,rdp",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [r["epsilon"] for r in report["accountants"]] == ["inf"]  # deduplicated, inf as text


def test_default_delta_follows_population(capsys):
    assert (
        main(
            [
                "budget",
                "-z",
                "1.0",
                "-S",
                "100",
                "-K",
                "34753",
                "-T",
                "10",
                "--accountants",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["plan"]["delta"] == pytest.approx(1e-9)


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["-z", "1", "-q", "1.5", "-T", "10", "--delta", "1e-5"],
            "--sample-rate must be in (0, 1]",
        ),
        (["-z", "1", "-q", "0", "-T", "10", "--delta", "1e-5"], "--sample-rate must be in (0, 1]"),
        (["-z", "1", "-q", "0.1", "-T", "10", "--delta", "1"], "--delta must be in (0, 1)"),
        (["-z", "1", "-q", "0.1", "-T", "10", "--delta", "0"], "--delta must be in (0, 1)"),
        (
            ["-z", "-1", "-q", "0.1", "-T", "10", "--delta", "1e-5"],
            "--noise-multiplier must be >= 0",
        ),
        (["-z", "x", "-q", "0.1", "-T", "10", "--delta", "1e-5"], "must be a number"),
        (
            ["--target-epsilon", "1e-9", "-q", "0.1", "-T", "10", "--delta", "1e-5"],
            "the top of the calibration search range [0.001, 1e+04]",
        ),
        (["-z", "1", "-q", "0.1", "-T", "10"], "--delta is required"),
        (["-z", "1", "-T", "10", "--delta", "1e-5"], "give --sample-rate"),
        (["-z", "1", "-S", "10", "-K", "5", "-T", "10"], "cannot exceed --population"),
        (
            ["-z", "1", "-q", "0.1", "-T", "10", "--delta", "1e-5", "--accountants", "gdp"],
            "unknown gdp",
        ),
        (["--sigma-dp", "1e-5", "-q", "0.1", "-T", "10", "--delta", "1e-5"], "needs --cohort"),
        (
            ["-z", "1", "-q", "0.1", "-T", "10", "--delta", "1e-5", "--extrapolate", "10"],
            "--extrapolate needs --cohort and --population",
        ),
        (["-z", "1", "-q", "0.1", "--delta", "1e-5"], "required: --rounds"),
        (["-q", "0.1", "-T", "10", "--delta", "1e-5"], "--target-epsilon is required"),
        (
            ["-z", "1", "--sigma-dp", "1e-5", "-q", "0.1", "-T", "10", "--delta", "1e-5"],
            "not allowed with",
        ),
        (["-z", "1", "-q", "0.1", "-T", "1" + "0" * 400, "--delta", "1e-5"], "at most 1e+15"),
        (["-z", "1", "-q", "0.01", "-K", "1" + "0" * 400, "-T", "10"], "at most 1e+15"),
        (
            ["-z", "1", "-S", "10", "-K", "100", "-T", "10", "--extrapolate", "1e306"],
            "need 1 <= cohort <= population",
        ),
        (
            ["-z", "1", "-S", "10", "-K", "100", "-T", "10", "--extrapolate", "1e-300"],
            "need 1 <= cohort <= population",
        ),
        (
            ["-z", "1", "-S", "10", "-K", "100", "-T", "10", "--extrapolate", "inf"],
            "neither a finite scale",
        ),
        (
            ["-z", "1", "-S", "10", "-K", "100", "-T", "10", "--extrapolate", "5:x"],
            "is not COHORT:POPULATION",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, args, needle):
    assert main(["budget", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_bad_input_through_the_console_script():
    res = run_cli("budget", "-z", "1", "-q", "2", "-T", "10", "--delta", "1e-5")
    assert res.returncode == 2
    assert res.stderr.strip() == "dpfl: error: --sample-rate must be in (0, 1], got 2"
    assert res.stdout == ""


def test_simulate_and_report_commands(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--quiet",
            "--population",
            "200",
            "--cohort-size",
            "20",
            "--rounds",
            "3",
            "--examples-per-user",
            "10",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "Poisson sampling" in out
    # every assumption, and whether the epsilon is actual or extrapolated
    assert "epsilon (actual: the 3 rounds charged at the sampling used):" in out
    assert "add/remove one user" in out and "delta:" in out and "under rdp" in out
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        "epsilon (extrapolated, not actual" in out and (run / "metrics.png").stat().st_size > 1000
    )
    assert (run / "epsilon.png").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["simulate", "--lerning-rate", "1"], "unrecognized arguments: --lerning-rate"),
        (["simulate", "--server-optimizer", "adamm"], "server-optimizer = 'adamm'"),
        (["simulate", "--cohort-size", "5000"], "cohort-size = 5000.0: expected a number in"),
        (["simulate", "--config", "/nonexistent.toml"], "does not exist"),
        (["central"], "dpfl central trains speech seed models"),
        (["report", "/nonexistent-run"], "/nonexistent-run does not exist"),
    ],
)
def test_run_commands_reject_bad_input_in_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_audit_command(capsys):
    import json

    from dpfl.cli import main

    assert main(["audit", "--trials", "200", "--modes", "no-noise", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["mode"] == "no-noise" and r["epsilon_lower_bound"] > r["claimed_epsilon"]
    assert main(["audit", "--trials", "200", "--modes", "off"]) == 2
    assert "--modes: unknown off; choose from correct, no-noise, no-clip" in capsys.readouterr().err


# A vectorised cohort trains as one computation; one client at a time, local training is split
# into its batches, its weights in and delta out, its steps, and its clipping.
TRAINING_PHASES = {
    "on": ("local training", "clipping"),
    "off": ("batch building", "weights in/out", "fwd/bwd/step", "clipping"),
}


@pytest.mark.parametrize("vectorize", ["on", "off"])
def test_simulate_profile_prints_a_per_round_breakdown(tmp_path, capsys, vectorize):
    args = ["simulate", "--quiet", "--profile", "--run-dir", str(tmp_path / "run")]
    small = ["--population", "200", "--cohort-size", "20", "--rounds", "3", "--eval-every", "3"]
    noise = ["--noise-multiplier", "1.0", "--target-epsilon", "0", "--vectorize", vectorize]
    assert main([*args, *small, *noise]) == 0
    out = capsys.readouterr().out
    table = out.split("per-round time breakdown")[1].splitlines()
    assert "round 1 ms" in table[1] and "rounds 2-3 ms" in table[1]
    rows = {line[:18].strip(): line[18:].split() for line in table[2:] if line.strip()}
    for phase in (*TRAINING_PHASES[vectorize], "aggregation", "noise", "accounting"):
        assert phase in rows, (phase, table)
    other = {p for ps in TRAINING_PHASES.values() for p in ps} - set(TRAINING_PHASES[vectorize])
    assert not other & set(rows), table
    # phases never overlap: what they do not cover ("other") cannot be negative, and the
    # training phases are a real share of the round
    ms = {k: float(v[1]) for k, v in rows.items()}  # rounds 2-3
    assert ms["other"] >= -0.01, table
    assert all(ms[p] > 0 for p in TRAINING_PHASES[vectorize]), table
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]


def test_profile_sections_do_not_nest():
    from dpfl.profiling import profiled, section

    with profiled(sync_cuda=False) as profile:
        with section("data"):
            pass
        with pytest.raises(RuntimeError, match="do not nest"):
            with section("local training"), section("clipping"):
                pass
    assert set(profile.current) >= {"data"}
