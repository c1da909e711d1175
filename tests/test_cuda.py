"""Runs on CUDA: skipped where no GPU is (CI has none); run them on a GPU machine with
``pytest tests/test_cuda.py``. The CPU suite covers the same code paths on the CPU."""

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.simulation import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(tmp_path, device: str, **over):
    values = {
        "population": 200,
        "cohort-size": 40,
        "rounds": 6,
        "examples-per-user": 20,
        "server-lr": 0.1,
        "noise-multiplier": 0.5,
        "target-epsilon": 0.0,
        "noise-seed": 7,
        "sampling-seed": 7,
        "device": device,
        "run-dir": str(tmp_path / device),
        **over,
    }
    cfg = RunConfig.from_mapping(values)
    return simulate(cfg, progress=False), torch.load(tmp_path / device / "model.pt")


def test_a_private_run_on_cuda_matches_the_cpu_run(tmp_path):
    gpu, gpu_model = _run(tmp_path, "cuda")
    cpu, cpu_model = _run(tmp_path, "cpu")
    assert gpu["device"].startswith("cuda")
    assert gpu["privacy"]["text"] == cpu["privacy"]["text"]
    assert abs(gpu["final"]["accuracy"] - cpu["final"]["accuracy"]) < 0.02
    for name, w in cpu_model.items():
        assert gpu_model[name].device.type == "cpu"
        torch.testing.assert_close(gpu_model[name], w, atol=1e-3, rtol=1e-3)


def test_private_parameters_are_stored_on_the_cpu(tmp_path):
    from dpfl.server.round import load_checkpoint

    cfg = RunConfig.from_mapping({
        "task": "localization", "scenes-dir": str(tmp_path / "sc"), "synthetic-scenes": 2,
        "scene-train-frames": 8, "scene-test-frames": 2, "population": 2, "cohort-size": 2.0,
        "rounds": 2, "local-epochs": 1, "batch-size": 4, "client-optimizer": "adam",
        "client-lr": 0.003, "clip-norm": 1.0, "clip-scheme": "dim", "clip-mode": "normalize",
        "noise-multiplier": 0.0, "target-epsilon": 0.0, "server-optimizer": "sgd",
        "server-lr": 1.0, "eval-every": 2, "checkpoint-every": 1, "device": "cuda",
        "run-dir": str(tmp_path / "run"),
    })  # fmt: skip
    summary = simulate(cfg, progress=False)
    assert summary["rounds_run"] == 2 and summary["device"].startswith("cuda")
    clients = load_checkpoint(tmp_path / "run" / "clients" / "state.pt")
    stored = [t for user in clients.values() for t in user.values()]
    assert stored and all(t.device.type == "cpu" for t in stored)


def test_noise_for_cuda_tensors_is_drawn_in_bulk_and_copied_once(monkeypatch):
    from dpfl.privacy.mechanisms import GaussianMechanism, NoiseSource

    source = NoiseSource(device="cuda")
    copies = []
    real = torch.Tensor.to

    def counting(self, *args, **kwargs):
        if self.device.type == "cpu" and any("cuda" in str(a) for a in args):
            copies.append(self.numel())
            assert self.is_pinned() and kwargs.get("non_blocking")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting)
    sums = {f"t{i}": torch.zeros(1000, 100, device="cuda") for i in range(30)}
    out = GaussianMechanism(2.0, 0.5, source).noisy_mean(sums, 1.0, inplace=True)
    assert copies == [30 * 100_000]  # one transfer for all thirty tensors
    draws = torch.cat([t.reshape(-1) for t in out.values()])
    assert draws.device.type == "cuda"
    assert draws.std().item() == pytest.approx(2.0 * 0.5, rel=0.01)


def test_reused_pinned_buffer_never_overwrites_a_copy_in_flight():
    from dpfl.privacy.mechanisms import GaussianMechanism, NoiseSource

    source = NoiseSource(device="cuda", seed=4)
    mech = GaussianMechanism(1.0, 1.0, source)
    a = {"w": torch.zeros(2**24, device="cuda")}
    b = {"w": torch.zeros(2**24, device="cuda")}
    first = mech.noisy_mean(a, 1.0, inplace=True)["w"]
    mech.noisy_mean(b, 1.0, inplace=True)  # draws into the same pinned buffer at once
    expected = NoiseSource(seed=4).standard_normal(2**24) * (1 + 1e-6)
    torch.testing.assert_close(first.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_the_device_resident_round_equals_the_cpu_round(tmp_path, monkeypatch, vectorize):
    """On CUDA the global weights stay on the device for the round, every client's delta is
    clipped and summed there (no copy to the CPU per client) and the sum reaches the CPU once,
    for the server step; the model equals the CPU run's within 1e-5."""
    from dpfl.server.aggregate import RoundAggregator

    seen = []
    add, add_stacked = RoundAggregator._add, RoundAggregator._add_stacked

    def spy_add(self, update):
        seen.append({t.device.type for t in update.values()})
        return add(self, update)

    def spy_stacked(self, stacked):
        seen.append({t.device.type for t in stacked.values()})
        return add_stacked(self, stacked)

    monkeypatch.setattr(RoundAggregator, "_add", spy_add)
    monkeypatch.setattr(RoundAggregator, "_add_stacked", spy_stacked)
    over = {"rounds": 2, "vectorize": vectorize, "client-lr": 0.05}
    _, gpu_model = _run(tmp_path / "gpu", "cuda", **over)
    assert seen and all(devices == {"cuda"} for devices in seen)
    _, cpu_model = _run(tmp_path / "cpu", "cpu", **over)
    for name, w in cpu_model.items():
        torch.testing.assert_close(gpu_model[name], w, atol=1e-5, rtol=0)
