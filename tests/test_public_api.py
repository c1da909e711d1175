"""A user's own model and data: dpfl.simulate(task, data, config), the same task by import path
from the CLI and TOML, and the errors a newcomer meets."""

from __future__ import annotations

import json
import logging
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpfl
from dpfl.cli import main
from dpfl.data import from_arrays
from dpfl.privacy.accounting import compute_epsilon


class TinyTask:
    """A user's task: no base class, no per-example loss."""

    metric = "accuracy"

    def __init__(self, hidden: int = 8) -> None:
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))

    def loss(self, model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def evaluate(self, model, data):
        logits = model(data.tensors["x"])
        return {"accuracy": float((logits.argmax(1) == data.tensors["y"]).float().mean())}


def make_task(hidden: int = 8) -> TinyTask:
    return TinyTask(hidden)


def make_data(users: int = 100, per_user: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3))
    x = rng.normal(size=(users * per_user + 60, 4)).astype(np.float32)
    y = (x @ w).argmax(1)
    n = users * per_user
    return from_arrays(
        {"x": x[:n], "y": y[:n]},
        users=np.repeat(np.arange(users), per_user),
        test={"x": x[n:], "y": y[n:]},
    )


BASE = {"rounds": 3, "cohort-size": 20, "clip-norm": 1.0, "target-epsilon": 4.0,
        "batch-size": 3, "client-lr": 0.2, "sampling-seed": 1, "noise-seed": 2}  # fmt: skip


def test_k_is_the_datasets_users_and_epsilon_is_the_accountants_for_that_q(tmp_path):
    result = dpfl.simulate(TinyTask(), make_data(), {**BASE, "run-dir": str(tmp_path / "r")},
                           progress=False)  # fmt: skip
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["config"]["population"] == 100 and result.config.population == 100
    z = config["charged_noise_multiplier"]
    rounds = result["rounds_run"]
    assert rounds >= 1 and result.delta == config["delta"] <= 1 / (10 * 100)
    assert result.epsilon["rdp"] == pytest.approx(
        compute_epsilon(z, 0.2, rounds, result.delta).epsilon
    )
    assert result.epsilon["rdp"] <= 4.0 and set(result.epsilon) == {"rdp", "prv", "pld"}
    assert "epsilon" in result.statement and "rdp" in result.statement
    assert isinstance(result.model, nn.Module)
    assert [row["round"] for row in result.metrics] == list(range(rounds + 1))
    assert result["final"]["accuracy"] == result.metrics[-1]["eval_accuracy"]
    # the run folder says what ran: the task's and the dataset's classes
    assert config["config"]["task"].endswith(":TinyTask")
    assert config["config"]["data"] == "dpfl.data.adapters:ArrayFederatedDataset"


def test_a_population_that_disagrees_with_the_data_names_both(tmp_path):
    with pytest.raises(ValueError, match="population = 50, but the data has 100 users"):
        dpfl.simulate(TinyTask(), make_data(), {**BASE, "population": 50,
                      "run-dir": str(tmp_path / "r")}, progress=False)  # fmt: skip


def test_bad_tasks_and_data_are_named(tmp_path):
    class NoLoss:
        metric = "accuracy"

        def build_model(self):
            return nn.Linear(4, 3)

        def evaluate(self, model, data):
            return {}

    with pytest.raises(TypeError, match="task 'NoLoss' lacks loss"):
        dpfl.simulate(NoLoss(), make_data(), BASE)
    with pytest.raises(TypeError, match="lacks user_data, test_data, num_users"):
        dpfl.simulate(TinyTask(), [1, 2, 3], BASE)
    with pytest.raises(TypeError, match="config: expected a mapping"):
        dpfl.simulate(TinyTask(), make_data(), 3)


def test_vectorised_cohorts_derive_the_per_example_loss_from_the_users_loss(tmp_path, caplog):
    """TinyTask has no per_example_loss: the simulator derives one, trains the cohort
    vectorised, and gets the one-by-one model."""
    data = make_data(users=30)
    config = {**BASE, "cohort-size": 10, "target-epsilon": 0.0, "noise-multiplier": 0.5}
    with caplog.at_level(logging.INFO, logger="dpfl.engines.inprocess"):
        vec = dpfl.simulate(TinyTask(), data, {**config, "run-dir": str(tmp_path / "v"),
                            "vectorize": "on"}, progress=False)  # fmt: skip
    assert "vectorised" in caplog.text
    seq = dpfl.simulate(TinyTask(), data, {**config, "run-dir": str(tmp_path / "s"),
                        "vectorize": "off"}, progress=False)  # fmt: skip
    for (name, a), b in zip(vec.model.state_dict().items(), seq.model.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.allclose(a, b, atol=1e-5), name


def test_a_loss_that_is_not_a_mean_falls_back_with_the_reason(tmp_path, caplog):
    class Summed(TinyTask):
        def loss(self, model, batch):
            return F.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")

    config = {**BASE, "target-epsilon": 0.0, "noise-multiplier": 0.5, "rounds": 1}
    with caplog.at_level(logging.INFO, logger="dpfl.engines.inprocess"):
        dpfl.simulate(Summed(), make_data(users=30), {**config, "cohort-size": 10,
                      "run-dir": str(tmp_path / "r")}, progress=False)  # fmt: skip
    assert "one by one" in caplog.text and "not the mean of its examples' losses" in caplog.text
    with pytest.raises(ValueError, match="vectorize = 'on'.*not the mean"):
        on = {**config, "cohort-size": 10, "vectorize": "on", "run-dir": str(tmp_path / "o")}
        dpfl.simulate(Summed(), make_data(users=30), on, progress=False)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """This module's task and data as a user's package on sys.path: mypkg.tiny."""
    pkg = tmp_path / "pkgs" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.py").write_text(textwrap.dedent("""
        from tests.test_public_api import TinyTask, make_data

        def make_task(hidden=8):
            return TinyTask(hidden)
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    yield "mypkg.tiny"
    for name in [m for m in sys.modules if m.startswith("mypkg")]:
        del sys.modules[name]


@pytest.mark.long
def test_the_same_task_from_toml_and_the_cli_by_import_path(tmp_path, user_package):
    toml = tmp_path / "run.toml"
    toml.write_text(textwrap.dedent(f"""
        task = "{user_package}:make_task"
        data = "{user_package}:make_data"
        run-dir = "{tmp_path / 'toml'}"
        rounds = 3
        cohort-size = 20
        clip-norm = 1.0
        target-epsilon = 4.0
        batch-size = 3
        client-lr = 0.2
        sampling-seed = 1
        noise-seed = 2

        [task-options]
        hidden = 6
        users = 100
    """))
    assert main(["simulate", "--config", str(toml), "-q"]) == 0
    python = dpfl.simulate(TinyTask(6), make_data(100), {**BASE, "run-dir": str(tmp_path / "py")},
                           progress=False)  # fmt: skip
    from_toml = torch.load(tmp_path / "toml" / "model.pt", weights_only=True)
    for name, value in python.model.state_dict().items():
        assert torch.allclose(from_toml[name], value, atol=1e-6), name
    # the CLI's table flag, and the Python form that names the task by path
    assert main(["simulate", "--config", str(toml), "--task-options.hidden", "4", "--run-dir",
                 str(tmp_path / "cli"), "-q"]) == 0  # fmt: skip
    assert torch.load(tmp_path / "cli" / "model.pt", weights_only=True)["0.weight"].shape == (4, 4)
    named = dpfl.simulate({**BASE, "task": f"{user_package}:make_task", "data":
                           f"{user_package}:make_data", "task-options": {"hidden": 6},
                           "run-dir": str(tmp_path / "named")}, progress=False)  # fmt: skip
    assert named.epsilon == python.epsilon


def test_import_paths_that_do_not_resolve_say_which_part(tmp_path, user_package, capsys):
    def error(*extra):
        assert main(["simulate", "--run-dir", str(tmp_path / "x"), *extra]) == 2
        return capsys.readouterr().err

    err = error("--task", "nopkg.tiny:make_task", "--data", "nopkg.tiny:make_data")
    assert "cannot import module 'nopkg'" in err
    err = error("--task", f"{user_package}:make_tsak", "--data", f"{user_package}:make_data")
    assert "has no attribute 'make_tsak'" in err and "did you mean 'make_task'" in err
    err = error("--task", f"{user_package}:make_task")
    assert "data must name its federated dataset too" in err
    err = error("--task", "mypkg.tiny-make_task")
    assert "config key task" in err
    err = error("--task", f"{user_package}:make_task", "--data", f"{user_package}:make_data",
                "--task-options.hiden", "3")  # fmt: skip
    assert "task-options: hiden taken by neither" in err
    err = error("--task", "classification", "--task-options.x", "1")
    assert "task-options (x) is for tasks and data given by import path" in err
    err = error("--task", f"{user_package}:make_task", "--data", f"{user_package}:make_data",
                "--norm", "layernorm")  # fmt: skip
    assert "builds its own model" in err


def test_a_data_factory_that_takes_user_builds_only_that_user(tmp_path, monkeypatch):
    from dpfl.config import RunConfig
    from dpfl.recipes import build_data

    pkg = tmp_path / "onepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        built = []

        def make_data(users=5, user=None):
            built.append(user)
            return ("one", user) if user is not None else ("all", users)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import onepkg

    cfg = RunConfig.from_mapping({"task": "onepkg:make_task", "data": "onepkg:make_data"})
    with pytest.raises(TypeError):  # not a dataset: the factory is called, then checked
        build_data(cfg, user=3)
    assert onepkg.built == [3]
    del sys.modules["onepkg"]
