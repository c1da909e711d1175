"""The run configuration: one set of keys for the CLI, TOML files and Flower's run config.

A key has one spelling everywhere: ``clip-norm`` is ``--clip-norm`` on the command line,
``clip-norm = 0.5`` in a TOML file and in ``[tool.flwr.app.config]``. Values are scalars (str, int,
float, bool) because Flower's run config holds only scalars. Unknown keys and bad values raise
ValueError naming the key and what it accepts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dpfl.config.checks import CHOICES, validate
from dpfl.config.keys import (
    ALIASES,
    OPTIONS,
    TABLES,
    Table,
    key_of,
    merge_values,
    not_one_of,
    register_table,
    suggestion,
)
from dpfl.models.optimizers import OptimizerOptions, ScheduleOptions
from dpfl.privacy.accounting import default_delta
from dpfl.privacy.clipping import ClipConfig

__all__ = [
    "ALIASES",
    "CHOICES",
    "OPTIONS",
    "RUN_CONTROL_KEYS",
    "TABLES",
    "RunConfig",
    "Table",
    "key_of",
    "not_one_of",
    "register_table",
    "suggestion",
]

RUN_CONTROL_KEYS: tuple[str, ...] = ("overwrite", "resume")
"""Keys of a Flower run config that say how to start the run, not what it is (the CLI's
flags of the same names): they are not RunConfig keys and not recorded with the run."""


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass
class RunConfig:
    # --- task and population
    task: str = field(
        default="classification",
        metadata=_doc(
            "the task: a built-in recipe (classification, asr, localization) or a factory by "
            "import path, 'package.module:make_task' (called with the [task-options] table)"
        ),
    )
    data: str = field(
        default="",
        metadata=_doc(
            "the federated dataset: '' (the recipe's own) or a factory by import path, "
            "'package.module:make_data' (called with the [task-options] table)"
        ),
    )
    task_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_doc(
            "table of keyword arguments for the task and data factories: [task-options] in "
            "TOML, task-options.KEY on the CLI and in Flower's run config"
        ),
    )
    tables: dict[str, Any] = field(
        default_factory=dict,
        metadata=_doc("the recipes' own tables ([asr], [localization], ...): name -> options"),
    )
    population: int = field(
        default=0,
        metadata=_doc(
            "number of users K (0: the dataset's; the synthetic classification data then has "
            "2000); a number that disagrees with the dataset is refused"
        ),
    )
    batch_seconds: float = field(
        default=0.0, metadata=_doc("client batches of this many seconds of audio (0: batch-size)")
    )
    init_model: str = field(
        default="", metadata=_doc("start from this model.pt (e.g. a central seed); '' for none")
    )
    # --- normalisation layers (dpfl.models.normalization)
    norm: str = field(
        default="",
        metadata=_doc(
            "normalisation layers by name ('': the model's own: none for the MLP, layernorm "
            "for asr, groupnorm for localization)"
        ),
    )
    norm_stats: str = field(
        default="client",
        metadata=_doc(
            "running statistics of norm layers: client (kept per user, FedBN-style) or server "
            "(aggregated: part of the clipped, noised update)"
        ),
    )
    norm_warmup: int = field(
        default=4000, metadata=_doc("powernorm/unified: steps on batch statistics first")
    )
    norm_groups: int = field(default=4, metadata=_doc("groupnorm/evonorm-s0/bcn-ws: groups"))
    # --- rounds and cohorts
    rounds: int = field(default=40, metadata=_doc("planned number of rounds T"))
    cohort_size: float = field(
        default=200, metadata=_doc("expected users per round S; q = S / population")
    )
    sampling: str = field(default="poisson", metadata=_doc("cohort sampling: poisson or fixed"))
    # --- client
    local_epochs: int = field(default=1, metadata=_doc("local passes over a user's data"))
    local_steps: int = field(
        default=0, metadata=_doc("fixed local steps instead of epochs (0: off)")
    )
    batch_size: int = field(default=10, metadata=_doc("local batch size"))
    client_optimizer: str = field(default="sgd", metadata=_doc("local optimizer (registry name)"))
    client_lr: float = field(default=0.1, metadata=_doc("local learning rate"))
    client_momentum: float = field(default=0.0, metadata=_doc("local momentum (SGD-like)"))
    client_beta1: float = field(default=0.9, metadata=_doc("local beta1 (Adam-like)"))
    client_beta2: float = field(default=0.999, metadata=_doc("local beta2 (Adam-like)"))
    client_eps: float = field(default=1e-8, metadata=_doc("local epsilon (Adam-like)"))
    client_weight_decay: float = field(default=0.0, metadata=_doc("local weight decay"))
    client_grad_clip: float = field(
        default=0.0, metadata=_doc("per-step gradient-norm clip in local training (0: off)")
    )
    # --- client device (Flower ClientApp; a node may set these in its --node-config)
    precision: str = field(
        default="fp32",
        metadata=_doc(
            "ClientApp: autocast precision of forward and loss: fp32, bf16, or fp16 (CUDA only, "
            "loss-scaled); weights, gradients and the clipped delta stay float32"
        ),
    )
    micro_batch_size: int = field(
        default=0,
        metadata=_doc(
            "ClientApp: at most this many examples per forward/backward, gradients accumulated "
            "to the full batch's (0: whole batches)"
        ),
    )
    micro_batch_seconds: float = field(
        default=0.0,
        metadata=_doc(
            "ClientApp, speech: at most this many seconds of audio per forward/backward, "
            "gradients accumulated to the full batch's (0: no limit)"
        ),
    )
    system_metrics: bool = field(
        default=True,
        metadata=_doc(
            "ClientApp: replies carry steps/s, peak memory and device (sys-*; per-client, not "
            "covered by DP)"
        ),
    )
    # --- privacy
    clip_norm: float = field(
        default=0.5, metadata=_doc("L2 bound C on each user's delta (0: no clipping, no DP)")
    )
    clip_scheme: str = field(default="dim", metadata=_doc("flat, uniform or dim"))
    clip_mode: str = field(
        default="clip",
        metadata=_doc(
            "clip (each bound's excess scaled down), normalize (every tensor to its bound) or "
            "rescale (the paper's code: unchanged below C, else every tensor to its C_h; "
            "per-layer schemes only)"
        ),
    )
    clip_location: str = field(
        default="client", metadata=_doc("client (default) or server (for comparison)")
    )
    noise_multiplier: float = field(
        default=0.0,
        metadata=_doc("z: noise std on the sum in units of C (0: calibrate for target-epsilon)"),
    )
    target_epsilon: float = field(
        default=8.0,
        metadata=_doc(
            "budget: calibrate z for it (if noise-multiplier = 0) and stop before a "
            "round would exceed it (0: off)"
        ),
    )
    delta: float = field(
        default=0.0,
        metadata=_doc(
            "delta (0: a power of ten <= 0.1/(1000 x population), below 1/K at every population "
            "the report extrapolates to; 1e-9 for the paper's 34,753 speakers)"
        ),
    )
    allow_large_delta: bool = field(
        default=False,
        metadata=_doc(
            "accept delta >= 1/population, which permits releasing a whole user's data (for "
            "experiments only; the report says so)"
        ),
    )
    accountant: str = field(
        default="rdp", metadata=_doc("accountant for the budget: rdp, prv, pld")
    )
    noise_seed: int = field(
        default=-1, metadata=_doc("fixed noise seed: reproducible and INSECURE (-1: secure)")
    )
    sampling_seed: int = field(
        default=-1,
        metadata=_doc(
            "fixed cohort-sampling seed: cohorts can be rebuilt from the run folder, INSECURE "
            "(-1: secret cohorts)"
        ),
    )
    dp_mode: str = field(
        default="central",
        metadata=_doc(
            "central (the server adds Gaussian noise to the clipped updates it sees) or "
            "distributed (each client adds its share of Skellam noise to an integer encoding; "
            "the server learns only the sum, through secure aggregation under Flower)"
        ),
    )
    sum_bits: int = field(
        default=20,
        metadata=_doc("distributed: bits per coordinate of the modular sum (b; 4 to 30)"),
    )
    min_contributors: int = field(
        default=0,
        metadata=_doc(
            "distributed: the fewest contributions a released sum may have (t; each client's "
            "noise share is 1/t of the total, and SecAgg+'s reconstruction threshold); 0: "
            "automatic, max(2, ceil(cohort-size / 2))"
        ),
    )
    count_noise_multiplier: float = field(
        default=0.0,
        metadata=_doc(
            "z_c: std (in users) of the noise on the accepted-reply count that min-replies "
            "decides on; charged with the sum as one mechanism (0: automatic, 10 x z)"
        ),
    )
    # --- server
    server_optimizer: str = field(default="lamb", metadata=_doc("server optimizer (registry name)"))
    server_lr: float = field(default=0.05, metadata=_doc("server learning rate"))
    server_momentum: float = field(default=0.0, metadata=_doc("server momentum (SGD, LARS)"))
    server_beta1: float = field(default=0.9, metadata=_doc("server beta1 (Adam-like)"))
    server_beta2: float = field(default=0.999, metadata=_doc("server beta2 (Adam-like)"))
    server_eps: float = field(default=1e-6, metadata=_doc("server epsilon (Adam-like)"))
    server_weight_decay: float = field(default=0.0, metadata=_doc("server weight decay"))
    server_schedule: str = field(default="constant", metadata=_doc("learning-rate schedule"))
    server_schedule_step_size: int = field(default=750, metadata=_doc("step schedule: period"))
    server_schedule_gamma: float = field(default=0.6, metadata=_doc("step/exponential: factor"))
    server_warmup_steps: int = field(default=0, metadata=_doc("linear warm-up rounds"))
    # --- run
    seed: int = field(
        default=0,
        metadata=_doc("seed for data and local training (never for cohorts or noise)"),
    )
    eval_every: int = field(default=1, metadata=_doc("evaluate every N rounds"))
    eval_cohort_size: float = field(
        default=0.0,
        metadata=_doc(
            "federated evaluation: expected users asked, at each evaluation, to evaluate the "
            "model on their own held-out data (Poisson, from its own secret sampler); 0: off"
        ),
    )
    eval_privacy: str = field(
        default="auto",
        metadata=_doc(
            "federated evaluation's release: dp (a user's weight capped at "
            "eval-max-examples, its values clipped to the task's bounds, Gaussian noise on "
            "the sums, charged to the ledger), diagnostic (exact, non-private: diag_fed_*) "
            "or auto (dp when DP is on)"
        ),
    )
    eval_max_examples: int = field(
        default=10,
        metadata=_doc(
            "federated evaluation: a user's examples count at most this many (public bound B; "
            "noise grows with B: set it near a typical user's held-out count)"
        ),
    )
    eval_noise_multiplier: float = field(
        default=0.0,
        metadata=_doc(
            "federated evaluation's z_e (noise std over the sums' sensitivity); 0: calibrated "
            "with target-epsilon, else the training z"
        ),
    )
    eval_budget_share: float = field(
        default=0.1,
        metadata=_doc(
            "with target-epsilon and dp federated evaluation: training alone is calibrated to "
            "(1 - share) x target, the evaluations' noise so that both spend the target"
        ),
    )
    checkpoint_every: int = field(default=0, metadata=_doc("checkpoint every N rounds (0: off)"))
    diagnostics: bool = field(
        default=False,
        metadata=_doc(
            "record non-private diagnostics (diag_*: exact counts of replies, failures and "
            "cohort sizes, per-client losses and norms, per-layer norm ratios, device figures); "
            "not covered by DP"
        ),
    )
    device: str = field(default="auto", metadata=_doc("auto, cpu or cuda"))
    run_dir: str = field(
        default="runs/latest", metadata=_doc("folder for metrics, summary and checkpoints")
    )
    round_timeout: float = field(
        default=600.0,
        metadata=_doc(
            "seconds to wait for a round's replies (Flower: wall clock; simulator: simulated "
            "clock, see sim-step-seconds); late replies are dropped"
        ),
    )
    vectorize: str = field(
        default="auto",
        metadata=_doc(
            "simulator: train a cohort as one vectorised computation: auto (when the model, "
            "task and optimizer allow it), on, off"
        ),
    )
    vectorize_chunk: int = field(
        default=256, metadata=_doc("simulator: clients per vectorised chunk (bounds memory)")
    )
    node_registry: str = field(
        default="",
        metadata=_doc(
            "Flower: a TOML file binding SuperNode ids to user ids (operator-written, for "
            "authenticated nodes); '' trusts each node's partition-id"
        ),
    )
    # --- faults: what a round needs, and simulated failures (simulator only)
    min_replies: int = field(
        default=0,
        metadata=_doc("accepted replies a round needs to be applied (0: any number, even none)"),
    )
    on_too_few: str = field(
        default="skip",
        metadata=_doc(
            "a round with fewer than min-replies: skip it (model unchanged) or retry it with a "
            "fresh cohort (up to max-retries); either way the attempt is charged to the budget"
        ),
    )
    max_retries: int = field(default=3, metadata=_doc("retries of a round with too few replies"))
    sim_dropout_rate: float = field(
        default=0.0, metadata=_doc("simulator: probability a sampled client drops out, no reply")
    )
    sim_failure_rate: float = field(
        default=0.0, metadata=_doc("simulator: probability a sampled client fails (an error)")
    )
    sim_step_seconds: float = field(
        default=0.0,
        metadata=_doc("simulator: simulated seconds per local step of a client (0: no clock)"),
    )
    sim_speed_spread: float = field(
        default=0.0,
        metadata=_doc(
            "simulator: clients' slowness factors are exp(N(0, spread^2)), fixed per user"
        ),
    )

    def __post_init__(self) -> None:
        # every registered table, with its defaults where the config sets nothing
        self.tables = {
            name: self.tables.get(name) or table.options() for name, table in TABLES.items()
        }
        self.validate()

    def options(self, table: str) -> Any:
        """The options of a recipe's table (e.g. ``cfg.options("asr").size``)."""
        if table not in self.tables:
            raise ValueError(f"no config table [{table}] (tables: {', '.join(TABLES) or 'none'})")
        return self.tables[table]

    # --- derived values
    @property
    def sample_rate(self) -> float:
        return self.cohort_size / self._population("q = cohort-size / population")

    @property
    def dp_enabled(self) -> bool:
        return self.clip_norm > 0

    @property
    def distributed(self) -> bool:
        """Distributed DP: clients noise integer encodings; the server sees only their sum."""
        return self.dp_mode == "distributed" and self.dp_enabled

    @property
    def resolved_min_contributors(self) -> int:
        """t: as set, or max(2, ceil(cohort-size / 2))."""
        if self.min_contributors > 0:
            return self.min_contributors
        return max(2, -(-int(round(self.cohort_size * 1e6)) // 2_000_000))

    @property
    def eval_mode(self) -> str:
        """Federated evaluation: off, dp or diagnostic."""
        if self.eval_cohort_size == 0:
            return "off"
        if self.eval_privacy == "auto":
            return "dp" if self.dp_enabled else "diagnostic"
        return self.eval_privacy

    @property
    def eval_sample_rate(self) -> float:
        return self.eval_cohort_size / self._population("q_e = eval-cohort-size / population")

    @property
    def resolved_delta(self) -> float:
        return self.delta if self.delta > 0 else default_delta(self._population("delta"))

    def _population(self, what: str) -> int:
        if self.population < 1:
            raise ValueError(
                f"{what} needs the population: population = 0 means the dataset's number of "
                "users, known once the data is built (dpfl.recipes.resolve sets it)"
            )
        return self.population

    def clip_config(self) -> ClipConfig | None:
        if self.clip_norm <= 0:
            return None
        return ClipConfig(self.clip_norm, self.clip_scheme, self.clip_mode)

    def client_options(self) -> OptimizerOptions:
        return OptimizerOptions(
            momentum=self.client_momentum,
            beta1=self.client_beta1,
            beta2=self.client_beta2,
            eps=self.client_eps,
            weight_decay=self.client_weight_decay,
        )

    def server_options(self) -> OptimizerOptions:
        return OptimizerOptions(
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            eps=self.server_eps,
            weight_decay=self.server_weight_decay,
        )

    def schedule_options(self) -> ScheduleOptions:
        return ScheduleOptions(
            step_size=self.server_schedule_step_size,
            gamma=self.server_schedule_gamma,
            warmup_steps=self.server_warmup_steps,
        )

    def norm_options(self):
        from dpfl.models.normalization import NormOptions

        return NormOptions(warmup=self.norm_warmup, groups=self.norm_groups)

    # --- validation
    def validate(self) -> None:
        """ValueError naming the first key out of range (see :mod:`dpfl.config.checks`)."""
        validate(self)

    # --- conversion
    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys; the task-options table flattened as ``task-options.KEY`` (as Flower
        flattens a run config's tables), so every value is a scalar."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "task_options":
                out.update({f"{OPTIONS}.{k}": v for k, v in sorted(self.task_options.items())})
            elif f.name == "tables":
                for name, options in self.tables.items():
                    out.update({f"{name}.{key_of(o.name)}": getattr(options, o.name)
                                for o in fields(options)})  # fmt: skip
            else:
                out[key_of(f.name)] = getattr(self, f.name)
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """``base`` (default: the defaults) updated with ``values`` (hyphenated keys)."""
        current = {f.name: getattr(base, f.name) for f in fields(base)} if base is not None else {}
        known = {key_of(f.name): f for f in fields(cls) if f.name not in ("task_options", "tables")}
        return cls(**merge_values(known, current, values))

    @classmethod
    def from_toml(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
        return cls.from_mapping(data, base)

    @classmethod
    def describe_defaults(cls) -> list[tuple[str, Any, str]]:
        """(key, default, description) of every config key, for --help and docs."""
        core = [
            (key_of(f.name), f.default, f.metadata.get("doc", ""))
            for f in fields(cls)
            if f.name not in ("task_options", "tables")  # tables: KEY.SUBKEY
        ]
        return core + [
            (f"{name}.{key_of(o.name)}", o.default, f"[{name}] " + o.metadata.get("doc", ""))
            for name, table in TABLES.items()
            for o in fields(table.options)
        ]
