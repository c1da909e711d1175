import math

import pytest
import torch

from dpfl.client.train import LocalTrainConfig, global_weights, local_update
from dpfl.data import SyntheticClassification
from dpfl.privacy.clipping import ClipConfig
from dpfl.recipes.classification import ClassificationTask

TASK = ClassificationTask()
DATA = SyntheticClassification(num_users=10, examples_per_user=30, seed=3)


def setup():
    torch.manual_seed(0)
    model = TASK.build_model()
    return model, global_weights(model)


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_a_pure_function_of_weights_data_config_and_seed():
    model, w = setup()
    cfg = LocalTrainConfig(epochs=2, batch_size=7, lr=0.1)
    a = local_update(model, TASK, w, DATA.user_data(1), cfg, seed=5)
    local_update(model, TASK, w, DATA.user_data(2), cfg, seed=9)  # the workspace is reused
    again = local_update(model, TASK, w, DATA.user_data(1), cfg, seed=5)
    other_seed = local_update(model, TASK, w, DATA.user_data(1), cfg, seed=6)
    assert torch.equal(flat(a.delta), flat(again.delta))
    assert not torch.equal(flat(a.delta), flat(other_seed.delta))
    assert a.steps == 2 * math.ceil(30 / 7) and a.num_examples == 30
    assert all(t.dtype == torch.float32 for t in a.delta.values())


def test_fixed_steps_and_gradient_clipping():
    model, w = setup()
    res = local_update(model, TASK, w, DATA.user_data(0), LocalTrainConfig(steps=11), seed=1)
    assert res.steps == 11
    tiny = local_update(
        model,
        TASK,
        w,
        DATA.user_data(0),
        LocalTrainConfig(steps=1, lr=1.0, grad_clip=1e-3),
        seed=1,
    )
    # one SGD step with the gradient clipped to 1e-3 moves the weights by at most lr * 1e-3
    assert flat(tiny.delta).norm().item() <= 1e-3 * (1 + 1e-5)


def test_delta_is_clipped_on_the_client():
    model, w = setup()
    cfg = LocalTrainConfig(epochs=3, lr=0.5)
    raw = local_update(model, TASK, w, DATA.user_data(4), cfg, seed=2)
    clip = ClipConfig(0.01, "dim")
    clipped = local_update(model, TASK, w, DATA.user_data(4), cfg, seed=2, clip=clip)
    assert flat(raw.delta).norm().item() > 0.01
    assert flat(clipped.delta).norm().item() <= 0.01 * (1 + 1e-6)
    assert clipped.clip_stats.clipped
    assert clipped.clip_stats.norm == pytest.approx(flat(raw.delta).norm().item(), rel=1e-5)


def test_divergence_is_an_error_not_a_nan_update():
    model, w = setup()
    with pytest.raises(FloatingPointError):
        local_update(model, TASK, w, DATA.user_data(0), LocalTrainConfig(epochs=5, lr=1e30), 1)


@pytest.mark.parametrize("kw", [{"epochs": 0, "steps": 0}, {"batch_size": 0}, {"grad_clip": -1}])
def test_bad_local_config(kw):
    with pytest.raises(ValueError):
        LocalTrainConfig(**kw)
