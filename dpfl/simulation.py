"""``dpfl.simulate``: a user's own task and data, trained with user-level DP federated learning
in dpfl's in-process simulator, with the (epsilon, delta) its accountants computed.

Two forms:

* ``simulate(task, data, config)``: objects in (a task and a federated dataset following
  :mod:`dpfl.api`), ``config`` a mapping of the same keys as a TOML file or the CLI, or a
  :class:`~dpfl.config.RunConfig`;
* ``simulate(config)``: the config names its task and data (a built-in recipe, or import paths),
  resolved as the CLI resolves them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from dpfl.api import check_dataset, check_task, object_label
from dpfl.config import RunConfig
from dpfl.privacy.accounting import ACCOUNTANTS, AccountantRangeError

log = logging.getLogger(__name__)


class Result(dict):
    """The run's summary (``rounds_run``, ``initial``, ``final``, ``privacy``,
    ``stopped_for_budget``...) with, as attributes:

    Attributes:
        epsilon: accountant name -> epsilon after the rounds run, each computed by that
            accountant for the noise and sampling rate actually charged ({} without DP; an
            accountant that refuses the regime is left out, with the reason in the log).
        delta: the delta of those epsilons (None without DP).
        statement: the privacy statement ``dpfl report`` prints (assumptions included).
        model: the trained ``nn.Module`` (global weights loaded).
        metrics: the per-round rows of ``metrics.jsonl``.
        config: the run's config (population = the dataset's number of users).
        run_dir: the run folder.
    """

    epsilon: dict[str, float]
    delta: float | None
    statement: str
    model: nn.Module
    metrics: list[dict[str, Any]]
    config: RunConfig
    run_dir: str


def _config(config: RunConfig | Mapping[str, Any] | None) -> RunConfig:
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return RunConfig.from_mapping(config)
    raise TypeError(
        f"config: expected a mapping of config keys or a RunConfig, got {type(config).__name__}"
    )


def simulate(
    task: Any,
    data: Any = None,
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_round: int | None = None,
) -> Result:
    """Train ``task`` on ``data`` with DP-FedAvg as ``config`` says; or, called with a config
    alone, what the config names.

    Args:
        task: a task (see :class:`dpfl.api.Task`), or a config (mapping or RunConfig) that
            names its task and data.
        data: a federated dataset (see :class:`dpfl.api.FederatedDataset`; ``dpfl.data``
            builds one from arrays, a torch Dataset or a Hugging Face Dataset). Its number of
            users is the population K, and q = cohort-size / K.
        config: the run's keys, as in a TOML file (``{"rounds": 50, "clip-norm": 1.0, ...}``).
        resume: continue the run in ``run-dir`` from its checkpoint.
        overwrite: replace a run that ``run-dir`` already holds (refused otherwise).
        progress: show a progress bar.
        stop_after_round: end early, as if the process stopped there (tests of resumption).

    Returns:
        a :class:`Result`.

    Raises:
        TypeError: a task or dataset that lacks what dpfl needs.
        ValueError: a bad config value, or a ``population`` that disagrees with the data.
    """
    from dpfl.engines.inprocess import run_in_process

    if data is None and config is None and isinstance(task, (RunConfig, Mapping)):
        from dpfl import recipes

        resolved = recipes.resolve(_config(task))
        task, data, cfg = resolved.task, resolved.dataset, resolved.cfg
    else:
        if data is None:
            raise TypeError("simulate(task, data, config): data is missing")
        cfg = _config(config)
        check_task(task)
        check_dataset(data)
        cfg = _labelled(cfg, task, data)
    summary, run = run_in_process(
        task,
        data,
        cfg,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        stop_after_round=stop_after_round,
    )
    return _result(summary, run)


def _labelled(cfg: RunConfig, task: Any, data: Any) -> RunConfig:
    """The config recording which task and data ran: the import paths of their classes (so the
    run folder says what trained, and a resume with another task or dataset is refused)."""
    from dataclasses import replace

    return replace(cfg, task=object_label(task), data=object_label(data))


def _result(summary: dict[str, Any], run) -> Result:
    from dpfl.client.train import load_weights
    from dpfl.tools.report import statement_lines

    cfg = run.cfg
    result = Result(summary)
    result.config = cfg
    result.run_dir = cfg.run_dir
    result.epsilon, result.delta = {}, None
    if run.spec.accounted and run.state.ledger.rounds:
        result.delta = run.spec.delta
        for name in ACCOUNTANTS:
            try:
                result.epsilon[name] = run.state.ledger.epsilon(run.spec.delta, name).epsilon
            except AccountantRangeError as err:
                log.info("no %s epsilon: %s", name, err)
    result.statement = "\n".join(statement_lines({"config": cfg.to_dict()}, summary))
    load_weights(run.model, run.state.weights())
    result.model = run.model
    path = run.writer.metrics_path
    result.metrics = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )
    return result
