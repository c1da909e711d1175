"""Clients on small devices: micro-batching with gradient accumulation equals full-batch training,
the per-step gradient clip applies to the accumulated gradient, mixed precision keeps the delta
float32 and clipped, node-level overrides are limited to device keys, and replies carry the
device's figures."""

import dataclasses

import pytest
import torch

from dpfl.client.train import (
    LocalTrainConfig,
    batches,
    global_weights,
    load_weights,
    local_update,
    loss_count,
    micro_batches,
)
from dpfl.config import RunConfig
from dpfl.data import SyntheticClassification
from dpfl.flower.client_app import handle_train, node_run_config
from dpfl.privacy.clipping import ClipConfig
from dpfl.recipes import build_task
from dpfl.recipes.classification import ClassificationTask

TASK = ClassificationTask()
DATA = SyntheticClassification(num_users=4, examples_per_user=23, seed=5)


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def setup(task=TASK, seed=0):
    torch.manual_seed(seed)
    model = task.build_model()
    return model, global_weights(model)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("micro", [1, 3, 4, 10])
def test_micro_batched_training_equals_full_batches(optimizer, micro):
    """Batches of 10 (and a last one of 3) split into micro-batches of unequal sizes (3+3+3+1,
    4+4+2, ...): the accumulated gradient is the full batch's, so the delta is the same."""
    model, w = setup()
    lr = 0.1 if optimizer == "sgd" else 0.01
    cfg = LocalTrainConfig(epochs=2, batch_size=10, lr=lr, optimizer=optimizer)
    full = local_update(model, TASK, w, DATA.user_data(1), cfg, seed=3)
    small = local_update(
        model, TASK, w, DATA.user_data(1), dataclasses.replace(cfg, micro_batch_size=micro), 3
    )
    assert small.steps == full.steps == 2 * 3
    assert flat(full.delta).norm() > 0.01  # it trained
    torch.testing.assert_close(flat(small.delta), flat(full.delta), atol=1e-5, rtol=0)
    assert small.train_loss == pytest.approx(full.train_loss, abs=1e-5)


def test_micro_batches_split_in_order_and_respect_both_limits():
    idx = torch.tensor([7, 2, 5, 0, 9, 4, 1])
    cfg = LocalTrainConfig(micro_batch_size=3)
    parts = micro_batches(idx, DATA.user_data(0), cfg)
    assert [p.tolist() for p in parts] == [[7, 2, 5], [0, 9, 4], [1]]
    assert micro_batches(idx, DATA.user_data(0), LocalTrainConfig())[0] is idx

    class Speech:  # durations in seconds, as speech data has
        durations = [4.0, 1.0, 2.0, 9.0, 1.0]

    speech = torch.tensor([1, 4, 2, 0, 3])  # sorted by duration, as speech batches are
    by_seconds = micro_batches(speech, Speech(), LocalTrainConfig(micro_batch_seconds=4.0))
    # 1+1+2 = 4 s, then 4 s, then the 9 s utterance alone (it cannot be split)
    assert [p.tolist() for p in by_seconds] == [[1, 4, 2], [0], [3]]
    both = micro_batches(
        speech, Speech(), LocalTrainConfig(micro_batch_seconds=4.0, micro_batch_size=2)
    )
    assert [p.tolist() for p in both] == [[1, 4], [2], [0], [3]]
    with pytest.raises(ValueError, match="micro-batch-seconds needs data with durations"):
        micro_batches(idx, DATA.user_data(0), LocalTrainConfig(micro_batch_seconds=4.0))


def test_the_gradient_clip_applies_to_the_accumulated_gradient():
    """One SGD step (lr 1) with grad_clip 1e-3: micro-batched equals full-batch, moves the
    weights by exactly the clip (the batch gradient is far larger), and differs from clipping
    each micro-batch's contribution before summing."""
    model, w = setup()
    clip, data = 1e-3, DATA.user_data(2)
    cfg = LocalTrainConfig(steps=1, batch_size=12, lr=1.0, grad_clip=clip)
    full = local_update(model, TASK, w, data, cfg, seed=4)
    micro_cfg = dataclasses.replace(cfg, micro_batch_size=5)
    micro = local_update(model, TASK, w, data, micro_cfg, seed=4)
    torch.testing.assert_close(flat(micro.delta), flat(full.delta), atol=1e-7, rtol=1e-5)
    assert flat(micro.delta).norm().item() == pytest.approx(clip, rel=1e-4)

    # the wrong way: clip each micro-batch's weighted gradient, then sum
    idx = next(iter(batches(data, micro_cfg, torch.Generator().manual_seed(4))))
    parts = micro_batches(idx, data, micro_cfg)
    load_weights(model, w)
    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in params]
    for part in parts:
        model.zero_grad()
        (TASK.loss(model, data.batch(part)) * len(part) / len(idx)).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        summed = [s + p.grad for s, p in zip(summed, params, strict=True)]
    wrong = -torch.cat([s.reshape(-1) for s in summed])
    assert len(parts) == 3 and wrong.norm().item() > 2 * clip
    assert (wrong - flat(micro.delta)).norm().item() > clip


def test_micro_batch_weights_follow_what_the_loss_averages_over():
    assert loss_count(TASK, {"y": torch.zeros(7)}, 7) == 7.0

    from dpfl.models.localization.task import LocalizationTask

    # OFVL-MS: the mean over the batch's valid pixels
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[0, :2] = True
    assert loss_count(LocalizationTask(), {"valid": valid}, 2) == 8.0

    class Own:
        name = "own"

        def loss_count(self, batch):
            return 42

    assert loss_count(Own(), {}, 3) == 42.0


def test_bf16_keeps_the_delta_float32_and_clipped():
    model, w = setup()
    cfg = LocalTrainConfig(epochs=3, batch_size=10, lr=0.5)
    fp32 = local_update(model, TASK, w, DATA.user_data(3), cfg, seed=1)
    bf16_cfg = dataclasses.replace(cfg, precision="bf16")
    bf16 = local_update(model, TASK, w, DATA.user_data(3), bf16_cfg, seed=1)
    assert all(d.dtype == torch.float32 for d in bf16.delta.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # autocast did run (bf16 rounding), yet the training is the same up to that rounding
    assert not torch.equal(flat(bf16.delta), flat(fp32.delta))
    assert (flat(bf16.delta) - flat(fp32.delta)).norm() < 0.1 * flat(fp32.delta).norm()
    for scheme in ("flat", "dim"):
        c = ClipConfig(0.01, scheme)
        res = local_update(model, TASK, w, DATA.user_data(3), bf16_cfg, seed=1, clip=c)
        assert all(d.dtype == torch.float32 for d in res.delta.values())
        assert flat(res.delta).norm().item() <= 0.01 * (1 + 1e-6)
        assert res.clip_stats.clipped


def test_fp16_needs_cuda_and_bad_precision_or_micro_batching_is_refused():
    model, w = setup()
    cfg = LocalTrainConfig(steps=1, precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"fp16' needs a CUDA device.*'bf16'"):
            local_update(model, TASK, w, DATA.user_data(0), cfg, seed=1)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        LocalTrainConfig(precision="int8")
    with pytest.raises(ValueError, match="micro-batch size must be >= 0"):
        LocalTrainConfig(micro_batch_size=-1)
    with pytest.raises(ValueError, match="micro-batch seconds must be >= 0"):
        LocalTrainConfig(micro_batch_seconds=float("nan"))
    with pytest.raises(ValueError, match="precision"):
        RunConfig.from_mapping({"precision": "fp8"})
    with pytest.raises(ValueError, match="micro-batch-size"):
        RunConfig.from_mapping({"micro-batch-size": -2})


def _speech_data(n=6, seed=0):
    from dpfl.models.asr.text import CharTokenizer
    from dpfl.recipes.asr.data import SpeechData

    g = torch.Generator().manual_seed(seed)
    seconds = [0.6, 1.4, 0.9, 1.1, 0.7, 1.3][:n]
    waves = [0.1 * torch.randn(int(s * 16000), generator=g) for s in seconds]
    texts = ["hello world", "a", "private speech", "edge gpu", "ok", "federated learning"][:n]
    return SpeechData(waves, texts, CharTokenizer())


def test_micro_batched_ctc_training_equals_full_batches():
    """The tiny CTC transformer (no dropout, layer-drop or SpecAugment, whose random draws
    depend on the pass): batches of 4 s of audio split into micro-batches of at most 1.5 s give
    the full batch's steps. CTC averages per utterance, so micro-batches are weighted by their
    utterances. SGD: the micro-batches are padded to other lengths, which changes float
    rounding only; Adam would turn rounding-level differences of near-zero gradient
    coordinates into visible ones (its equality is tested on the classification task)."""
    from dpfl.models.asr.task import ASRTask

    task = ASRTask(dropout=0.0, layerdrop=0.0, spec_augment=False)
    model, w = setup(task)
    data = _speech_data()
    cfg = LocalTrainConfig(steps=2, batch_seconds=4.0, lr=0.01)
    full = local_update(model, task, w, data, cfg, seed=2)
    micro_cfg = dataclasses.replace(cfg, micro_batch_seconds=1.5)
    micro = local_update(model, task, w, data, micro_cfg, seed=2)
    steps = list(batches(data, cfg, torch.Generator().manual_seed(2)))
    sizes = [[len(p) for p in micro_batches(idx, data, micro_cfg)] for idx in steps]
    assert sizes == [[1, 1], [2, 1, 1]]  # it did split, into unequal micro-batches
    assert micro.steps == full.steps == 2 and flat(full.delta).norm() > 0.1
    torch.testing.assert_close(flat(micro.delta), flat(full.delta), atol=1e-5, rtol=0)
    assert micro.train_loss == pytest.approx(full.train_loss, rel=1e-5)


def test_micro_batched_localization_weights_by_valid_pixels(tmp_path):
    """OFVL-MS averages over the batch's valid pixels (plus a parameter penalty): micro-batches
    weighted by their valid pixels give the full batch's step, weighting by frames would not."""
    from dpfl.models.localization.task import LocalizationTask
    from dpfl.recipes.localization.scenes import SceneDataset, render_scene

    render_scene(str(tmp_path), "s", seed=3, train_frames=6, test_frames=1)
    data = SceneDataset(str(tmp_path), ["s"]).user_data(0)
    data.valid[1, : data.valid.shape[1] // 2] = False  # frames with unequal valid pixels
    data.valid[4, :, : data.valid.shape[2] // 3] = False
    counts = [int(data.valid[i].sum()) for i in range(len(data))]
    task = LocalizationTask()
    model, w = setup(task)
    cfg = LocalTrainConfig(steps=1, batch_size=6, lr=0.01)
    full = local_update(model, task, w, data, cfg, seed=1)
    micro = local_update(model, task, w, data, dataclasses.replace(cfg, micro_batch_size=4), 1)
    assert flat(full.delta).norm() > 0
    torch.testing.assert_close(flat(micro.delta), flat(full.delta), atol=1e-6, rtol=1e-5)
    idx = next(iter(batches(data, cfg, torch.Generator().manual_seed(1))))
    parts = micro_batches(idx, data, dataclasses.replace(cfg, micro_batch_size=4))
    valid = [sum(counts[i] for i in p.tolist()) for p in parts]
    assert valid[0] / sum(valid) != len(parts[0]) / len(idx)  # pixels, not frames, matter here


# --- the ClientApp: node overrides and system metrics -------------------------------------------


def message_values(**over):
    cfg = RunConfig.from_mapping({"population": 4, "cohort-size": 2.0, **over})
    torch.manual_seed(cfg.seed)
    weights = global_weights(build_task(cfg).build_model())
    return {**cfg.to_dict(), "server-round": 1}, weights


def test_a_node_sets_its_device_limits_and_they_take_effect():
    values, weights = message_values(diagnostics=False, **{"clip-norm": 0.05})
    node = {"partition-id": 1, "num-partitions": 4}
    base, _, _ = handle_train(values, weights, node)
    micro, _, _ = handle_train(values, weights, {**node, "micro-batch-size": 3})
    torch.testing.assert_close(flat(micro), flat(base), atol=1e-6, rtol=0)
    bf16, metrics, _ = handle_train(values, weights, {**node, "precision": "bf16", "device": "cpu"})
    assert not torch.equal(flat(bf16), flat(base))  # the node's precision was used
    assert flat(bf16).norm().item() <= 0.05 * (1 + 1e-6)
    assert all(d.dtype == torch.float32 for d in bf16.values())
    assert metrics["sys-device-cuda"] == 0
    # the node's data location reaches the dataset
    asr_values, asr_weights = message_values(
        task="asr", **{"data-format": "librispeech", "population": 4}
    )
    with pytest.raises(FileNotFoundError, match="/nonexistent/speaker0"):
        handle_train(asr_values, asr_weights, {**node, "data-dir": "/nonexistent/speaker0"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("clip-norm", 10.0, "'clip-norm' is a privacy setting"),
        ("noise-multiplier", 0.0, "'noise-multiplier' is a privacy setting"),
        ("target-epsilon", 100.0, "'target-epsilon' is a privacy setting"),
        ("batch-size", 2, "'batch-size' is set by the server's run config"),
        ("micro-batchsize", 2, "unknown node config key 'micro-batchsize'"),
    ],
)
def test_a_node_cannot_override_privacy_or_training_keys(key, value, message):
    values, weights = message_values()
    with pytest.raises(ValueError, match=message):
        handle_train(values, weights, {"partition-id": 0, key: value})


def test_bad_node_values_name_the_node_config():
    cfg = RunConfig()
    with pytest.raises(ValueError, match="node config: config key precision"):
        node_run_config(cfg, {"precision": "fp64"})
    with pytest.raises(ValueError, match="node config: config key micro-batch-size"):
        node_run_config(cfg, {"micro-batch-size": -1})
    assert node_run_config(cfg, {"partition-id": 3, "num-partitions": 9}) is cfg
    got = node_run_config(cfg, {"micro-batch-seconds": 30, "data-dir": "/data/s0"})
    assert got.micro_batch_seconds == 30.0 and got.options("asr").data_dir == "/data/s0"
    assert got.clip_norm == cfg.clip_norm


def test_replies_carry_system_metrics_unless_the_node_turns_them_off():
    values, weights = message_values(diagnostics=False)
    _, metrics, _ = handle_train(values, weights, {"partition-id": 2, "device": "cpu"})
    assert metrics["sys-device-cuda"] == 0
    assert metrics["sys-steps-per-second"] > 0
    assert 10 < metrics["sys-peak-memory-mb"] < 1e6  # this process's peak RSS, in MiB
    assert not any(k.startswith("diag-") for k in metrics)
    _, quiet, _ = handle_train(values, weights, {"partition-id": 2, "system-metrics": False})
    assert quiet == {"num-examples": 50}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_cuda_every_precision_sends_a_float32_clipped_delta(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    values, weights = message_values(diagnostics=True, **{"clip-norm": 0.05})
    node = {"partition-id": 1, "device": "cuda", "precision": precision, "micro-batch-size": 3}
    delta, metrics, _ = handle_train(values, weights, node)
    assert all(d.dtype == torch.float32 and d.device.type == "cpu" for d in delta.values())
    assert flat(delta).norm().item() <= 0.05 * (1 + 1e-6)
    assert metrics["sys-device-cuda"] == 1 and metrics["sys-peak-memory-mb"] > 0
    assert metrics["diag-update-norm"] > 0.05  # it trained, then was clipped
