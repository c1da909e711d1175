"""The range checks of a run config: every key named with what it accepts."""

from __future__ import annotations

from typing import Any

from dpfl.config.keys import (
    _IMPORT_PATH,
    _check_options,
    _check_types,
    key_of,
    not_one_of,
)
from dpfl.models.optimizers import OPTIMIZERS, SCHEDULES
from dpfl.privacy.accounting import ACCOUNTANTS, default_delta
from dpfl.privacy.clipping import CLIP_NORM_RANGE, MODES, SCHEMES
from dpfl.server.sampling import SAMPLINGS

CHOICES: dict[str, tuple[str, ...]] = {
    "clip_scheme": SCHEMES,
    "clip_mode": MODES,
    "clip_location": ("client", "server"),
    "accountant": ACCOUNTANTS,
    "sampling": SAMPLINGS,
    "device": ("auto", "cpu", "cuda"),
    "norm_stats": ("client", "server"),
    "on_too_few": ("skip", "retry"),
    "vectorize": ("auto", "on", "off"),
    "precision": ("fp32", "bf16", "fp16"),
    "eval_privacy": ("auto", "dp", "diagnostic"),
    "dp_mode": ("central", "distributed"),
}


def validate(cfg: Any) -> None:
    """ValueError naming the first key whose value is out of range (RunConfig calls this on
    construction)."""

    def bad(name: str, accepted: str) -> ValueError:
        return ValueError(
            f"config key {key_of(name)} = {getattr(cfg, name)!r}: expected {accepted}"
        )

    _check_options(cfg.task_options)
    _check_types(cfg)
    for name, options in cfg.tables.items():
        _check_types(options, f"{name}.")
    # which recipes exist is dpfl.recipes' to say: here only the form of the names
    for name in ("task", "data"):
        value = getattr(cfg, name)
        if ":" in value and not _IMPORT_PATH.fullmatch(value):
            raise bad(name, "a recipe name or an import path 'package.module:attribute'")
    if not cfg.task:
        raise bad("task", "a recipe name or an import path 'package.module:factory'")
    if cfg.population < 0:
        raise bad("population", "an integer >= 1, or 0 for the dataset's number of users")
    for name in ("rounds", "batch_size", "eval_every"):
        if getattr(cfg, name) < 1:
            raise bad(name, "an integer >= 1")
    for name in ("sim_dropout_rate", "sim_failure_rate"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise bad(name, "a number in [0, 1]")
    for name in ("sim_step_seconds", "sim_speed_spread"):
        if getattr(cfg, name) < 0:
            raise bad(name, "a number >= 0")
    if cfg.vectorize_chunk < 1:
        raise bad("vectorize_chunk", "an integer >= 1")
    for name in ("min_replies", "max_retries"):
        if getattr(cfg, name) < 0:
            raise bad(name, "an integer >= 0")
    if cfg.norm_warmup < 0:
        raise bad("norm_warmup", "an integer >= 0")
    if cfg.norm_groups < 1:
        raise bad("norm_groups", "an integer >= 1")
    if cfg.batch_seconds < 0:
        raise bad("batch_seconds", "a number >= 0")
    if cfg.micro_batch_size < 0:
        raise bad("micro_batch_size", "an integer >= 0 (0: off)")
    if cfg.micro_batch_seconds < 0:
        raise bad("micro_batch_seconds", "a number >= 0 (0: off)")
    for name in (
        "local_epochs",
        "local_steps",
        "checkpoint_every",
        "server_warmup_steps",
    ):
        if getattr(cfg, name) < 0:
            raise bad(name, "an integer >= 0")
    if cfg.local_epochs == 0 and cfg.local_steps == 0:
        raise bad("local_epochs", "an integer >= 1 when local-steps is 0")
    if cfg.cohort_size <= 0 or (cfg.population and cfg.cohort_size > cfg.population):
        raise ValueError(
            f"config key cohort-size = {cfg.cohort_size!r}: expected a number in "
            f"(0, population = {cfg.population or 'the number of users'}]"
        )
    for name, choices in CHOICES.items():
        accepted = not_one_of(getattr(cfg, name), choices)
        if accepted:
            raise bad(name, accepted)
    if cfg.eval_cohort_size < 0 or (cfg.population and cfg.eval_cohort_size > cfg.population):
        raise ValueError(
            f"config key eval-cohort-size = {cfg.eval_cohort_size!r}: expected 0 (off) or a "
            f"number in (0, population = {cfg.population or 'the number of users'}]"
        )
    if cfg.eval_max_examples < 1:
        raise bad("eval_max_examples", "an integer >= 1")
    if cfg.eval_noise_multiplier < 0:
        raise bad("eval_noise_multiplier", "a number >= 0")
    if not 0 <= cfg.eval_budget_share < 1:
        raise bad("eval_budget_share", "a number in [0, 1)")
    if cfg.eval_privacy == "dp" and cfg.eval_cohort_size > 0 and cfg.clip_norm == 0:
        raise ValueError(
            "config key eval-privacy = 'dp' needs DP on (clip-norm > 0); without DP, "
            "federated evaluation is a diagnostic (eval-privacy = 'diagnostic' or 'auto')"
        )
    if cfg.clip_mode == "rescale" and cfg.clip_scheme == "flat":
        raise ValueError(
            "config key clip-mode = 'rescale' with clip-scheme = 'flat' is clip-mode = 'clip' "
            "(the whole update scaled to C when above it): set clip-mode = 'clip', or a "
            "per-layer clip-scheme ('uniform' or 'dim')"
        )
    for name, registry in (
        ("client_optimizer", OPTIMIZERS),
        ("server_optimizer", OPTIMIZERS),
        ("server_schedule", SCHEDULES),
    ):
        accepted = not_one_of(getattr(cfg, name), sorted(registry))
        if accepted:
            raise bad(name, accepted)
    if not cfg.run_dir.strip():
        raise bad("run_dir", "a folder path")
    for name in ("client_lr", "server_lr", "round_timeout"):
        if getattr(cfg, name) <= 0:
            raise bad(name, "a number > 0")
    for name in (
        "client_momentum",
        "client_weight_decay",
        "client_grad_clip",
        "noise_multiplier",
        "target_epsilon",
        "server_momentum",
        "server_weight_decay",
    ):
        if getattr(cfg, name) < 0:
            raise bad(name, "a number >= 0")
    if cfg.clip_norm != 0 and not CLIP_NORM_RANGE[0] <= cfg.clip_norm <= CLIP_NORM_RANGE[1]:
        raise bad(
            "clip_norm",
            f"0 (off) or a number in [{CLIP_NORM_RANGE[0]:g}, {CLIP_NORM_RANGE[1]:g}]",
        )
    if not 0 <= cfg.delta < 1:
        raise bad("delta", "0 (automatic) or a number in (0, 1)")
    if cfg.population and cfg.delta * cfg.population >= 1 and not cfg.allow_large_delta:
        raise ValueError(
            f"config key delta = {cfg.delta:g} is >= 1/population (1/{cfg.population}): "
            "a delta that large permits releasing a whole user's data, and epsilon then "
            "means nothing; use delta = 0 (automatic, "
            f"{default_delta(cfg.population):g}) or set allow-large-delta = true for an "
            "experiment"
        )
    if cfg.noise_seed < -1:
        raise bad("noise_seed", "-1 (secure) or a seed >= 0")
    if cfg.sampling_seed < -1:
        raise bad("sampling_seed", "-1 (secret cohorts) or a seed >= 0")
    _check_distributed(cfg, bad)
    if cfg.count_noise_multiplier < 0:
        raise bad("count_noise_multiplier", "a number >= 0 (0: automatic)")
    if cfg.count_noise_multiplier > 0 and cfg.min_replies == 0:
        raise ValueError(
            "config key count-noise-multiplier is the noise on the count that min-replies "
            "decides on: set min-replies > 0, or count-noise-multiplier = 0"
        )
    if cfg.target_epsilon > 0 and cfg.clip_norm == 0:
        raise ValueError(
            "config key target-epsilon needs clipping: set clip-norm > 0 or target-epsilon = 0"
        )
    if cfg.target_epsilon > 0 and cfg.sampling != "poisson":
        raise ValueError(
            "config key target-epsilon needs sampling = poisson: the accountants do not "
            "cover fixed-size cohorts"
        )


def _check_distributed(cfg: Any, bad) -> None:
    if not 4 <= cfg.sum_bits <= 30:
        raise bad("sum_bits", "an integer in [4, 30]")
    if cfg.min_contributors < 0:
        raise bad("min_contributors", "0 (automatic) or an integer >= 1")
    if cfg.dp_mode != "distributed":
        return
    refused = (
        (cfg.clip_norm == 0, "needs DP on (clip-norm > 0)"),
        (
            cfg.clip_location != "client",
            "needs clip-location = 'client' (the server never sees an update to clip)",
        ),
        (cfg.min_replies > 0, "replaces min-replies by min-contributors (set min-replies = 0)"),
        (
            cfg.eval_cohort_size > 0,
            "does not run federated evaluation yet (the server would "
            "see each user's metrics): set eval-cohort-size = 0",
        ),
    )
    for failed, why in refused:
        if failed:
            raise ValueError(f"config key dp-mode = 'distributed' {why}")
