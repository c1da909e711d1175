"""dpfl's Flower ClientApp: one user's local step, as in the simulator.

A node holds one user: ``partition-id`` in its node config (``flower-supernode --node-config
"partition-id=3"``; Flower's simulation sets it per node). Each train message carries the global
weights and the run configuration; the reply carries the user's delta, clipped here when
``clip-location = "client"`` (the default) so an unclipped delta never leaves the device, and
``num-examples``. Non-private diagnostics (loss, pre-clipping norm) are added only when the run
config asks for them (``diagnostics``, off by default under Flower).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client.train import local_update
from dpfl.config import RunConfig
from dpfl.runs import build_dataset, build_task, client_seed, local_config, pick_device

USER_KEY = "partition-id"

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    values = dict(msg.content["config"])
    round_number = int(values.pop("server-round"))
    cfg = RunConfig.from_mapping(values)
    user = _user(context)
    task, model, dataset, device = _workspace_for(cfg)
    weights = {n: w.to(device) for n, w in msg.content["arrays"].to_torch_state_dict().items()}
    clip = cfg.clip_config() if cfg.clip_location == "client" else None
    res = local_update(
        model,
        task,
        weights,
        dataset.user_data(user),
        local_config(cfg),
        client_seed(cfg.seed, round_number, user),
        clip,
    )
    metrics = {"num-examples": res.num_examples}
    if cfg.diagnostics:
        metrics["diag-train-loss"] = res.train_loss
        if res.clip_stats is not None:
            metrics["diag-update-norm"] = res.clip_stats.norm
            metrics["diag-clipped"] = int(res.clip_stats.clipped)
    delta = ArrayRecord({n: d.cpu() for n, d in res.delta.items()})
    return Message(
        content=RecordDict({"arrays": delta, "metrics": MetricRecord(metrics)}), reply_to=msg
    )
