"""dpfl's Flower ServerApp: ``flwr run .`` (simulation or deployment) runs this.

The run configuration is Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden with ``flwr run . <federation> --run-config "key=value ..."``); the keys are the same as
``dpfl simulate``'s, a user's task and data included (``task = "mypkg.digits:make_task"``,
``data = "mypkg.digits:make_data"``, and ``[tool.flwr.app.config.task-options]``). Results go to
the ``run-dir`` folder (give an absolute path: the ServerApp runs in its own process on the
SuperLink's machine). A folder that already holds a run is refused unless the run config sets
``overwrite = true``.

The server needs the model and, to evaluate centrally, a test set: it builds the task and the
dataset (or takes them from :func:`make_server_app`), never a user's training data.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.api import object_label
from dpfl.config import RunConfig
from dpfl.flower.nodes import discover_users, load_node_registry
from dpfl.flower.strategy import DPFedAvg


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
        overwrite = bool(values.pop("overwrite", False))
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
        user_nodes = discover_users(
            grid,
            expected=cfg.population,
            timeout=cfg.round_timeout,
            population=cfg.population,
            registry=registry,
        )
        if not user_nodes:
            raise RuntimeError("no node answered: nothing to train on")
        strategy = DPFedAvg(cfg, user_nodes, task=run_task, dataset=run_data, overwrite=overwrite)
        strategy.start(grid)

    return app


app = make_server_app()
"""The ServerApp for a run config that names its task and data (``dpfl.flower:server_app``)."""
