"""dpfl's Flower ClientApp: one user's local step, as in the simulator.

A node holds one user: ``partition-id`` in its node config (``flower-supernode --node-config
"partition-id=3"``; Flower's simulation sets it per node). Each train message carries the global
weights and the run configuration; the reply carries the user's delta, clipped here when
``clip-location = "client"`` (the default) so an unclipped delta never leaves the device, and
``num-examples``. Non-private diagnostics (loss, pre-clipping norm) are added only when the run
config asks for them (``diagnostics``, off by default under Flower).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client.train import federated_split, load_weights, local_update, private_weights
from dpfl.config import RunConfig
from dpfl.runs import build_dataset, build_task, client_seed, local_config, pick_device

USER_KEY = "partition-id"
PRIVATE_KEY = "dpfl-private-parameters"

app = ClientApp()

# One task, model and dataset per process and configuration: the model is a workspace whose
# weights every message overwrites, so it can be reused across messages.
_workspace: dict[tuple, tuple] = {}


def _user(context: Context) -> int:
    if USER_KEY not in context.node_config:
        raise ValueError(f"this node has no {USER_KEY!r} in its node config")
    return int(context.node_config[USER_KEY])


def _workspace_for(cfg: RunConfig):
    key = tuple(sorted(cfg.to_dict().items()))
    if key not in _workspace:
        _workspace.clear()
        task = build_task(cfg)
        device = pick_device(cfg)
        _workspace[key] = (task, task.build_model().to(device), build_dataset(cfg), device)
    return _workspace[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = ConfigRecord({USER_KEY: _user(context)})
    return Message(content=RecordDict({"info": info}), reply_to=msg)


def handle_train(
    values: dict,
    weights: dict[str, torch.Tensor],
    node_config: dict,
    private: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int], dict[str, torch.Tensor]]:
    """The body of the train handler, without Flower types.

    Returns (delta, metrics, private): ``private`` holds the parameters the task keeps on the
    client (e.g. OFVL-MS's scene-specific ones), to be passed back in the next round; it never
    leaves the node.
    """
    values = dict(values)
    round_number = int(values.pop("server-round"))
    cfg = RunConfig.from_mapping(values)
    if USER_KEY not in node_config:
        raise ValueError(f"this node has no {USER_KEY!r} in its node config")
    user = int(node_config[USER_KEY])
    task, model, dataset, device = _workspace_for(cfg)
    is_private, buffers = federated_split(task, model, cfg.norm_stats)
    if is_private is not None:
        if private:
            load_weights(model, private)
        else:
            load_weights(model, private_weights(task.build_model(), is_private, buffers))
            if hasattr(task, "prepare_private"):
                task.prepare_private(model, dataset.user_data(user))
    clip = cfg.clip_config() if cfg.clip_location == "client" else None
    res = local_update(
        model,
        task,
        {n: w.to(device) for n, w in weights.items()},
        dataset.user_data(user),
        local_config(cfg),
        client_seed(cfg.seed, round_number, user),
        clip,
    )
    metrics: dict[str, float | int] = {"num-examples": res.num_examples}
    if cfg.diagnostics:
        metrics["diag-train-loss"] = res.train_loss
        if res.clip_stats is not None:
            metrics["diag-update-norm"] = res.clip_stats.norm
            metrics["diag-clipped"] = int(res.clip_stats.clipped)
    kept = private_weights(model, is_private, buffers) if is_private is not None else {}
    return (
        res.delta,  # float32 on the CPU, clipped when DP is on
        metrics,
        {n: t.cpu() for n, t in kept.items()},
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    stored = context.state.get(PRIVATE_KEY)
    delta, metrics, private = handle_train(
        dict(msg.content["config"]),
        msg.content["arrays"].to_torch_state_dict(),
        dict(context.node_config),
        stored.to_torch_state_dict() if stored is not None else None,
    )
    if private:
        # kept in the node's state between rounds of this run; never sent
        context.state[PRIVATE_KEY] = ArrayRecord(private)
    return Message(
        content=RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord(metrics)}),
        reply_to=msg,
    )
