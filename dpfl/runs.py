"""What every way of running dpfl shares: building the task and data from a config, resolving the
noise, the server spec, and the run folder (metrics as JSON lines, summary, privacy statement).

The in-process simulator and the Flower ServerApp both call these, so a run reads the same
whichever way it was started.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpfl.client.train import LocalTrainConfig
from dpfl.config import RunConfig
from dpfl.models.tasks import TASKS, ClassificationTask, Task
from dpfl.privacy.accounting import (
    ACCOUNTANTS,
    ADJACENCY,
    SAMPLING,
    calibrate_noise_multiplier,
    epsilon_for_segments,
)
from dpfl.server.round import ServerSpec
from dpfl.simulations.data import FederatedDataset, SyntheticClassification


def build_task(cfg: RunConfig) -> Task:
    if cfg.task == "classification":
        return ClassificationTask(hidden=cfg.hidden_sizes)
    return TASKS[cfg.task]()


def build_dataset(cfg: RunConfig) -> FederatedDataset:
    if cfg.task == "classification":
        return SyntheticClassification(
            num_users=cfg.population, examples_per_user=cfg.examples_per_user, seed=cfg.seed
        )
    raise ValueError(f"no built-in dataset for task {cfg.task!r}")


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
    )


@dataclass(frozen=True)
class NoisePlan:
    noise_multiplier: float
    calibrated: bool
    """True when z was calibrated for ``target_epsilon`` over the planned rounds."""


def resolve_noise(cfg: RunConfig) -> NoisePlan:
    """z from the config: calibrated for target-epsilon, or as given."""
    if not cfg.dp_enabled:
        return NoisePlan(0.0, False)
    if cfg.target_epsilon > 0:
        z = calibrate_noise_multiplier(
            cfg.target_epsilon, cfg.resolved_delta, cfg.sample_rate, cfg.rounds, cfg.accountant
        )
        return NoisePlan(z, True)
    return NoisePlan(cfg.noise_multiplier, False)


def server_spec(cfg: RunConfig, noise: NoisePlan) -> ServerSpec:
    return ServerSpec(
        sample_rate=cfg.sample_rate,
        population=cfg.population,
        clip=cfg.clip_config(),
        clip_location=cfg.clip_location,
        noise_multiplier=noise.noise_multiplier,
        delta=cfg.resolved_delta,
        accountant=cfg.accountant,
        sampling=cfg.sampling,
        optimizer=cfg.server_optimizer,
        lr=cfg.server_lr,
        options=cfg.server_options(),
        schedule=cfg.server_schedule,
        schedule_options=cfg.schedule_options(),
        noise_seed=None if cfg.noise_seed < 0 else cfg.noise_seed,
    )


def privacy_statement(
    cfg: RunConfig, spec: ServerSpec, ledger_segments, noise_label: str, rounds_run: int
) -> dict[str, Any]:
    """The (epsilon, delta) of the rounds actually run, with every assumption it rests on."""
    statement: dict[str, Any] = {
        "dp": spec.dp,
        "rounds_run": rounds_run,
        "rounds_planned": cfg.rounds,
        "noise_source": noise_label,
    }
    if not spec.dp:
        statement["text"] = "DP is off (clip-norm = 0): no privacy guarantee."
        return statement
    statement.update(
        {
            "adjacency": ADJACENCY,
            "sampling": SAMPLING if spec.sampling == "poisson" else "fixed-size cohorts",
            "sample_rate": spec.sample_rate,
            "expected_cohort": spec.expected_cohort,
            "population": spec.population,
            "noise_multiplier": spec.noise_multiplier,
            "sigma_dp": spec.noise_multiplier / spec.expected_cohort,
            "clip_norm": spec.clip.clip_norm,
            "clip_scheme": spec.clip.scheme,
            "clip_mode": spec.clip.mode,
            "clip_location": spec.clip_location,
            "delta": spec.delta,
        }
    )
    if not spec.accounted:
        statement["text"] = (
            "fixed-size cohorts: no accountant here covers this sampling, so no epsilon is reported"
        )
        return statement
    results = {}
    for name in ACCOUNTANTS:
        r = epsilon_for_segments(ledger_segments, spec.delta, name, fallback=True)
        results[name] = {"epsilon": r.epsilon, "accountant": r.accountant, "note": r.note}
    statement["epsilon"] = results
    main = results[cfg.accountant]
    eps = main["epsilon"]
    statement["text"] = (
        f"(epsilon, delta) = ({eps:.4g}, {spec.delta:g}) under {main['accountant']}, "
        f"Poisson sampling, q={spec.sample_rate:.4g}, T={rounds_run}; user-level DP "
        f"({ADJACENCY}), clip {spec.clip.scheme} C={spec.clip.clip_norm:g} on the "
        f"{spec.clip_location}, z={spec.noise_multiplier:.4g}; noise: {noise_label}"
    )
    return statement


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


class RunWriter:
    """The run folder: ``config.toml``-like ``config.json``, ``metrics.jsonl``, ``summary.json``."""

    def __init__(self, run_dir: str | Path, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()

    def write_config(self, cfg: RunConfig, extra: dict[str, Any]) -> None:
        data = {"config": cfg.to_dict(), **extra, "machine": platform.platform()}
        (self.dir / "config.json").write_text(json.dumps(_json_value(data), indent=2) + "\n")

    def truncate_after(self, round_number: int) -> None:
        """On resume: drop metric lines of rounds after the checkpoint (they will be re-run)."""
        if not self.metrics_path.exists():
            return
        keep = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("round", 0) <= round_number
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def append(self, metrics: dict[str, Any]) -> None:
        record = {"time": time.time(), **metrics}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_json_value(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.dir / "summary.json").write_text(json.dumps(_json_value(summary), indent=2) + "\n")

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"
