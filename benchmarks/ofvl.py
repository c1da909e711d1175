"""OFVL-MS on synthetic indoor scenes, three ways, plus new-scene adaptation.

1. Separate models: one network per scene (every convolution its own), trained centrally.
2. One shared model without adaptive sharing: all convolutions shared by the scenes (norms,
   attention and heads per scene), trained centrally on all scenes at once.
3. OFVL-MS, federated: one client per scene; shared weights and layer scores aggregated by the
   server (FedAvg), scene-specific parameters kept on the clients; optionally with DP (per-layer
   normalised shared deltas + Gaussian noise).
Then a new scene is learned with the shared parameters frozen.

Every way gets the same number of gradient steps per scene. Reported: median translation and
rotation errors of PnP + RANSAC on held-out frames, % within 5 cm / 5 deg, median scene-
coordinate error, the constant-coordinate baseline, and parameter counts.

Not a test; CI does not run it. Usage (defaults: about half an hour on 2 CPU cores):
    .venv/bin/python benchmarks/ofvl.py [--out benchmarks/results/ofvl] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dpfl.config import RunConfig
from dpfl.models.localization.model import OFVLNet, coordinate_loss, parameter_counts
from dpfl.models.localization.pose import summarize
from dpfl.models.localization.task import LocalizationTask, adapt_new_scene
from dpfl.recipes.localization.scenes import SceneDataset, constant_baseline, render_scene
from dpfl.simulation import simulate


def evaluate_models(pairs) -> dict:
    """Pose and coordinate errors over every held-out frame of (single-scene model, test data)
    pairs; medians over all frames (pose) and all valid pixels (coordinates)."""
    errors, coord = [], []
    for model, test in pairs:
        errors += TASK.localize(model, test)
        with torch.no_grad():
            model.eval()
            pred, _ = model(test.images, 0)
            model.train()
        coord.append(torch.linalg.vector_norm(pred - test.coords, dim=1)[test.valid])
    return {**summarize(errors), "median_coordinate_error_m": float(torch.cat(coord).median())}


TASK = LocalizationTask()


class _ScenePart(torch.nn.Module):
    """A view of a multi-scene model as the single-scene model the task evaluates (task 0)."""

    def __init__(self, model: OFVLNet, scene: int) -> None:
        super().__init__()
        self.model, self.scene = model, scene

    def forward(self, images, task=0):
        return self.model(images, self.scene)

    def adaptive_convs(self):
        return self.model.adaptive_convs()


def train_central(
    model: OFVLNet,
    dataset: SceneDataset,
    scenes: list[int],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> None:
    """Adam on the sum of the scenes' losses, ``steps`` steps (one batch of each scene a step)."""
    task = LocalizationTask(adaptive=False)
    for k in scenes:
        task.prepare_private(_SceneHead(model, k), dataset.user_data(k))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = 0.0
        for k in scenes:
            data = dataset.user_data(k)
            b = data.batch(torch.randint(0, len(data), (batch,), generator=generator))
            coords, unc = model(b["images"], k)
            loss = loss + coordinate_loss(coords, unc, b["coords"], b["valid"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class _SceneHead:
    """``prepare_private`` sets head 0; point it at scene k's head."""

    def __init__(self, model: OFVLNet, scene: int) -> None:
        self.model, self.scene = model, scene

    def set_scene_center(self, task: int, centre: torch.Tensor) -> None:
        self.model.set_scene_center(self.scene, centre)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ofvl")
    parser.add_argument("--scenes-dir", default="data/bench-scenes")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--train-frames", type=int, default=120)
    parser.add_argument("--test-frames", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1500, help="gradient steps per scene")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=0.5,
        help="for the DP variant of OFVL-MS (0 skips it)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = [f"scene-{k}" for k in range(args.scenes + 1)]  # the last one is the new scene
    for k, name in enumerate(names):
        render_scene(
            args.scenes_dir,
            name,
            seed=k,
            train_frames=args.train_frames,
            test_frames=args.test_frames,
        )
    dataset = SceneDataset(args.scenes_dir, names)
    scenes = list(range(args.scenes))
    rows = []

    def record(method: str, metrics: dict, params: dict | None, seconds: float) -> None:
        row = {"method": method, **metrics, "params": params, "seconds": seconds}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)

    record(
        "constant coordinate (baseline)",
        {
            "median_coordinate_error_m": constant_baseline(_Subset(dataset, scenes))[
                "median_coordinate_error_m"
            ]
        },
        None,
        0.0,
    )

    # 1. separate models
    t0 = time.perf_counter()
    errors_models = []
    for k in scenes:
        torch.manual_seed(k)
        model = OFVLNet(1, adaptive=False)
        train_central(model, _Subset(dataset, [k]), [0], args.steps, args.lr, args.batch, k)
        errors_models.append(model)
    separate_metrics = evaluate_models(
        [(m, dataset.user_test_data(k)) for m, k in zip(errors_models, scenes, strict=True)]
    )
    one = parameter_counts(OFVLNet(1, adaptive=False))
    record(
        "separate models",
        separate_metrics,
        {"total": args.scenes * one["effective"]},
        time.perf_counter() - t0,
    )

    # 2. one shared model, no adaptive sharing
    t0 = time.perf_counter()
    torch.manual_seed(0)
    shared = OFVLNet(args.scenes, adaptive=False)
    train_central(shared, dataset, scenes, args.steps, args.lr, args.batch, 0)
    counts = parameter_counts(shared)
    record(
        "one shared model (no adaptive sharing)",
        evaluate_models([(_ScenePart(shared, k), dataset.user_test_data(k)) for k in scenes]),
        {"total": counts["effective"]},
        time.perf_counter() - t0,
    )

    # 3. OFVL-MS, federated (and with DP)
    steps_per_round = args.local_epochs * -(-args.train_frames // args.batch)
    rounds = max(1, args.steps // steps_per_round)
    variants = [("OFVL-MS federated", 0.0)]
    if args.noise_multiplier > 0:
        variants.append(
            (f"OFVL-MS federated + DP (z={args.noise_multiplier:g})", args.noise_multiplier)
        )
    for label, z in variants:
        t0 = time.perf_counter()
        cfg = RunConfig.from_mapping(
            {
                "task": "localization",
                "scenes-dir": args.scenes_dir,
                "scenes": ",".join(names[: args.scenes]),
                "population": args.scenes,
                "cohort-size": float(args.scenes),
                "rounds": rounds,
                "local-epochs": args.local_epochs,
                "batch-size": args.batch,
                "client-optimizer": "adam",
                "client-lr": args.lr,
                "clip-norm": 1.0,
                "clip-scheme": "dim",
                "clip-mode": "normalize",
                "noise-multiplier": z,
                "target-epsilon": 0.0,
                "delta": 1e-5,
                "server-optimizer": "sgd",
                "server-lr": 1.0,
                "eval-every": rounds,
                "run-dir": str(out / ("fed-dp" if z else "fed")),
            }
        )
        summary = simulate(cfg, progress=False, overwrite=True)
        final = summary["final"]
        privacy = summary["privacy"]
        eps = privacy["epsilon"]["rdp"]["epsilon"] if "epsilon" in privacy else None
        # the size of one multi-scene model with the layer choices the federation learned
        model = OFVLNet(args.scenes)
        learned = torch.load(Path(cfg.run_dir) / "model.pt", weights_only=True)
        model.load_state_dict({**model.state_dict(), **learned})
        layers_specific = parameter_counts(model)["layers_specific"]
        record(
            label,
            {
                k: final[k]
                for k in (
                    "median_translation_m",
                    "median_rotation_deg",
                    "within_5cm_5deg",
                    "median_coordinate_error_m",
                )
            }
            | {"layers_specific": layers_specific, "rounds": rounds, "epsilon": eps},
            {"total": parameter_counts(model)["effective"]},
            time.perf_counter() - t0,
        )

    # new-scene adaptation: freeze the shared parameters learned federated, train the rest
    t0 = time.perf_counter()
    task = LocalizationTask()
    weights = torch.load(out / "fed" / "model.pt", weights_only=True)
    model = task.build_model()
    model.load_state_dict({**model.state_dict(), **weights})
    adapt_new_scene(model, task, dataset.user_data(args.scenes), steps=args.steps)
    new = task.evaluate(model, dataset.user_test_data(args.scenes))
    record(
        "new scene, shared frozen (adaptation)",
        {
            k: new[k]
            for k in (
                "median_translation_m",
                "median_rotation_deg",
                "within_5cm_5deg",
                "median_coordinate_error_m",
            )
        },
        None,
        time.perf_counter() - t0,
    )

    result = {
        "machine": f"{platform.platform()}, Python {platform.python_version()}",
        "args": vars(args),
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        "| method | median t (m) | median r (deg) | within 5cm/5deg | median coord err (m) "
        "| parameters |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:

        def f(key, fmt="{:.3f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        params = f"{r['params']['total']:,}" if r["params"] else "-"
        lines.append(
            f"| {r['method']} | {f('median_translation_m')} | "
            f"{f('median_rotation_deg', '{:.1f}')} | {f('within_5cm_5deg', '{:.0%}')} | "
            f"{f('median_coordinate_error_m')} | {params} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    print(table)
    print(f"({result['wall_seconds'] / 60:.1f} min)")


class _Subset:
    """Some of a SceneDataset's scenes, renumbered from 0."""

    def __init__(self, dataset: SceneDataset, scenes: list[int]) -> None:
        self.dataset, self.scenes = dataset, scenes
        self.num_users = len(scenes)

    def user_data(self, k: int):
        return self.dataset.user_data(self.scenes[k])

    def user_test_data(self, k: int):
        return self.dataset.user_test_data(self.scenes[k])


if __name__ == "__main__":
    main()
