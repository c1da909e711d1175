"""dpfl's Flower ServerApp: ``flwr run .`` (simulation or deployment) runs this.

The run configuration is Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden with ``flwr run . <federation> --run-config "key=value ..."``); the keys are the same as
``dpfl simulate``'s, a user's task and data included (``task = "mypkg.digits:make_task"``,
``data = "mypkg.digits:make_data"``, and ``[tool.flwr.app.config.task-options]``). Results go to
the ``run-dir`` folder (give an absolute path: the ServerApp runs in its own process on the
SuperLink's machine). A folder that already holds a run is refused unless the run config sets
``overwrite = true`` (start afresh) or ``resume = true``: continue from the folder's last
checkpoint (``checkpoint-every``), after a crash of the ServerApp or the SuperLink, with the
model, the server optimizer, the round, the privacy ledger (attempts released after the
checkpoint are charged again unless the run is reproducible) and the metrics file truncated to
the checkpoint; only ``rounds`` may change, to extend the run. Nodes keep their own state on
their disks (:mod:`dpfl.flower.node_state`).

The server needs the model and, to evaluate centrally, a test set: it builds the task and the
dataset (or takes them from :func:`make_server_app`), never a user's training data.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.api import object_label
from dpfl.config import RUN_CONTROL_KEYS, RunConfig
from dpfl.flower.nodes import NodeDirectory, load_node_registry
from dpfl.flower.strategy import DPFedAvg

START_ATTEMPTS = 3
"""How many round-timeouts the ServerApp keeps asking nodes which user they hold at start."""


def make_server_app(task: Any = None, data: Any = None) -> ServerApp:
    """A ServerApp running dpfl's DP-FedAvg. ``task`` and ``data`` (objects following
    :mod:`dpfl.api`) replace the run config's ``task`` and ``data`` names; left out, they are
    resolved from the run config (a built-in recipe or import paths)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from dpfl import recipes

        logger = logging.getLogger("dpfl")
        if not logger.handlers:  # dpfl's own messages, without turning on every library's INFO
            logger.addHandler(logging.StreamHandler())
            logger.setLevel(logging.INFO)
        values = dict(context.run_config)
        control = {key: bool(values.pop(key, False)) for key in RUN_CONTROL_KEYS}
        overwrite, resume = control["overwrite"], control["resume"]
        if overwrite and resume:
            raise ValueError("overwrite = true and resume = true: choose one")
        if task is not None:
            values["task"] = object_label(task)
        if data is not None:
            values["data"] = object_label(data)
        cfg = RunConfig.from_mapping(values)
        run_task = task if task is not None else recipes.build_task(cfg)
        run_data = data if data is not None else recipes.build_data(cfg)
        cfg = recipes.with_population(cfg, run_data.num_users)
        registry = (
            load_node_registry(cfg.node_registry, cfg.population) if cfg.node_registry else None
        )
        directory = NodeDirectory(cfg.population, registry)
        directory.wait(grid, cfg.population, cfg.round_timeout)
        # Nodes may answer late (after a SuperLink restart they first clear the old run's
        # messages): ask again, up to START_ATTEMPTS round-timeouts, until one answers.
        for attempt in range(START_ATTEMPTS):
            directory.refresh(grid, cfg.round_timeout)
            if directory.user_nodes:
                break
            logging.getLogger("dpfl").warning(
                "no node has said which user it holds yet (attempt %d of %d)",
                attempt + 1,
                START_ATTEMPTS,
            )
        else:
            raise RuntimeError(
                f"no node answered within {START_ATTEMPTS} x round-timeout "
                f"({cfg.round_timeout:g} s): nothing to train on"
            )
        strategy = DPFedAvg(
            cfg,
            directory.user_nodes,
            task=run_task,
            dataset=run_data,
            overwrite=overwrite,
            resume=resume,
            directory=directory,
        )
        strategy.start(grid)

    return app


app = make_server_app()
"""The ServerApp for a run config that names its task and data (``dpfl.flower:server_app``)."""
