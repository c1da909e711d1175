"""dpfl's Flower ServerApp: ``flwr run .`` (simulation or deployment) runs this.

The run configuration is Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden with ``flwr run . <federation> --run-config "key=value ..."``); the keys are the same as
``dpfl simulate``'s. Results go to the ``run-dir`` folder (give an absolute path: the ServerApp
runs in its own process on the SuperLink's machine). A folder that already holds a run is refused
unless the run config sets ``overwrite = true``.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.config import RunConfig
from dpfl.server.strategy import DPFedAvg, discover_users, load_node_registry

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logger = logging.getLogger("dpfl")
    if not logger.handlers:  # dpfl's own messages, without turning on every library's INFO
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    values = dict(context.run_config)
    overwrite = bool(values.pop("overwrite", False))
    cfg = RunConfig.from_mapping(values)
    registry = load_node_registry(cfg.node_registry, cfg.population) if cfg.node_registry else None
    user_nodes = discover_users(
        grid,
        expected=cfg.population,
        timeout=cfg.round_timeout,
        population=cfg.population,
        registry=registry,
    )
    if not user_nodes:
        raise RuntimeError("no node answered: nothing to train on")
    strategy = DPFedAvg(cfg, user_nodes, overwrite=overwrite)
    strategy.start(grid)
