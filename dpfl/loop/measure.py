"""What a run measures after its server step: the evaluation of the global model, and the
privacy spent (before an attempt, whether the budget allows it; after, the per-round epsilon)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dpfl.api import hook
from dpfl.client.train import load_weights
from dpfl.privacy.accounting import EpsilonResult
from dpfl.profiling import section

if TYPE_CHECKING:
    from dpfl.loop.run import FederatedRun


def central_evaluation(run: FederatedRun) -> dict[str, float]:
    """The task's evaluation of the global model: on the central test set, or per client
    with its private parameters (a simulation-only diagnostic)."""
    federated = hook(run.task, "evaluate_federated")
    if run.private and federated is not None:
        # per client, with its private parameters (available in simulation only)
        run.eval_uses_private = True
        return federated(
            run.model,
            run.dataset,
            run.state.weights(),
            run.private_store.get,
            load_weights,
        )
    load_weights(run.model, run.state.weights())
    kept_stats = [b for b in run.buffers if run.private and run.private(b)]
    if kept_stats:
        # Norm statistics kept by the clients: the simulator evaluates the global model
        # with their mean over the users trained so far (a simulation-only diagnostic; a
        # deployed server never sees them). Before any user trained: the initial ones.
        stored = [u for u in run.private_store.values() if kept_stats[0] in u]
        run.eval_uses_private = run.eval_uses_private or bool(stored)
        source = stored or [run.initial_private]
        load_weights(
            run.model,
            {b: torch.stack([u[b].float() for u in source]).mean(0) for b in kept_stats},
        )
    if run.test_data is None:
        return {}  # a dataset without a central test set: no server-side evaluation
    return run.task.evaluate(run.model, run.test_data)



def budget_ahead(run: FederatedRun) -> EpsilonResult | None:
    """Epsilon under the configured accountant if one more attempt is charged (None when
    there is no budget to keep)."""
    cfg, spec = run.cfg, run.spec
    if not (cfg.target_epsilon > 0 and spec.accounted):
        return None
    with section("accounting"):
        return run.state.ledger.epsilon_after(
            spec.charged_noise_multiplier,
            spec.sample_rate,
            1,
            spec.delta,
            cfg.accountant,
            fallback=True,
            skellam=spec.skellam,
        )

def epsilon_metrics(
    run: FederatedRun, metrics: dict[str, Any], ahead: EpsilonResult | None, last: bool
) -> None:
    """Per-round epsilon, named by the accountant that computed it: RDP every round
    (cheap), the configured accountant whenever the budget check computed it (every
    attempt when there is a target) and otherwise on evaluation rounds and the last."""
    cfg, spec = run.cfg, run.spec
    if not spec.accounted or cfg.accountant == "rdp":
        return
    if ahead is None and not (last or metrics["round"] % cfg.eval_every == 0):
        return
    if ahead is None:
        with section("accounting"):
            ahead = run.state.ledger.epsilon(spec.delta, cfg.accountant, fallback=True)
    if ahead.accountant != "rdp":
        metrics[f"epsilon_{ahead.accountant}"] = ahead.epsilon

