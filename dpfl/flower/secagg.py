"""Secure aggregation under Flower for distributed DP: flwr 1.42's own SecAgg+, driven by DPFedAvg.

The route and what had to change:

* Server. ``SecAggPlusWorkflow`` runs only inside a ``LegacyContext``: it asks a legacy
  ``Strategy`` for the cohort (``configure_fit``) and hands it the unmasked sum
  (``aggregate_fit``). DPFedAvg stays the Message-API strategy that runs the round loop; for each
  round its ``collect`` builds a ``LegacyContext`` around :class:`_Cohort`, a small legacy
  strategy that addresses exactly the nodes of dpfl's secret Poisson cohort and keeps the sum,
  and runs the workflow's four stages (setup, share keys, collect masked vectors, unmask) on the
  same ``Grid``. Every sampled node holds a share of every other's secrets (``num_shares`` = the
  cohort) and the reconstruction threshold is ``min-contributors``.
* Client. ``secaggplus_mod`` reads the ClientApp's reply as a legacy ``FitRes`` and quantises its
  float parameters itself, which would round a second time. dpfl's reply is instead the integer
  encoding (:mod:`dpfl.privacy.distributed`, noise share included) as one float64 array of
  integers in [0, 2^b), with ``num_examples`` = ``max_weight`` = 1 and SecAgg+'s quantisation set
  so that it is the identity on those integers: clipping range 2^b, quantisation range 2^(b+1)
  (a quantiser of exactly 1, an offset of 2^b, nothing to round). The masks work modulo
  M = 2^(b+1+ceil(log2(n+1))), a multiple of 2^b larger than the weights' sum, so the unmasked sum
  reduced modulo 2^b is exactly the sum of the encodings modulo 2^b (:func:`exact_sum` undoes the
  workflow's float de-quantisation, exact in float64).
* The mod is applied only to messages that carry SecAgg+'s configs (:func:`secagg_mod`), so one
  ClientApp serves central and distributed runs.

The server never receives an individual encoding: only masked vectors and the sum.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from dpfl.privacy.distributed import EncodingPlan

log = logging.getLogger(__name__)

MAX_MODULUS_BITS = 31
"""flwr documents modulus_range as "less than 4294967296": the largest power of two is 2^31."""


def ranges(bits: int, cohort: int) -> tuple[float, int, int]:
    """(clipping range, quantisation range, modulus) under which SecAgg+ passes integers in
    [0, 2^b) through exactly and sums ``cohort`` of them without touching their weights."""
    clipping = float(1 << bits)
    quantisation = 1 << (bits + 1)
    modulus_bits = bits + 1 + math.ceil(math.log2(cohort + 1))
    if modulus_bits > MAX_MODULUS_BITS:
        raise ValueError(
            f"sum-bits = {bits} with a cohort of {cohort} needs SecAgg+ masks modulo "
            f"2^{modulus_bits}, above its limit 2^{MAX_MODULUS_BITS}: use fewer sum-bits"
        )
    return clipping, quantisation, 1 << modulus_bits


def exact_sum(aggregated: np.ndarray, contributors: int, bits: int) -> np.ndarray:
    """The sum of the encodings modulo 2^b from the workflow's output, which it de-quantised
    to floats as (sum + n 2^b mod M - n 2^b) / n."""
    values = np.rint(np.asarray(aggregated, dtype=np.float64) * contributors).astype(np.int64)
    return np.mod(values, 1 << bits)


class _Cohort(Strategy):
    """The legacy strategy SecAgg+'s workflow needs for one round: dpfl's cohort, and the sum."""

    def __init__(self, nodes: list[int], grid: Grid, config: dict) -> None:
        self.nodes, self.grid, self.config = nodes, grid, config
        self.total: np.ndarray | None = None
        self.contributors = 0
        self.failures = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        fit = FitIns(parameters, dict(self.config))
        return [(GridClientProxy(node, self.grid, run_id), fit) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = len(failures)
        if results:
            self.contributors = len(results)
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            self.total = arrays[0]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(
    grid: Grid,
    round_number: int,
    nodes: list[int],
    weights: dict,
    config: dict,
    plan: EncodingPlan,
    timeout: float,
) -> tuple[np.ndarray | None, int, int]:
    """Run SecAgg+ over ``nodes`` for one round: (the sum of their encodings modulo 2^b, or
    None when the protocol halted; the number of contributions in it; failed replies)."""
    if len(nodes) < max(2, plan.min_contributors):
        return None, 0, 0  # SecAgg+ needs two nodes; the sum would not be released anyway
    clipping, quantisation, modulus = ranges(plan.bits, len(nodes))
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled node holds a share of every other's secrets
        reconstruction_threshold=plan.min_contributors,
        max_weight=1.0,
        clipping_range=clipping,
        quantization_range=quantisation,
        modulus_range=modulus,
        timeout=timeout,
    )
    cohort = _Cohort(nodes, grid, config)
    base = Context(
        run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    context = LegacyContext(base, ServerConfig(num_rounds=1), cohort, SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: round_number}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        [w.detach().cpu().numpy() for w in weights.values()]
    )
    state = WorkflowState()
    for stage in (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
        workflow.unmask_stage,
    ):
        if not stage(grid, context, state):
            log.warning("round %d: secure aggregation halted at %s", round_number, stage.__name__)
            return None, 0, len(state.failures)
    if cohort.total is None:
        return None, 0, cohort.failures
    return (
        exact_sum(cohort.total, cohort.contributors, plan.bits),
        cohort.contributors,
        (cohort.failures),
    )


ENCODING_PREFIX = "dpfl-encoding."
NONCE_KEY = "dpfl-noise-nonce"
"""The attempt's key for reproducible client noise (0 and unused in secure mode)."""
ALLOW_REPRODUCIBLE_KEY = "allow-reproducible-noise"
"""Node-config key: a node draws its noise share from the server's noise-seed only if its own
operator allows it (reproducible mode is for experiments: the server can then recompute every
share, which voids the distributed guarantee)."""


def secagg_threshold(context: Context) -> int | None:
    """The reconstruction threshold of this node's current SecAgg+ round (from secaggplus_mod's
    state, saved at its setup stage), or None."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or "threshold" not in state:
        return None
    return int(state["threshold"])


def plan_config(plan: EncodingPlan) -> dict:
    """The encoding plan as config values (public: every client of the round gets them)."""
    return {ENCODING_PREFIX + key: value for key, value in plan.to_dict().items()}


def pop_plan(values: dict) -> EncodingPlan | None:
    """The encoding plan a message carries (taken out of ``values``), or None."""
    fields = {k[len(ENCODING_PREFIX) :]: values.pop(k) for k in list(values)
              if k.startswith(ENCODING_PREFIX)}  # fmt: skip
    return EncodingPlan(**fields) if fields else None


def check_plan(plan: EncodingPlan, cfg, dim: int) -> None:
    """A client's checks of the plan the server sent against the run config and its own model
    (ValueError): the bound it clips to, the bits, the threshold its noise share is cut for, the
    integer sensitivities (recomputed here), and the noise: a given noise multiplier exactly,
    a calibrated one by the epsilon the planned rounds would spend at it (at most the target)."""
    from dpfl.privacy.clipping import sensitivity_bound
    from dpfl.privacy.distributed import padded_dim, rounded_l2_bound

    l2 = rounded_l2_bound(plan.scale * plan.clip_norm, padded_dim(dim))
    problems = {
        "clip bound": math.isclose(plan.clip_norm, sensitivity_bound(cfg.clip_norm)),
        "sum-bits": plan.bits == cfg.sum_bits,
        "min-contributors": plan.min_contributors == cfg.resolved_min_contributors,
        "update size": plan.dim == dim,
        "L2 sensitivity": math.isclose(plan.l2, l2, rel_tol=1e-9),
        "L1 sensitivity": math.isclose(
            plan.l1, min(l2 * l2, math.sqrt(padded_dim(dim)) * l2), rel_tol=1e-9
        ),
        "noise multiplier": cfg.noise_multiplier == 0
        or math.isclose(plan.noise_multiplier, cfg.noise_multiplier),
        "noise": plan.noise_multiplier > 0,
    }
    if cfg.noise_multiplier == 0 and cfg.target_epsilon > 0 and all(problems.values()):
        # a calibrated z: the client checks that it spends no more than the run's target
        from dpfl.privacy.accounting import Segment, epsilon_for_segments

        rounds = plan.calibrated_rounds or cfg.rounds  # an extension keeps the calibrated z
        segment = Segment(plan.noise_multiplier, cfg.sample_rate, rounds, plan.l2, plan.l1)
        spent = epsilon_for_segments([segment], cfg.resolved_delta).epsilon
        problems["noise for target-epsilon"] = spent <= cfg.target_epsilon * (1 + 1e-9)
    wrong = [name for name, ok in problems.items() if not ok]
    if wrong:
        raise ValueError(
            f"the server's encoding plan does not match this client's run config and model "
            f"({', '.join(wrong)}): refused"
        )


# --- the client's side ---------------------------------------------------------------------


def is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """flwr's ``secaggplus_mod`` for the messages of a SecAgg+ round, and nothing else."""
    if is_secagg(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def legacy_fit(msg: Message) -> tuple[list[np.ndarray], dict] | None:
    """The arrays and config of a legacy FitIns (SecAgg+'s masked-vector stage), or None."""
    if "fitins.parameters" not in msg.content.array_records:
        return None
    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return parameters_to_ndarrays(fit.parameters), dict(fit.config)


def legacy_reply(msg: Message, encoded: np.ndarray) -> Message:
    """The FitRes SecAgg+'s mod masks: the encoding as integer-valued float64, weight 1."""
    parameters: Parameters = ndarrays_to_parameters([encoded.astype(np.float64)])
    fitres = FitRes(Status(Code.OK, "ok"), parameters, 1, {})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
