"""What a newcomer meets first: crashes, silent wrong answers and unhelpful messages that a first
walk through dpfl found, each pinned by a test (the CLI as a user runs it, and run folders)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpfl.cli import build_parser, main
from dpfl.config import RunConfig
from dpfl.privacy.accounting import PRV_EPS_ERROR, compute_epsilon
from dpfl.simulation import simulate
from dpfl.tools.report import load_run, panel_keys, statement_lines

DPFL = str(Path(sys.executable).with_name("dpfl"))
# A small, fast run of the embedded synthetic task.
SMALL = ["--population", "100", "--cohort-size", "10", "--examples-per-user", "10", "--quiet"]
SMALL_KEYS = {"population": 100, "cohort-size": 10.0, "examples-per-user": 10, "rounds": 3}


def small_config(run_dir: Path, **over) -> RunConfig:
    return RunConfig.from_mapping({**SMALL_KEYS, "run-dir": str(run_dir), **over})


# --- crashes -------------------------------------------------------------------------------


def test_clipped_run_without_noise_finishes_and_reports_infinite_epsilon(tmp_path, capsys):
    run = tmp_path / "noiseless"
    code = main(
        ["simulate", "--target-epsilon", "0", "--rounds", "2", *SMALL, "--run-dir", str(run)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "no noise: epsilon = inf" in out
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no noise: epsilon = inf" in out and "clipped (dim C=0.5" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon"]["rdp"]["epsilon"] == "inf"


def test_report_on_a_file_is_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["report", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a run folder" in err and str(tmp_path) in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_prints_where_the_last_checkpoint_is_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [DPFL, "simulate", *SMALL, "--rounds", "100000", "--checkpoint-every", "1"]
        + ["--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "checkpoint.pt").exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"last checkpoint {run / 'checkpoint.pt'} (round " in err and "--resume" in err
    assert len([line for line in err.splitlines() if line.startswith("interrupted")]) == 1


def test_interrupt_message_without_a_checkpoint(tmp_path):
    from dpfl.cli import _checkpoint_line

    line = _checkpoint_line(small_config(tmp_path / "none"))
    assert "no checkpoint (checkpoint-every = 0)" in line and "cannot be resumed" in line


# --- silent wrong answers ------------------------------------------------------------------


def test_delta_at_or_above_one_over_population_is_refused_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["simulate", *SMALL, "--rounds", "1", "--delta", "0.5", "--run-dir", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "delta = 0.5 is >= 1/population (1/100)" in err and "allow-large-delta" in err
    assert not run.exists()
    assert main([*args, "--allow-large-delta", "true"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: delta = 0.5 >= 1/population" in out


def test_budget_warns_about_a_large_delta_in_the_result_lines(capsys):
    args = ["budget", "-z", "1.0", "--cohort", "20", "--population", "200", "--rounds", "10"]
    assert main([*args, "--delta", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["rdp"], ["prv"], ["pld"])]
    assert len(rows) == 3 and all("WARNING: delta >= 1/population" in r for r in rows)
    assert "WARNING:   delta = 0.5 >= 1/population" in out
    assert main([*args, "--delta", "1e-4"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_prv_slack_is_noted_when_it_is_comparable_to_epsilon(capsys):
    small = compute_epsilon(60.0, 0.1, 10, 1e-5, "prv")
    assert small.epsilon < 10 * PRV_EPS_ERROR
    assert "error bound" in small.note and "of epsilon" in small.note
    large = compute_epsilon(1.0, 0.1, 100, 1e-5, "prv")
    assert large.epsilon > 1 and large.note is None
    assert compute_epsilon(60.0, 0.1, 10, 1e-5, "rdp").note is None
    args = ["budget", "-z", "60", "-q", "0.1", "--rounds", "10", "--delta", "1e-5"]
    assert main(args) == 0
    prv = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("prv"))
    assert "error bound" in prv


def test_an_existing_run_folder_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["simulate", *SMALL, "--rounds", "1", "--checkpoint-every", "1", "--run-dir", str(run)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--overwrite", "--resume"]) == 2


def test_resume_keeps_the_initial_evaluation(tmp_path):
    cfg = small_config(tmp_path / "run", **{"checkpoint-every": 1, "noise-multiplier": 1.0})
    first = simulate(cfg, progress=False, stop_after_round=2)
    resumed = simulate(cfg, progress=False, resume=True)
    assert resumed["rounds_run"] == 3
    assert resumed["initial"] == first["initial"] and resumed["initial"]["accuracy"] > 0
    lines = statement_lines({}, json.loads((tmp_path / "run" / "summary.json").read_text()))
    assert any("before training" in line for line in lines)


def test_resume_names_the_keys_that_differ(tmp_path):
    cfg = small_config(tmp_path / "run", **{"checkpoint-every": 1})
    simulate(cfg, progress=False, stop_after_round=1)
    changed = small_config(
        tmp_path / "run", **{"checkpoint-every": 1, "clip-norm": 1.0, "client-lr": 0.2}
    )
    with pytest.raises(ValueError) as err:
        simulate(changed, progress=False, resume=True)
    assert "clip-norm: 0.5 -> 1.0" in str(err.value) and "client-lr: 0.1 -> 0.2" in str(err.value)
    shorter = small_config(tmp_path / "run", **{"checkpoint-every": 1, "rounds": 2})
    with pytest.raises(ValueError, match="extend its 3 planned rounds, not shorten"):
        simulate(shorter, progress=False, resume=True)


def test_a_finished_run_can_be_extended_without_recalibrating(tmp_path, capsys):
    run = tmp_path / "run"
    keys = {"checkpoint-every": 2, "target-epsilon": 0.0, "noise-multiplier": 0.8}
    first = simulate(small_config(run, **keys), progress=False)
    assert first["rounds_run"] == 3  # the final checkpoint is written at round 3
    z = json.loads((run / "config.json").read_text())["noise_multiplier"]
    extended = simulate(small_config(run, **keys, rounds=5), progress=False, resume=True)
    p = extended["privacy"]
    assert extended["rounds_run"] == 5 and p["rounds_extended_from"] == [3]
    assert p["noise_multiplier"] == z
    expected = compute_epsilon(z, 0.1, 5, p["delta"]).epsilon
    assert p["epsilon"]["rdp"]["epsilon"] == pytest.approx(expected)
    assert main(["report", str(run), "--no-plots"]) == 0
    assert "run: 5 of 5 rounds (planned 3, extended to 5)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="extend its 5 planned rounds, not shorten"):
        simulate(small_config(run, **keys, rounds=4), progress=False, resume=True)


def test_an_extension_keeps_the_calibrated_noise_and_the_budget_stop(tmp_path):
    run = tmp_path / "run"
    keys = {"checkpoint-every": 1, "target-epsilon": 4.0}
    first = simulate(small_config(run, **keys), progress=False)
    z = first["privacy"]["noise_multiplier"]
    extended = simulate(small_config(run, **keys, rounds=6), progress=False, resume=True)
    # z was calibrated to spend 4.0 in 3 rounds: the extension keeps it, so the budget stops it
    assert extended["privacy"]["noise_multiplier"] == z
    assert extended["stopped_for_budget"] and extended["rounds_run"] == 3
    assert extended["privacy"]["epsilon"]["rdp"]["epsilon"] <= 4.0


# --- the newcomer's path -------------------------------------------------------------------


def test_cli_shows_dpfl_info_lines_unless_quiet(tmp_path, capsys):
    base = ["simulate", "--population", "50", "--cohort-size", "5", "--rounds", "1"]
    base += ["--examples-per-user", "5", "--vectorize", "off"]
    assert main([*base, "--run-dir", str(tmp_path / "a")]) == 0
    assert "I dpfl: training clients one by one: vectorize = 'off'" in capsys.readouterr().err
    assert main([*base, "--quiet", "--run-dir", str(tmp_path / "b")]) == 0
    assert "one by one" not in capsys.readouterr().err
    assert main([*base, "-v", "--quiet", "--run-dir", str(tmp_path / "c")]) == 0
    assert "one by one" in capsys.readouterr().err  # -v wins


def test_unknown_flags_and_keys_suggest_the_closest_names(tmp_path, capsys):
    assert main(["simulate", "--clip-nrom", "1"]) == 2
    err = capsys.readouterr().err
    assert "--clip-nrom: did you mean --clip-norm" in err and len(err) < 300
    toml = tmp_path / "run.toml"
    toml.write_text("clip-nrom = 1.0\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'clip-nrom'; did you mean 'clip-norm', " in err and len(err) < 300
    assert main(["simulate", "--clip-scheme", "dimm"]) == 2
    assert "did you mean 'dim'" in capsys.readouterr().err


def test_a_mistyped_task_is_named_first(capsys):
    assert main(["simulate", "--task", "clasification"]) == 2
    err = capsys.readouterr().err
    assert "config key task = 'clasification'" in err and "did you mean 'classification'" in err
    assert "norm" not in err


def test_every_argument_of_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    for name, p in sub.choices.items():
        missing = [a.dest for a in p._actions if not a.help]
        assert missing == [], f"dpfl {name}: no help for {missing}"
    audit_help = sub.choices["audit"].format_help()
    assert "95%" in audit_help and "%%" not in audit_help


def test_audit_checks_every_mode_before_any_work(capsys, monkeypatch):
    import dpfl.tools.audit as audit

    ran = []
    monkeypatch.setattr(audit, "run_audit", lambda *args: ran.append(args))
    assert main(["audit", "--modes", "correct,no-nosie"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no-nosie" in err and "did you mean 'no-noise'" in err
    assert ran == []  # the valid mode listed first did not run either


def test_report_plots_every_metric_the_target_and_compares_runs(tmp_path, capsys):
    runs = []
    for name, target in (("eps2", 2.0), ("eps8", 8.0)):
        run = tmp_path / name
        simulate(small_config(run, **{"target-epsilon": target}), progress=False)
        runs.append(str(run))
    _, metrics, summary = load_run(runs[0])
    assert panel_keys(metrics, summary["metric"]) == ["eval_accuracy", "eval_loss"]
    assert main(["report", *runs, "--out", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    for run in runs:
        assert f"wrote {run}/metrics.png" in out and f"wrote {run}/epsilon.png" in out
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    assert f"wrote {tmp_path / 'cmp.png'}" in out


def test_report_refuses_to_compare_runs_of_different_metrics(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    simulate(small_config(a, rounds=1), progress=False)
    simulate(small_config(b, rounds=1), progress=False)
    summary = json.loads((b / "summary.json").read_text())
    summary["metric"] = "wer"
    (b / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 2
    assert "different metrics" in capsys.readouterr().err
