"""Your own model and your own users' data with dpfl: a small CNN on scikit-learn's bundled 8x8
digit images (no download), split into users by a Dirichlet label split (each user holds a few
classes, as real users do).

Three ways to run the same thing:

* Python: ``python examples/digits/digits.py`` (this file's ``main``);
* TOML / CLI: ``dpfl simulate --config examples/digits/digits.toml``, which names
  ``task = "digits:make_task"`` and ``data = "digits:make_data"`` (run from this folder, or with
  it on PYTHONPATH);
* Flower: ``flwr run examples/digits`` (its pyproject.toml names dpfl's ServerApp and ClientApp and
  the same task and data).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dpfl
from dpfl.data import from_arrays, partition_dirichlet

CONFIG = {
    "rounds": 40,
    "cohort-size": 30,
    "clip-norm": 0.5,
    "clip-scheme": "flat",
    "target-epsilon": 8.0,
    "local-epochs": 2,
    "batch-size": 8,
    "client-lr": 0.1,
    "server-optimizer": "adam",
    "server-lr": 0.02,
    "eval-every": 10,
}
"""The DP run of this example (the TOML file and pyproject.toml hold the same keys)."""


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and a linear layer: about 1,900 parameters."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4 -> 2x2
        return self.head(x.flatten(1))


class DigitsTask:
    """What dpfl needs to know about the model: no base class, four members."""

    metric = "accuracy"

    def __init__(self, channels: int = 8) -> None:
        self.channels = channels

    def build_model(self) -> nn.Module:
        return DigitsCNN(self.channels)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        model.eval()
        x, y = data.tensors["x"], data.tensors["y"]
        logits = model(x)
        model.train()
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
        }


def make_task(channels: int = 8) -> DigitsTask:
    return DigitsTask(channels)


def make_data(users: int = 120, alpha: float = 1.0, test_fraction: float = 0.15, seed: int = 0):
    """The digits as a federated dataset: a test set of ``test_fraction`` of the images, the
    rest split into ``users`` users by a Dirichlet(alpha) label split (users left with no image
    are dropped, so K may be a little below ``users``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    owner = np.empty(len(train), dtype=np.int64)
    for user, idx in enumerate(partition_dirichlet(y[train].numpy(), users, alpha, seed)):
        owner[idx] = user
    return from_arrays(
        {"x": x[train], "y": y[train]}, users=owner, test={"x": x[test], "y": y[test]}
    )


def main(argv: list[str] | None = None) -> tuple[dpfl.Result, dpfl.Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/digits")
    p.add_argument("--rounds", type=int, default=CONFIG["rounds"])
    args = p.parse_args(argv)
    data = make_data()
    config = {**CONFIG, "rounds": args.rounds, "run-dir": args.run_dir}
    result = dpfl.simulate(DigitsTask(), data, config, overwrite=True)
    plain = dpfl.simulate(
        DigitsTask(),
        data,
        {**config, "noise-multiplier": 0.0, "target-epsilon": 0.0,
         "run-dir": args.run_dir + "-no-noise"},
        overwrite=True,
    )  # fmt: skip
    print(result.statement)
    print(
        f"K = {data.num_users} users; accuracy {result['final']['accuracy']:.3f} at "
        f"epsilon {result.epsilon['rdp']:.2f} (rdp), delta {result.delta:g}; "
        f"without noise (clipped, no DP): {plain['final']['accuracy']:.3f}; chance 0.10"
    )
    return result, plain


if __name__ == "__main__":
    main()
