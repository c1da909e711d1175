"""A FederatedRun built from a config's names, as the edges (CLI, TOML, Flower) build one."""

from dpfl.loop.run import FederatedRun
from dpfl.recipes import resolve


def federated_run(cfg, **kwargs) -> FederatedRun:
    resolved = resolve(cfg)
    return FederatedRun(resolved.cfg, resolved.task, resolved.dataset, **kwargs)
