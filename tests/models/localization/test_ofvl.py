import math

import numpy as np
import pytest
import torch

from dpfl.models.localization.model import (
    AdaptiveConv2d,
    OFVLNet,
    is_private,
    normalized_gradient_sum,
    parameter_counts,
    score_penalty,
)
from dpfl.models.localization.pose import estimate_pose, grid_pixels, pose_errors, summarize
from dpfl.models.localization.task import LocalizationTask, adapt_new_scene
from dpfl.recipes.localization.scenes import SceneDataset, read_7scenes, render_scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for k in range(2):
        render_scene(root, f"scene-{k}", seed=k, train_frames=12, test_frames=4)
    return root


def test_gate_picks_shared_or_specific_by_score_and_passes_gradients():
    torch.manual_seed(0)
    conv = AdaptiveConv2d(3, 4, 3, num_tasks=2)
    with torch.no_grad():
        conv.specific[1].normal_()
    x = torch.randn(2, 3, 8, 8)
    for score, weight in ((0.7, conv.specific[1]), (0.3, conv.shared)):
        conv.score.data.fill_(score)
        expected = torch.nn.functional.conv2d(x, weight, padding=1)
        out = conv(x, task=1)
        assert torch.allclose(out, expected, atol=1e-6)
        assert conv.uses_specific == (score > 0.5)
        conv.zero_grad()
        out.sum().backward()
        # straight-through: d out / d score = conv(x, W_specific - W_shared)
        diff = torch.nn.functional.conv2d(x, conv.specific[1] - conv.shared, padding=1)
        assert conv.score.grad.item() == pytest.approx(diff.sum().item(), rel=1e-4)


def test_penalty_moves_scores_toward_sharing():
    model = OFVLNet(2)
    before = model.scores().detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        score_penalty(model).backward()
        opt.step()
    after = model.scores().detach()
    assert torch.all(after < before)
    assert torch.allclose(before - after, torch.full_like(before, 0.15), atol=1e-6)
    assert not any(c.uses_specific for c in model.adaptive_convs())  # 0.6 -> 0.45 < 0.5


def test_gradient_normalisation_equalises_the_scenes():
    g1, g2 = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.1])  # norms 5 and 0.1
    total = normalized_gradient_sum([g1, g2])
    target = (5.0 + 0.1) / 2
    assert torch.allclose(total, g1 / 5 * target + g2 / 0.1 * target)
    parts = [g1 / 5 * target, g2 / 0.1 * target]
    assert parts[0].norm() == pytest.approx(parts[1].norm())
    assert torch.equal(normalized_gradient_sum([g1, torch.zeros(2)]), g1 / 5 * 2.5)


def test_pnp_recovers_a_known_pose_from_exact_coordinates(scenes):
    frames = read_7scenes(scenes, "scene-0", "test")
    _, _, h, w = frames.images.shape
    pixels = grid_pixels(h, w, 8).reshape(-1, 2)
    errors = []
    for i in range(len(frames)):
        xyz = frames.coords[i].reshape(3, -1).T.double().numpy()
        pose = estimate_pose(xyz, pixels, frames.camera)
        errors.append(pose_errors(pose, frames.poses[i].double().numpy()))
    assert all(t < 0.01 and r < 1.0 for t, r in errors)
    assert summarize(errors)["within_5cm_5deg"] == 1.0
    assert pose_errors(None, np.eye(4)) == (math.inf, math.inf)


def test_7scenes_reader_and_bad_folders(scenes, tmp_path):
    import shutil

    frames = read_7scenes(scenes, "scene-1", "train")
    assert frames.images.shape == (12, 3, 120, 160) and frames.coords.shape == (12, 3, 15, 20)
    assert frames.valid.all() and frames.camera[0, 0] == pytest.approx(585 * 160 / 640)
    bad = tmp_path / "bad"
    shutil.copytree(scenes / "scene-1", bad / "scene-1")
    (bad / "scene-1" / "seq-01" / "frame-000003.pose.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"frame-000003.pose.txt is missing"):
        read_7scenes(bad, "scene-1", "train")
    (bad / "scene-1" / "seq-01" / "frame-000003.pose.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"frame-000003.pose.txt: a pose must be a 4x4 matrix"):
        read_7scenes(bad, "scene-1", "train")
    (bad / "scene-1" / "TestSplit.txt").write_text("seq2\n")
    with pytest.raises(ValueError, match=r"TestSplit.txt: expected lines like 'sequence1'"):
        read_7scenes(bad, "scene-1", "test")


def test_private_parameters_and_parameter_counts():
    model = OFVLNet(3)
    names = [n for n, _ in model.named_parameters()]
    shared = [n for n in names if not is_private(n)]
    assert shared and all(n.endswith((".shared", ".score")) for n in shared)
    assert any("heads" in n for n in names if is_private(n))
    counts = parameter_counts(model)
    assert counts["layers_specific"] == counts["layers"] == 9  # score_init 0.6: all specific
    assert counts["effective"] == counts["separate"]
    for c in model.adaptive_convs():
        c.score.data.fill_(0.4)  # all shared: one weight per layer for every scene
    counts = parameter_counts(model)
    assert counts["effective"] < counts["separate"] < counts["stored"]


def test_new_scene_adaptation_trains_only_scene_specific_parameters(scenes):
    task = LocalizationTask()
    data = SceneDataset(str(scenes), ["scene-1"]).user_data(0)
    torch.manual_seed(0)
    model = task.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = adapt_new_scene(model, task, data, steps=5)
    assert len(losses) == 5
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if is_private(n) and "specific" in n:
            assert changed, n
        if not is_private(n):
            assert not changed, n
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


@pytest.mark.long
def test_short_federated_run_beats_the_constant_baseline(tmp_path):
    """2 scenes, 12 rounds of OFVL-MS (layer-wise normalised shared deltas, FedAvg): the median
    scene-coordinate error on held-out frames drops below predicting each scene's mean point."""
    from dpfl.config import RunConfig
    from dpfl.recipes.localization import scene_names
    from dpfl.recipes.localization.scenes import constant_baseline
    from dpfl.simulation import simulate
    from tests.support.runs import federated_run

    cfg = RunConfig.from_mapping(
        {
            "task": "localization",
            "scenes-dir": str(tmp_path / "sc"),
            "synthetic-scenes": 2,
            "scene-train-frames": 24,
            "scene-test-frames": 6,
            "population": 2,
            "cohort-size": 2.0,
            "rounds": 12,
            "local-epochs": 4,
            "batch-size": 4,
            "client-optimizer": "adam",
            "client-lr": 0.003,
            "clip-norm": 1.0,
            "clip-scheme": "dim",
            "clip-mode": "normalize",
            "noise-multiplier": 0.0,
            "target-epsilon": 0.0,
            "server-optimizer": "sgd",
            "server-lr": 1.0,
            "eval-every": 12,
            "run-dir": str(tmp_path / "run"),
        }
    )
    summary = simulate(cfg, progress=False)
    scenes = cfg.options("localization").scenes_dir
    baseline = constant_baseline(SceneDataset(scenes, scene_names(cfg)))
    assert (
        summary["final"]["median_coordinate_error_m"] < 0.95 * baseline["median_coordinate_error_m"]
    )
    # the server only ever held shared weights and scores
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved and all(n.endswith((".shared", ".score")) for n in saved)
    fresh = RunConfig.from_mapping({**cfg.to_dict(), "run-dir": str(tmp_path / "fresh")})
    assert set(federated_run(fresh, progress=False).state.params) == set(saved)
