"""A run's privacy plan and statement: the noise it adds (calibrated or given), and the
(epsilon, delta) it reports with every assumption that figure rests on.

Shared by the simulator and the Flower ServerApp through :class:`dpfl.loop.run.FederatedRun`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dpfl.config import RunConfig
from dpfl.privacy.accounting import (
    ACCOUNTANTS,
    ADJACENCY,
    CALIBRATION_RANGE,
    SAMPLING,
    Segment,
    calibrate_noise_multiplier,
    epsilon_for_segments,
)
from dpfl.privacy.clipping import sensitivity_bound
from dpfl.privacy.distributed import EncodingPlan, plan_encoding, poisson_cohort_bound
from dpfl.privacy.mechanisms import effective_noise_multiplier, sum_noise_multiplier
from dpfl.server.round import ServerSpec

COUNT_NOISE_RATIO = 10.0
"""Automatic z_c = 10 z: the count's noise then costs z_eff = z / sqrt(1.01), 0.5 % of z."""

THREAT_MODEL = (
    "central DP: the server (the simulator's process, the Flower ServerApp and SuperLink, every "
    "torchrun rank) is trusted with every clipped update and with the noise and cohort keys; "
    "the guarantee covers what it releases: the model, the noisy aggregates, epsilon and the "
    "public metrics. Not covered: diag_* metrics (exact counts, per-client statistics), the "
    "wall-clock time of rounds, and the simulated clients' own state (clients/)."
)
THREAT_MODEL_DISTRIBUTED = (
    "distributed DP with secure aggregation: each client clips its update, encodes it as "
    "integers and adds its share of Skellam noise on the device; under Flower, SecAgg+ masks the "
    "encodings so the server (ServerApp and SuperLink) learns only their sum modulo 2^b, which "
    "carries the noise of at least min-contributors clients (in the in-process simulator the "
    "masks, which cancel, are skipped and the same modular sum is computed). The server is "
    "honest-but-curious: it follows the protocol and samples cohorts as configured; "
    "amplification by sampling assumes that, that it keeps the cohorts secret and that clients "
    "do not collude with it (SecAgg+ tells each sampled client its neighbours' node ids, so "
    "clients learn part of the cohort). Against the server itself, which knows who was sampled, "
    "each round a user took part in is worth epsilon_per_round_unsampled. Not covered: diag_* "
    "metrics and the wall-clock time of rounds."
)
ADJACENCY_DISTRIBUTED = "zero-out one user (its update replaced by zeros, its noise share kept)"
DISTRIBUTED_CHECKS = {
    "moved_to_the_client": (
        "clipping (the server cannot see an update's norm), the rounding bound and the noise "
        "share: a client that skips its share weakens everyone's guarantee, so at least "
        "min-contributors contributions are assumed to come from honest clients"
    ),
    "kept_by_the_server": (
        "the number of contributions (a sum with fewer than min-contributors is never "
        "released, and is charged), the sum's shape, and its range: coordinates near the "
        "modular boundary fail the round (a heuristic; a wrap cannot be detected with "
        "certainty under secure aggregation; the simulator checks the exact sum and fails "
        "loudly)"
    ),
    "adjacency": (
        "zero-out one user: the user's clipped update replaced by zeros while its device still "
        "adds its noise share, so the two sums differ by one encoding under the same Skellam "
        "noise of at least min-contributors shares (the adjacency under which Kairouz, Liu, "
        "Steinke 2021 and Agarwal, Kairouz, Liu 2021 account distributed noise). Under "
        "add/remove the user's share would leave with it, changing the noise's variance, which "
        "this accounting does not cover; nor does it cover what the number of contributions "
        "(known to SecAgg's server) or whether a round was released reveals (a round is not "
        "released with fewer than min-contributors contributions: probability "
        "released_below_threshold_probability per round)"
    ),
    "known_limits": (
        "Flower 1.42's SecAgg+ expands its mask seeds with NumPy's MT19937 seeded by a 32-bit "
        "fold of the 256-bit secret, which a server with enough computation could search; "
        "a malicious client could craft an update that wraps the sum (a denial of service)"
    ),
}
ASSUMPTIONS = (
    "one user = one node or data partition (several devices of one person count as several users)",
    "epsilon is per run: runs on the same users (tuning, repeats) compose",
    "init-model and seed models are trained on public data",
    "a central test set is not users' data",
)


@dataclass(frozen=True)
class NoisePlan:
    noise_multiplier: float
    """z: noise std on the sum, in units of C."""
    calibrated: bool
    """True when the noise was calibrated for ``target_epsilon`` over the planned rounds."""
    count_noise_multiplier: float = 0.0
    """z_c: noise std (users) on the count min-replies decides on; 0 when none is released."""
    encoding: dict | None = None
    """Distributed DP: the clients' integer encoding (:class:`EncodingPlan` as a dict)."""

    @property
    def encoding_plan(self) -> EncodingPlan | None:
        return EncodingPlan(**self.encoding) if self.encoding is not None else None

    @property
    def effective(self) -> float:
        """z_eff: what each attempt is charged at."""
        return effective_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)


def encoding_for(cfg: RunConfig, dim: int, noise_multiplier: float) -> EncodingPlan:
    """Distributed DP: the integer encoding of ``dim``-coordinate updates at noise multiplier
    z, its wrap bound covering the largest cohort Poisson sampling gives with probability
    1 - 1e-10 (a fixed-size cohort: its size)."""
    if cfg.sampling == "poisson":
        largest = poisson_cohort_bound(cfg.population, cfg.sample_rate)
    else:
        largest = math.ceil(cfg.cohort_size)
    t = cfg.resolved_min_contributors
    if t > largest:
        raise ValueError(
            f"config key min-contributors = {t} exceeds the largest cohort ({largest}): no "
            "round could ever be released"
        )
    try:
        return plan_encoding(
            dim, sensitivity_bound(cfg.clip_norm), noise_multiplier, cfg.sum_bits, t, largest
        )
    except ValueError as err:
        raise ValueError(f"config key sum-bits: {err}") from None


def _fits(cfg: RunConfig, dim: int, z: float) -> bool:
    try:
        encoding_for(cfg, dim, z)
    except ValueError:
        return False
    return True


def resolve_distributed(cfg: RunConfig, dim: int) -> NoisePlan:
    """Distributed DP's noise: z as given, or calibrated for target-epsilon with the Skellam
    accountant (whose sensitivities depend on z through the encoding's scale)."""
    if cfg.noise_multiplier > 0:
        z, calibrated = cfg.noise_multiplier, False
    else:
        if cfg.target_epsilon <= 0:
            raise ValueError(
                "dp-mode = 'distributed' needs noise-multiplier > 0 or target-epsilon > 0"
            )

        def segment(z: float, q: float, rounds: int) -> Segment:
            plan = encoding_for(cfg, dim, z)
            return Segment(z, q, rounds, plan.l2, plan.l1)

        # b bits carry only so much noise (the rounding's share of it does not shrink with the
        # scale): search below the largest z any scale fits
        bottom, top = CALIBRATION_RANGE
        if not _fits(cfg, dim, top):
            lo, hi = bottom, top
            if not _fits(cfg, dim, lo):
                encoding_for(cfg, dim, lo)  # raises, naming sum-bits
            while hi / lo > 1 + 1e-6:
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if _fits(cfg, dim, mid) else (lo, mid)
            top = lo
        try:
            z = calibrate_noise_multiplier(
                cfg.target_epsilon,
                cfg.resolved_delta,
                cfg.sample_rate,
                cfg.rounds,
                "rdp",
                segment=segment,
                search_range=(bottom, top),
            )
        except ValueError as err:
            raise ValueError(
                f"config key sum-bits = {cfg.sum_bits}: target-epsilon {cfg.target_epsilon:g} "
                f"needs more noise than {cfg.sum_bits}-bit sums carry (at most z = {top:.4g} "
                f"here): use more bits or a larger target ({err})"
            ) from None
        calibrated = True
    plan = encoding_for(cfg, dim, z)
    if calibrated:
        plan = dataclasses.replace(plan, calibrated_rounds=cfg.rounds)
    return NoisePlan(z, calibrated, encoding=plan.to_dict())


def resolve_noise(cfg: RunConfig, dim: int | None = None) -> NoisePlan:
    """The noise from the config: z as given, or (noise-multiplier = 0 with a target-epsilon)
    calibrated so the planned rounds spend exactly the target. With min-replies, the count is
    noised too (z_c = count-noise-multiplier, or 10 z) and the calibration is of z_eff, the
    multiplier every attempt is charged at. Either way a run with a target stops before an
    attempt that would exceed it. Distributed DP needs ``dim``, the coordinates of an update."""
    if not cfg.dp_enabled:
        return NoisePlan(0.0, False)
    if cfg.distributed:
        if dim is None:
            raise ValueError("distributed DP's noise depends on the update's size: pass dim")
        return resolve_distributed(cfg, dim)
    counted = cfg.min_replies > 0
    if cfg.target_epsilon > 0 and cfg.noise_multiplier == 0:
        # with DP federated evaluation, training alone spends (1 - share) of the target
        share = cfg.eval_budget_share if cfg.eval_mode == "dp" else 0.0
        z_eff = calibrate_noise_multiplier(
            cfg.target_epsilon * (1 - share),
            cfg.resolved_delta,
            cfg.sample_rate,
            cfg.rounds,
            cfg.accountant,
        )
        if not counted:
            return NoisePlan(z_eff, True)
        if cfg.count_noise_multiplier > 0:
            z_c = cfg.count_noise_multiplier
            try:
                z = sum_noise_multiplier(z_eff, z_c)
            except ValueError as err:
                raise ValueError(f"config key count-noise-multiplier: {err}") from None
        else:
            z = z_eff * math.sqrt(1 + COUNT_NOISE_RATIO**-2)
            z_c = COUNT_NOISE_RATIO * z
        # a hair more noise, so rounding can never put z_eff below the calibrated value
        return NoisePlan(z * (1 + 1e-12), True, z_c * (1 + 1e-12))
    z = cfg.noise_multiplier
    if not counted:
        return NoisePlan(z, False)
    return NoisePlan(z, False, cfg.count_noise_multiplier or COUNT_NOISE_RATIO * z)


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
        count_noise_multiplier=noise.count_noise_multiplier,
        encoding=noise.encoding_plan,
        rotation_seed=cfg.seed,
    )


def distributed_statement(cfg: RunConfig, spec: ServerSpec) -> dict[str, Any]:
    """The encoding, the accounting inputs and the checks of a distributed-DP run."""
    from scipy.stats import binom

    plan = spec.encoding
    single = epsilon_for_segments(
        [Segment(spec.noise_multiplier, 1.0, 1, plan.l2, plan.l1)], spec.delta, "rdp"
    )
    below = (
        float(binom.cdf(plan.min_contributors - 1, cfg.population, cfg.sample_rate))
        if spec.sampling == "poisson"
        else 0.0
    )
    return {
        **DISTRIBUTED_CHECKS,
        "mechanism": "Skellam (Agarwal et al. 2021): each client adds Sk(mu / t); RDP bound "
        "and Zhu-Wang Poisson subsampling written by hand (no library has them)",
        "sum_bits": plan.bits,
        "scale": plan.scale,
        "padded_dim": plan.padded,
        "min_contributors": plan.min_contributors,
        "largest_cohort_covered": plan.max_cohort,
        "wrap_probability_per_round": plan.wrap_probability,
        "l2_sensitivity_integer": plan.l2,
        "l1_sensitivity_integer": plan.l1,
        "total_noise_variance_integer": plan.total_variance,
        "share_noise_variance_integer": plan.share_variance,
        "noise_std_float_at_min_contributors": plan.noise_std_float(plan.min_contributors),
        "epsilon_per_round_unsampled": single.epsilon,
        "released_below_threshold_probability": below,
    }


def privacy_statement(
    cfg: RunConfig,
    spec: ServerSpec,
    ledger_segments,
    noise_label: str,
    rounds_run: int,
    sampling_label: str = "",
    rounds_planned: list[int] | None = None,
) -> dict[str, Any]:
    """The (epsilon, delta) of the attempts actually charged, with every assumption it rests
    on: adjacency, sampling (and whether its randomness is secret), delta, who is trusted.
    ``rounds_planned``: the planned rounds of the first run and of each extension."""
    statement: dict[str, Any] = {
        "dp": spec.dp,
        "rounds_run": rounds_run,
        "rounds_planned": cfg.rounds,
        "noise_source": noise_label,
        "cohort_source": sampling_label,
    }
    if rounds_planned and len(rounds_planned) > 1:
        statement["rounds_extended_from"] = list(rounds_planned[:-1])
    if not spec.dp:
        statement["text"] = "DP is off (clip-norm = 0): no privacy guarantee."
        return statement
    statement.update(
        {
            "dp_mode": "distributed" if spec.encoding is not None else "central",
            "threat_model": THREAT_MODEL if spec.encoding is None else THREAT_MODEL_DISTRIBUTED,
            "assumptions": list(ASSUMPTIONS),
            "adjacency": ADJACENCY if spec.encoding is None else ADJACENCY_DISTRIBUTED,
            "sampling": SAMPLING if spec.sampling == "poisson" else "fixed-size cohorts",
            "sample_rate": spec.sample_rate,
            "expected_cohort": spec.expected_cohort,
            "population": spec.population,
            "noise_multiplier": spec.noise_multiplier,
            "count_noise_multiplier": spec.count_noise_multiplier,
            "charged_noise_multiplier": spec.charged_noise_multiplier,
            "sigma_dp": spec.noise_multiplier / spec.expected_cohort,
            "clip_norm": spec.clip.clip_norm,
            "clip_scheme": spec.clip.scheme,
            "clip_mode": spec.clip.mode,
            "clip_location": spec.clip_location,
            "delta": spec.delta,
        }
    )
    if spec.encoding is not None:
        statement["distributed"] = distributed_statement(cfg, spec)
    if cfg.delta * cfg.population >= 1:
        statement["delta_warning"] = (
            f"delta = {spec.delta:g} >= 1/population (allow-large-delta): a mechanism that "
            "releases one whole user's data with probability delta meets this guarantee"
        )
    if spec.noise_multiplier == 0:
        statement["epsilon"] = {
            name: {"epsilon": math.inf, "accountant": name, "note": "no noise"}
            for name in ACCOUNTANTS
        }
        statement["rounds_charged"] = sum(seg.steps for seg in ledger_segments)
        statement["text"] = (
            f"no noise: epsilon = inf. Updates were clipped ({spec.clip.scheme} "
            f"C={spec.clip.clip_norm:g} on the {spec.clip_location}) but no noise was added "
            "(noise-multiplier = 0, target-epsilon = 0): a clipping baseline with no DP "
            "guarantee"
        )
        return statement
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
    charged = sum(seg.steps for seg in ledger_segments)
    statement["rounds_charged"] = charged
    extra = charged - rounds_run
    why = (
        f" ({rounds_run} run + {extra} charged again: replayed after a crash, or discarded "
        "for too few replies)"
        if extra
        else ""
    )
    count = (
        f", count noise z_c={spec.count_noise_multiplier:.4g} (charged at "
        f"z_eff={spec.charged_noise_multiplier:.4g})"
        if spec.count_noise_multiplier > 0
        else ""
    )
    insecure = "INSECURE" in noise_label or "INSECURE" in sampling_label
    large_delta = " -- WARNING: delta >= 1/population" if "delta_warning" in statement else ""
    statement["text"] = (
        f"(epsilon, delta) = ({eps:.4g}, {spec.delta:g}){large_delta} under {main['accountant']}, "
        f"Poisson sampling, q={spec.sample_rate:.4g}, T={charged}{why}; user-level DP "
        f"({statement['adjacency']}), clip {spec.clip.scheme} C={spec.clip.clip_norm:g} on the "
        f"{spec.clip_location}, z={spec.noise_multiplier:.4g}{count}; noise: {noise_label}"
        + (f"; cohorts: {sampling_label}" if sampling_label else "")
        + (
            " -- INSECURE: the noise or the cohorts can be recomputed from the config, so "
            "this epsilon does not hold against anyone who has it"
            if insecure
            else ""
        )
    )
    if spec.encoding is not None:
        plan = spec.encoding
        statement["text"] += (
            f"; distributed DP: each client adds Skellam noise to a {plan.bits}-bit encoding, "
            f"at least {plan.min_contributors} contributions per released sum (a round is not "
            f"released with fewer: probability "
            f"{statement['distributed']['released_below_threshold_probability']:.2g} per "
            "round, not accounted), the server sees only the sum (secure aggregation under "
            f"Flower); adjacency: {ADJACENCY_DISTRIBUTED}"
        )
    return statement
