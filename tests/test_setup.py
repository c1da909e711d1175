"""The house rules that keep setup true: README's two commands, CI calling the test one, pins."""

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert (demo, test) == ("make demo", "make test")
    ci = (ROOT / ".ci" / "run").read_text()
    calls = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert any(re.search(rf"(^|\s){re.escape(test)}(\s|$)", line) for line in calls)
    assert "-m" not in ci.split(test, 1)[1].split("\n", 1)[0]  # nothing deselected in CI


def test_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.11.0" in deps and "torchaudio==2.11.0" in deps
    assert any(d.startswith("flwr[simulation]>=1.42,<1.43") for d in deps)


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    """Both Python blocks of the README, as written: your own model first, then the privacy
    core."""
    text = (ROOT / "README.md").read_text()
    own, core = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)  # its run folder
    scope: dict = {}
    exec(compile(own, "README.md", "exec"), scope)
    result, data = scope["result"], scope["data"]
    assert result.config.population == data.num_users >= 90  # K from the data
    assert result.epsilon["rdp"] <= 8.0 and result.delta <= 1 / (10 * data.num_users)
    assert result["final"]["accuracy"] > 0.3  # chance: 0.1
    exec(compile(core, "README.md", "exec"), {})
    assert "EpsilonResult(epsilon=" in capsys.readouterr().out


@pytest.mark.slow
def test_make_demo_runs_the_main_job():
    res = subprocess.run(
        ["make", "--no-print-directory", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    before, after = re.search(r"accuracy: ([\d.]+) before training, ([\d.]+) after", out).groups()
    # README: "takes accuracy from about 0.10 to about 0.85"
    assert float(before) == pytest.approx(0.10, abs=0.05)
    assert float(after) == pytest.approx(0.85, abs=0.07)
    assert "epsilon (actual: the" in out
    eps = float(re.search(r"\n\s+([\d.]+) under rdp", out).group(1))
    assert eps <= 10
    assert (ROOT / "runs/demo/metrics.png").exists() and (ROOT / "runs/demo/epsilon.png").exists()


def test_paper_config_is_the_papers_recipe():
    from dpfl.config import RunConfig
    from dpfl.privacy.mechanisms import sigma_dp_from_noise_multiplier

    cfg = RunConfig.from_toml(ROOT / "configs" / "paper.toml")
    assert (cfg.task, cfg.options("asr").size, cfg.clip_norm, cfg.clip_scheme) == (
        "asr",
        "paper",
        0.01,
        "dim",
    )
    assert cfg.clip_mode == "rescale"  # ml-pfl4asr's clip_layer_grads
    assert (cfg.local_steps, cfg.client_lr, cfg.client_grad_clip) == (10, 0.2, 1.0)
    assert (cfg.server_optimizer, cfg.server_lr, cfg.server_eps) == ("lamb", 0.002, 1e-6)
    assert (cfg.server_schedule, cfg.server_schedule_step_size, cfg.server_schedule_gamma) == (
        "step",
        750,
        0.6,
    )
    assert (cfg.cohort_size, cfg.rounds, cfg.delta, cfg.batch_seconds) == (1024, 2000, 1e-9, 120)
    assert sigma_dp_from_noise_multiplier(cfg.noise_multiplier, cfg.cohort_size) == 1e-5
    RunConfig.from_toml(ROOT / "configs" / "asr-synthetic.toml")  # parses


def test_every_config_file_parses():
    from dpfl.config import RunConfig

    for path in sorted((ROOT / "configs").glob("*.toml")):
        RunConfig.from_toml(path)


def flower_config() -> dict:
    """[tool.flwr.app.config] as Flower reads it: tables flattened to ``table.key``."""
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_flower_app_config_lists_every_config_key():
    """`flwr run --run-config` refuses keys missing from [tool.flwr.app.config] ("Invalid run
    configuration"), so every key of RunConfig must be there for every task to run under Flower."""
    from dpfl.config import RUN_CONTROL_KEYS, RunConfig

    app = flower_config()
    keys = list(RunConfig().to_dict()) + list(RUN_CONTROL_KEYS)
    assert [k for k in keys if k not in app] == []
    assert [k for k in app if k not in keys] == []
    RunConfig.from_mapping({k: v for k, v in app.items() if k not in RUN_CONTROL_KEYS})


def test_flower_app_defaults_are_the_simulators_but_for_the_federations_size():
    """The README says every way of running runs the same round: the Flower app's defaults
    differ from `dpfl simulate`'s only in the size of the federation and the run folder."""
    from dpfl.config import RUN_CONTROL_KEYS, RunConfig

    app = flower_config()
    defaults = RunConfig().to_dict()
    differ = {k for k in defaults if app[k] != defaults[k]}
    assert differ <= {"population", "cohort-size", "rounds", "run-dir"}, differ
    assert all(app[k] is False for k in RUN_CONTROL_KEYS)
