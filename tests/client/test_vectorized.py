"""The vectorised cohort path equals the sequential one, client by client and for whole runs."""

import logging

import pytest
import torch

from dpfl.api import TensorData
from dpfl.client.train import LocalTrainConfig, global_weights, local_update
from dpfl.client.vectorized import cohort_updates, why_not
from dpfl.config import RunConfig
from dpfl.models.optimizers import OptimizerOptions
from dpfl.privacy.clipping import ClipConfig
from dpfl.recipes.classification import ClassificationTask
from dpfl.simulation import simulate


def setting(sizes=(7, 20, 13, 1, 0)):
    torch.manual_seed(0)
    task = ClassificationTask(hidden=(16, 16))
    model = task.build_model()
    g = torch.Generator().manual_seed(1)
    datas = [
        TensorData(
            {"x": torch.randn(n, 32, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}
        )
        for n in sizes
    ]  # fmt: skip
    return task, model, global_weights(model), datas


CASES = [
    ("sgd", OptimizerOptions(), 0.1),
    ("sgd", OptimizerOptions(momentum=0.9, weight_decay=0.01), 0.05),
    ("adam", OptimizerOptions(eps=1e-8, weight_decay=0.01), 0.005),
]


@pytest.mark.parametrize("optimizer, options, lr", CASES)
@pytest.mark.parametrize(
    "clip", [None, ClipConfig(0.3, "flat", "clip"), ClipConfig(0.3, "dim", "clip")]
)
@pytest.mark.parametrize("steps, grad_clip", [(0, 0.0), (6, 1.0)])
def test_each_client_matches_the_sequential_update(optimizer, options, lr, clip, steps, grad_clip):
    task, model, w, datas = setting()  # unequal sizes, one client without data
    cfg = LocalTrainConfig(
        epochs=2, steps=steps, batch_size=4, lr=lr, optimizer=optimizer, options=options,
        grad_clip=grad_clip,
    )  # fmt: skip
    seeds = [11, 12, 13, 14, 15]
    vec = cohort_updates(model, task, w, datas, cfg, seeds, clip)
    for k, data in enumerate(datas):
        seq = local_update(model, task, w, data, cfg, seeds[k], clip)
        assert vec[k].steps == seq.steps and vec[k].num_examples == seq.num_examples
        for n in w:
            torch.testing.assert_close(vec[k].delta[n], seq.delta[n], atol=1e-5, rtol=0)
        if seq.steps:
            assert vec[k].train_loss == pytest.approx(seq.train_loss, abs=1e-5)
        if clip is not None:
            assert vec[k].clip_stats.norm == pytest.approx(seq.clip_stats.norm, rel=1e-5)


def test_what_cannot_be_vectorised_says_why():
    task, model, _, _ = setting()
    cfg = LocalTrainConfig()
    assert why_not(model, task, cfg) is None
    assert "optimizer 'lion'" in why_not(model, task, LocalTrainConfig(optimizer="lion"))
    assert "running statistics" in why_not(
        ClassificationTask(norm="batchnorm").build_model(), task, cfg
    )
    assert "private" in why_not(model, task, cfg, private=lambda n: False)


    class PixelMean:  # averages over something else than examples, with no per-example loss
        def loss_count(self, batch):
            return 1.0

    assert "loss_count" in why_not(model, PixelMean(), cfg)


def run(tmp_path, name, **over):
    cfg = RunConfig.from_mapping({
        "population": 200, "cohort-size": 40, "rounds": 4, "examples-per-user": 20,
        "server-lr": 0.1, "noise-multiplier": 0.7, "target-epsilon": 0.0, "noise-seed": 9,
        "sampling-seed": 2, "run-dir": str(tmp_path / name), **over,
    })  # fmt: skip
    summary = simulate(cfg, progress=False)
    return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    "over", [{}, {"client-optimizer": "adam", "client-lr": 0.003, "clip-scheme": "flat"}]
)
def test_a_vectorised_run_ends_with_the_sequential_model(tmp_path, over):
    s_vec, vec = run(tmp_path, "vec", vectorize="on", **{"vectorize-chunk": 16}, **over)
    s_seq, seq = run(tmp_path, "seq", vectorize="off", **over)
    if not over:  # SGD: within 1e-5 everywhere
        for n in seq:
            torch.testing.assert_close(vec[n], seq[n], atol=1e-5, rtol=0)
    else:
        # Adam divides by sqrt(v): a weight whose gradient is ~0 (a ReLU at its kink) can take
        # a full-size step in one path and none in the other, from float rounding alone. All
        # but a handful of weights agree within 1e-5, every one within 1e-4.
        diff = torch.cat([(vec[n] - seq[n]).abs().reshape(-1) for n in seq])
        assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() < 1e-4
    assert s_vec["privacy"]["text"] == s_seq["privacy"]["text"]


def test_auto_falls_back_with_one_log_line_and_on_refuses(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dpfl.engines.inprocess"):
        run(tmp_path, "lion", **{"client-optimizer": "lion", "client-lr": 0.001, "rounds": 1})
    lines = [r.getMessage() for r in caplog.records if "one by one" in r.getMessage()]
    assert lines == [
        "training clients one by one: optimizer 'lion' has no vectorised form (only sgd, adam)"
    ]
    with pytest.raises(ValueError, match="vectorize = 'on': cannot vectorise here: optimizer"):
        run(tmp_path, "lion-on", vectorize="on", **{"client-optimizer": "lion", "rounds": 1})


def test_device_knobs_fall_back_to_the_sequential_path():
    import dataclasses

    task = ClassificationTask(hidden=(16,))
    model = task.build_model()
    assert why_not(model, task, LocalTrainConfig()) is None
    bf16 = dataclasses.replace(LocalTrainConfig(), precision="bf16")
    assert "float32 only" in why_not(model, task, bf16)
    micro = dataclasses.replace(LocalTrainConfig(), micro_batch_size=4)
    assert "micro-batching" in why_not(model, task, micro)


@pytest.mark.parametrize("epochs,batch", [(1, 10), (3, 8), (2, 40)])
def test_batch_plan_is_the_sequential_batches(epochs, batch):
    from dpfl.client.train import batches
    from dpfl.client.vectorized import _plan
    from dpfl.data import SyntheticClassification

    data = SyntheticClassification(num_users=100, examples_per_user=40)
    users = list(range(0, 100, 7))
    datas = data.users_data(users)
    cfg = LocalTrainConfig(epochs=epochs, batch_size=batch)
    index, mask = _plan(datas, cfg, users)
    expected = [list(batches(d, cfg, torch.Generator().manual_seed(u)))
                for d, u in zip(datas, users, strict=True)]  # fmt: skip
    assert torch.equal(index, torch.stack([torch.stack(p) for p in expected]))
    assert bool(mask.all())


def test_gathering_step_by_step_gives_the_same_result(monkeypatch):
    import dpfl.client.vectorized as vec

    task = ClassificationTask(hidden=(16,))
    model = task.build_model()
    weights = global_weights(model)
    data = [TensorData({"x": torch.randn(n, 32), "y": torch.randint(0, 10, (n,))})
            for n in (20, 13, 20)]  # fmt: skip
    cfg = LocalTrainConfig(epochs=2, batch_size=5, lr=0.1)
    at_once = vec.cohort_updates(model, task, weights, data, cfg, [1, 2, 3])
    monkeypatch.setattr(vec, "GATHER_BYTES", 0)
    by_step = vec.cohort_updates(model, task, weights, data, cfg, [1, 2, 3])
    for a, b in zip(at_once, by_step, strict=True):
        for n in a.delta:
            assert torch.equal(a.delta[n], b.delta[n])
