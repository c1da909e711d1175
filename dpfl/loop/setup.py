"""What a run is set up with: the device, the local-training settings, the population, an
initial model file, and each client's training seed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dpfl.client.train import LocalTrainConfig, load_weights
from dpfl.config import RunConfig


def client_seed(seed: int, round_number: int, user: int) -> int:
    """The local-training seed of one user in one round (the same in every way of running)."""
    seq = np.random.SeedSequence([int(seed), 11, int(round_number), int(user)])
    return int(seq.generate_state(1)[0])


def with_population(cfg: RunConfig, users: int, where: str = "the data") -> RunConfig:
    """``cfg`` with population = ``users`` (the dataset's K, from which q = cohort-size / K);
    ValueError naming both numbers when the config sets another."""
    if cfg.population not in (0, users):
        raise ValueError(
            f"config key population = {cfg.population}, but {where} has {users} users: set "
            f"population = {users} (or leave it at 0: the dataset's number of users)"
        )
    return cfg if cfg.population == users else replace(cfg, population=users)


def load_model_file(model: torch.nn.Module, path: str | Path) -> None:
    """Load a ``model.pt`` (trainable parameters, as written by a run) into ``model``."""
    try:
        weights = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"config key init-model: {path} does not exist") from None
    load_weights(model, weights)


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key device = 'cuda': no CUDA device is available")
    return torch.device(cfg.device)


def local_config(cfg: RunConfig) -> LocalTrainConfig:
    return LocalTrainConfig(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        optimizer=cfg.client_optimizer,
        options=cfg.client_options(),
        grad_clip=cfg.client_grad_clip,
        batch_seconds=cfg.batch_seconds,
        precision=cfg.precision,
        micro_batch_size=cfg.micro_batch_size,
        micro_batch_seconds=cfg.micro_batch_seconds,
    )
