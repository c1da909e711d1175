import pytest
import torch

from dpfl.client.app import handle_train
from dpfl.client.train import global_weights
from dpfl.config import RunConfig
from dpfl.runs import build_task


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
    assert metrics == {"num-examples": 50} and private == {}


def test_client_app_diagnostics_when_asked_and_server_side_clipping():
    values, weights = message_values(diagnostics=True, **{"clip-location": "server"})
    delta, metrics, _ = handle_train(values, weights, {"partition-id": 0})
    assert "diag-train-loss" in metrics and "diag-update-norm" not in metrics
    values, weights = message_values(diagnostics=True)
    _, metrics, _ = handle_train(values, weights, {"partition-id": 0})
    assert metrics["diag-update-norm"] > 0


def test_client_app_needs_its_user():
    values, weights = message_values()
    with pytest.raises(ValueError, match="partition-id"):
        handle_train(values, weights, {})
    with pytest.raises(IndexError, match="not in the population"):
        handle_train(values, weights, {"partition-id": 9})
