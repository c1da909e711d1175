import pytest
import torch

from dpfl.client.train import global_weights
from dpfl.config import RunConfig
from dpfl.flower.client_app import handle_train
from dpfl.recipes import build_task


def message_values(**over):
    cfg = RunConfig.from_mapping({"population": 4, "cohort-size": 2.0, **over})
    torch.manual_seed(cfg.seed)
    weights = global_weights(build_task(cfg).build_model())
    return {**cfg.to_dict(), "server-round": 1}, weights


def test_client_app_sends_only_a_clipped_delta_and_no_diagnostics_when_off():
    values, weights = message_values(diagnostics=False, **{"clip-norm": 0.05})
    delta, metrics, private = handle_train(values, weights, {"partition-id": 2})
    norm = torch.cat([d.reshape(-1) for d in delta.values()]).norm().item()
    assert norm <= 0.05 * (1 + 1e-6)
    assert set(delta) == set(weights) and all(d.dtype == torch.float32 for d in delta.values())
    assert private == {} and metrics["num-examples"] == 50
    assert not any(k.startswith("diag-") for k in metrics)


def test_client_app_diagnostics_when_asked_and_server_side_clipping():
    values, weights = message_values(diagnostics=True, **{"clip-location": "server"})
    delta, metrics, _ = handle_train(values, weights, {"partition-id": 0})
    assert "diag-train-loss" in metrics and "diag-update-norm" not in metrics
    assert len(metrics["diag-layer-norms"]) == len(delta)  # unclipped: the delta's own
    expected = [float(d.double().norm()) for d in delta.values()]
    assert metrics["diag-layer-norms"] == pytest.approx(expected, rel=1e-6)
    values, weights = message_values(diagnostics=True)
    _, metrics, _ = handle_train(values, weights, {"partition-id": 0})
    assert metrics["diag-update-norm"] > 0
    assert len(metrics["diag-layer-norms"]) == len(weights)


def test_client_app_needs_its_user():
    values, weights = message_values()
    with pytest.raises(ValueError, match="partition-id"):
        handle_train(values, weights, {})
    with pytest.raises(IndexError, match="not in the population"):
        handle_train(values, weights, {"partition-id": 9})


def test_norm_statistics_stay_on_the_node_or_travel_clipped():
    """FedBN-style (norm-stats = client): a BatchNorm's running statistics are kept in the
    node's private state, never sent; norm-stats = server: they are part of the clipped delta."""
    from dpfl.client.train import federated_split

    for mode in ("client", "server"):
        cfg = RunConfig.from_mapping({
            "population": 4, "cohort-size": 2.0, "norm": "batchnorm", "norm-stats": mode,
            "clip-norm": 0.05,
        })  # fmt: skip
        torch.manual_seed(cfg.seed)
        task = build_task(cfg)
        model = task.build_model()
        private, buffers = federated_split(task, model, mode)
        assert buffers == ["1.layer.running_mean", "1.layer.running_var"]
        weights = global_weights(model, private, buffers)
        values = {**cfg.to_dict(), "server-round": 1}
        delta, _, kept = handle_train(values, weights, {"partition-id": 1})
        norm = torch.cat([d.reshape(-1) for d in delta.values()]).norm().item()
        assert norm <= 0.05 * (1 + 1e-6)
        if mode == "client":
            assert not set(buffers) & set(delta) and set(kept) == set(buffers)
            assert not torch.equal(kept["1.layer.running_mean"], torch.zeros(64))
        else:
            assert set(buffers) <= set(delta) and kept == {}
            assert delta["1.layer.running_var"].abs().sum() > 0
