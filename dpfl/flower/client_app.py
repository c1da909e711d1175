"""dpfl's Flower ClientApp: one user's local step, as in the simulator.

A node holds one user: ``partition-id`` in its node config (``flower-supernode --node-config
"partition-id=3"``; Flower's simulation sets it per node). Each train message carries the global
weights and the run configuration; the reply carries the user's delta, clipped here when
``clip-location = "client"`` (the default) so an unclipped delta never leaves the device, and
``num-examples``. Non-private diagnostics (loss, pre-clipping norm) are added only when the run
config asks for them (``diagnostics``, off by default under Flower).

Edge devices: a node may set, in its ``--node-config``, where its data lives and what its device
can do (:data:`NODE_KEYS`: device, precision, micro-batching, data folders, whether to report
system metrics); every other run-config key (above all the privacy ones: clip bound, noise,
sampling) comes from the server, and a node that sets one is refused with an error. Unless the
node turns ``system-metrics`` off, replies carry ``sys-steps-per-second``, ``sys-peak-memory-mb``
(CUDA's peak allocation on a GPU, else the process's peak RSS) and ``sys-device-cuda`` (1 or 0):
per-client facts about the device, not covered by DP, and never used by the privacy maths.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.api import hook
from dpfl.client.train import (
    federated_split,
    global_weights,
    load_weights,
    local_update,
    private_weights,
)
from dpfl.config import ALIASES, RunConfig
from dpfl.flower.node_state import STATE_DIR_KEY, NodeStore, RunMark, default_state_dir
from dpfl.flower.nodes import USER_KEY
from dpfl.flower.secagg import (
    ALLOW_REPRODUCIBLE_KEY,
    NONCE_KEY,
    check_plan,
    legacy_fit,
    legacy_reply,
    pop_plan,
    secagg_mod,
    secagg_threshold,
)
from dpfl.loop.run import client_seed, local_config, pick_device
from dpfl.privacy.distributed import encode_update

PRIVATE_KEY = "dpfl-private-parameters"
FLOWER_NODE_KEYS = frozenset({USER_KEY, "num-partitions"})
"""Node-config keys Flower itself uses (the simulation engine sets both)."""
NODE_ONLY_KEYS = frozenset({STATE_DIR_KEY, ALLOW_REPRODUCIBLE_KEY})
"""Node-config keys of the node alone: where it keeps its state between rounds and runs, and
whether it accepts the server's noise-seed for its distributed-DP noise (experiments only)."""
NODE_KEYS = (
    "device",
    "precision",
    "micro-batch-size",
    "micro-batch-seconds",
    "asr.data-dir",
    "localization.scenes-dir",
    "system-metrics",
)
"""Run-config keys a node may override in its node config: where its data lives and what its
device can do. They change how fast and in how much memory a step runs, not what it computes
(micro-batching accumulates the full batch's gradient; precision changes rounding only)."""
PRIVACY_KEYS = frozenset({
    "clip-norm", "clip-scheme", "clip-mode", "clip-location", "noise-multiplier",
    "target-epsilon", "delta", "accountant", "noise-seed", "sampling", "cohort-size",
    "population", "rounds",
})  # fmt: skip
"""Keys the privacy guarantee rests on: named as such when a node tries to set one."""

log = logging.getLogger(__name__)

# One task, model and dataset per process and configuration: the model is a workspace whose
# weights every message overwrites, so it can be reused across messages.
_workspace: dict[tuple, tuple] = {}


def _user(context: Context) -> int:
    return _user_of(context.node_config)


def _workspace_for(cfg: RunConfig, user: int, task=None, data=None):
    """(task, model, dataset, device): the given objects, or those the run config names. A data
    factory by import path that takes a ``user`` argument builds only this node's user."""
    from dpfl import recipes

    key = (tuple(sorted(cfg.to_dict().items())), user, id(task), id(data))
    if key not in _workspace:
        _workspace.clear()
        task = task if task is not None else recipes.build_task(cfg)
        data = data if data is not None else recipes.build_data(cfg, user=user)
        device = pick_device(cfg)
        _workspace[key] = (task, task.build_model().to(device), data, device)
    return _workspace[key]


def node_run_config(cfg: RunConfig, node_config: dict) -> RunConfig:
    """``cfg`` (the server's run config) with this node's overrides of :data:`NODE_KEYS`.

    Raises ValueError for any other key: a privacy key (the clip bound, the noise, the
    sampling...) or a training key must be the same for every client and comes from the server.
    """
    overrides = {}
    known = set(cfg.to_dict())
    flat: dict = {}
    for key, value in node_config.items():  # a TOML table ([asr]) as its dotted keys
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        key = ALIASES.get(key, key)  # data-dir: asr.data-dir
        if key in FLOWER_NODE_KEYS or key in NODE_ONLY_KEYS:
            continue
        if key in NODE_KEYS:
            overrides[key] = value
        elif key in PRIVACY_KEYS:
            raise ValueError(
                f"node config key {key!r} is a privacy setting: it comes from the server's run "
                f"config, never from a node; a node may set only {', '.join(NODE_KEYS)}"
            )
        elif key in known:
            raise ValueError(
                f"node config key {key!r} is set by the server's run config (every client "
                f"trains alike); a node may set only {', '.join(NODE_KEYS)}"
            )
        else:
            raise ValueError(
                f"unknown node config key {key!r}; a node may set {USER_KEY}, num-partitions, "
                f"{STATE_DIR_KEY} and {', '.join(NODE_KEYS)}"
            )
    if not overrides:
        return cfg
    log.info("node config overrides: %s", overrides)
    try:
        return RunConfig.from_mapping(overrides, base=cfg)
    except ValueError as err:
        raise ValueError(f"node config: {err}") from None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocation since the last reset on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def system_metrics(device: torch.device, steps: int, seconds: float) -> dict[str, float | int]:
    """Per-client facts about the device (``sys-*``): numbers, as a MetricRecord holds."""
    return {
        "sys-steps-per-second": steps / seconds if seconds > 0 else 0.0,
        "sys-peak-memory-mb": peak_memory_mb(device),
        "sys-device-cuda": int(device.type == "cuda"),
    }


def handle_train(
    values: dict,
    weights: dict[str, torch.Tensor],
    node_config: dict,
    private: dict[str, torch.Tensor] | None = None,
    task=None,
    data=None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int], dict[str, torch.Tensor]]:
    """The body of the train handler, without Flower types (``task``, ``data``: objects that
    replace the run config's names, as :func:`make_client_app` passes them).

    Returns (delta, metrics, private): ``private`` holds the parameters the task keeps on the
    client (e.g. OFVL-MS's scene-specific ones), to be passed back in the next round; it never
    leaves the node.
    """
    round_number = int(values["server-round"])
    cfg, user, task, model, dataset, device, is_private, buffers = _node_model(
        values, node_config, private, task, data
    )
    clip = cfg.clip_config() if cfg.clip_location == "client" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    res = local_update(
        model,
        task,
        {n: w.to(device) for n, w in weights.items()},
        dataset.user_data(user),
        local_config(cfg),
        client_seed(cfg.seed, round_number, user),
        clip,
    )
    seconds = time.perf_counter() - started  # the delta is on the CPU: the device is done
    metrics: dict[str, Any] = {"num-examples": res.num_examples}
    if cfg.diagnostics:
        metrics["diag-train-loss"] = res.train_loss
        if res.clip_stats is not None:
            metrics["diag-update-norm"] = res.clip_stats.norm
            metrics["diag-clipped"] = int(res.clip_stats.clipped)
        # pre-clip tensor norms, in the update's order (the per-layer ratios)
        metrics["diag-layer-norms"] = (
            list(res.clip_stats.layer_norms)
            if res.clip_stats is not None
            else [float(torch.linalg.vector_norm(t.double())) for t in res.delta.values()]
        )
    if cfg.system_metrics:
        metrics.update(system_metrics(device, res.steps, seconds))
    kept = private_weights(model, is_private, buffers) if is_private is not None else {}
    return (
        res.delta,  # float32 on the CPU, clipped when DP is on
        metrics,
        {n: t.cpu() for n, t in kept.items()},
    )


def handle_evaluate(
    values: dict,
    weights: dict[str, torch.Tensor],
    node_config: dict,
    private: dict[str, torch.Tensor] | None = None,
    task=None,
    data=None,
) -> tuple[int, dict[str, float]]:
    """Federated evaluation on the node: the global ``weights`` (with the node's kept
    parameters and statistics, ``private``) on its user's held-out data; returns (examples,
    the task's metrics). Nothing is trained or kept."""
    _, user, task, model, dataset, device, _, _ = _node_model(
        values, node_config, private, task, data
    )
    held_out = hook(dataset, "user_test_data")
    if held_out is None:
        raise ValueError("federated evaluation: this node's dataset has no user_test_data")
    load_weights(model, {n: w.to(device) for n, w in weights.items()})
    data_u = held_out(user)
    if len(data_u) == 0:
        return 0, {}
    metrics = task.evaluate(model, data_u)
    return len(data_u), {k: float(v) for k, v in metrics.items()}


def _node_model(values: dict, node_config: dict, private, task, data):
    """This node's run config, user and workspace (task, model, dataset, device) for a message,
    with the user's kept parameters and statistics loaded into the model (``private``; the
    first time, fresh ones, prepared from the user's data as the simulator does); also returns
    (is_private, buffers), the split of what the task keeps on the client."""
    values = dict(values)
    RunMark.pop(values)  # the node's own state is the caller's (make_client_app's handlers)
    values.pop("server-round", None)
    cfg = node_run_config(RunConfig.from_mapping(values), node_config)
    user = _user_of(node_config)
    task, model, dataset, device = _workspace_for(cfg, user, task, data)
    is_private, buffers = federated_split(task, model, cfg.norm_stats)
    if is_private is not None:
        if private:
            load_weights(model, private)
        else:
            load_weights(model, private_weights(task.build_model(), is_private, buffers))
            prepare = hook(task, "prepare_private")
            if prepare is not None:
                prepare(model, dataset.user_data(user))
    return cfg, user, task, model, dataset, device, is_private, buffers


def _kept_state(values: dict, context: Context, before: int):
    """(store, state): the user's kept parameters and statistics to start from, the newest from
    before round ``before``: from the node's disk when the server sends a run mark (taken out
    of ``values``), else from ``context.state`` (store None)."""
    mark = RunMark.pop(values)
    if mark is None:
        record = context.state.get(PRIVATE_KEY)
        return None, record.to_torch_state_dict() if record is not None else None
    root = context.node_config.get(STATE_DIR_KEY) or default_state_dir()
    store = NodeStore(root, mark, _user(context))
    return store, store.load(before)


def _user_of(node_config: dict) -> int:
    if USER_KEY not in node_config:
        raise ValueError(f"this node has no {USER_KEY!r} in its node config")
    return int(node_config[USER_KEY])


def handle_secure_train(
    values: dict,
    arrays: list,
    node_config: dict,
    private: dict[str, torch.Tensor] | None = None,
    task=None,
    data=None,
    threshold: int | None = None,
):
    """Distributed DP's client step inside SecAgg+'s masked-vector stage: train, clip, and
    encode the delta as integers modulo 2^b with this client's noise share. Checked first: the
    plan the server sent, SecAgg+'s ``threshold`` (at least min-contributors), and that a
    server's noise-seed is used only where the node's operator allowed it.
    Returns (encoding, private)."""
    values = dict(values)
    plan = pop_plan(values)
    nonce = int(values.pop(NONCE_KEY, 0))
    if plan is None:
        raise ValueError("a SecAgg+ round without an encoding plan")
    if threshold is not None and threshold < plan.min_contributors:
        raise ValueError(
            f"SecAgg+'s reconstruction threshold {threshold} is below min-contributors "
            f"{plan.min_contributors}: a sum with fewer noise shares could be unmasked; refused"
        )
    round_number = int(values["server-round"])
    probe = {k: v for k, v in values.items() if k != "server-round"}
    cfg = node_run_config(RunConfig.from_mapping(probe), node_config)
    if not cfg.distributed:
        raise ValueError("a SecAgg+ round for a run that is not in dp-mode = 'distributed'")
    user = _user_of(node_config)
    run_task, model, _, _ = _workspace_for(cfg, user, task, data)
    is_private, buffers = federated_split(run_task, model, cfg.norm_stats)
    names = list(global_weights(model, is_private, buffers))
    if len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for a model of {len(names)} tensors")
    weights = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays, strict=True)}
    check_plan(plan, cfg, sum(w.numel() for w in weights.values()))
    noise_seed = cfg.noise_seed if cfg.noise_seed >= 0 else None
    if noise_seed is not None and str(node_config.get(ALLOW_REPRODUCIBLE_KEY, "")).lower() not in (
        "1",
        "true",
    ):
        raise ValueError(
            "the server asks for reproducible noise (noise-seed), which lets it recompute this "
            f"node's noise share; refused unless the node sets {ALLOW_REPRODUCIBLE_KEY}=true "
            "in its own node config (experiments only)"
        )
    delta, _, kept = handle_train(values, weights, node_config, private, task=task, data=data)
    encoded = encode_update(delta, plan, cfg.seed, round_number, user, noise_seed, nonce)
    return encoded, kept


def make_client_app(task=None, data=None, mods=None) -> ClientApp:
    """A ClientApp running dpfl's client step for the node's user (``partition-id``).
    ``task`` and ``data`` (objects following :mod:`dpfl.api`) replace the run config's names;
    left out, they are resolved from it. ``mods``: Flower mods to run before dpfl's own (which
    runs SecAgg+ for the rounds of a distributed-DP run)."""
    app = ClientApp(mods=[*(mods or []), secagg_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        info = ConfigRecord({USER_KEY: _user(context)})
        return Message(content=RecordDict({"info": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        legacy = legacy_fit(msg)
        if legacy is not None:  # SecAgg+'s masked-vector stage: distributed DP
            arrays, values = legacy
            round_number = int(values["server-round"])
            store, stored = _kept_state(values, context, before=round_number)
            encoded, private = handle_secure_train(
                values,
                arrays,
                dict(context.node_config),
                stored,
                task=task,
                data=data,
                threshold=secagg_threshold(context),
            )
            if private and store is not None:
                store.save(round_number, private)
            elif private:
                context.state[PRIVATE_KEY] = ArrayRecord(private)
            return legacy_reply(msg, encoded)
        values = dict(msg.content["config"])
        round_number = int(values["server-round"])
        # What the task keeps on the node (never sent): on the node's disk, per round, so that
        # a resumed run (a new `flwr run`) finds it; in context.state for a server that sends
        # no run mark.
        store, stored = _kept_state(values, context, before=round_number)
        delta, metrics, private = handle_train(
            values,
            msg.content["arrays"].to_torch_state_dict(),
            dict(context.node_config),
            stored,
            task=task,
            data=data,
        )
        if private and store is not None:
            store.save(round_number, private)
        elif private:
            context.state[PRIVATE_KEY] = ArrayRecord(private)
        return Message(
            content=RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord(metrics)}),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        values = dict(msg.content["config"])
        _, stored = _kept_state(values, context, before=int(values["server-round"]) + 1)
        examples, metrics = handle_evaluate(
            values,
            msg.content["arrays"].to_torch_state_dict(),
            dict(context.node_config),
            stored,
            task=task,
            data=data,
        )
        record = MetricRecord({"num-examples": examples, **metrics})
        return Message(content=RecordDict({"metrics": record}), reply_to=msg)

    return app


app = make_client_app()
"""The ClientApp for a run config that names its task and data (``dpfl.flower:client_app``)."""
