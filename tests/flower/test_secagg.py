"""SecAgg+ as dpfl drives it: flwr's own quantisation passes the encodings through exactly, the
masked sum decodes to the sum modulo 2^b, and a client refuses a plan that does not match its run
config (in process; the deployment itself is tests/test_secagg_deployment.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from dpfl.config import RunConfig
from dpfl.flower.secagg import check_plan, exact_sum, plan_config, pop_plan, ranges
from dpfl.loop.plan import resolve_noise, server_spec


@pytest.mark.parametrize("bits", [12, 16, 20])
@pytest.mark.parametrize("cohort", [2, 5, 37])
def test_secaggplus_quantisation_is_the_identity_on_encodings(bits, cohort):
    rng = np.random.default_rng(bits * 100 + cohort)
    clipping, quantisation, modulus = ranges(bits, cohort)
    encodings = [rng.integers(0, 1 << bits, 300) for _ in range(cohort)]
    # the client's side, as secaggplus_mod does it (weight 1 = max_weight: dq_ratio 1)
    masked = []
    seeds = [rng.bytes(32) for _ in range(cohort)]
    for k, e in enumerate(encodings):
        q = quantize([e.astype(np.float64)], clipping, quantisation)
        assert np.array_equal(q[0], e + (1 << bits))  # exact: nothing was rounded
        vec = factor_combine(quantisation, q)
        mask = pseudo_rand_gen(seeds[k], modulus, [a.shape for a in vec])
        masked.append(parameters_mod([v + m for v, m in zip(vec, mask, strict=True)], modulus))
    # the server's side: sum, remove the masks, de-quantise as the workflow does
    total = [sum(m[i] for m in masked) for i in range(2)]
    for k in range(cohort):
        mask = pseudo_rand_gen(seeds[k], modulus, [a.shape for a in total])
        total = [t - m for t, m in zip(total, mask, strict=True)]
    total = parameters_mod(total, modulus)
    factor, rest = int(total[0][0]), total[1:]
    assert factor == cohort * quantisation  # the weights' sum did not wrap
    floats = dequantize(rest, clipping, quantisation)[0]
    floats += -(cohort - 1) * clipping
    floats *= quantisation / factor
    expected = np.mod(np.sum(encodings, axis=0), 1 << bits)
    assert np.array_equal(exact_sum(floats, cohort, bits), expected)


def test_too_many_bits_for_secaggplus_masks_are_refused():
    with pytest.raises(ValueError, match="fewer sum-bits"):
        ranges(30, 5)


def plan_for(**over):
    cfg = RunConfig.from_mapping(
        {
            "population": 10,
            "cohort-size": 5.0,
            "noise-multiplier": 0.8,
            "target-epsilon": 0.0,
            "dp-mode": "distributed",
            "min-contributors": 3,
            **over,
        }  # fmt: skip
    )
    return cfg, server_spec(cfg, resolve_noise(cfg, 100)).encoding


def test_the_plan_travels_in_the_config_and_clients_check_it():
    cfg, plan = plan_for()
    values = {"rounds": 3, **plan_config(plan)}
    assert pop_plan(values) == plan and values == {"rounds": 3}
    check_plan(plan, cfg, 100)  # matches
    for wrong, match in (
        (dataclasses.replace(plan, min_contributors=5), "min-contributors"),
        (dataclasses.replace(plan, noise_multiplier=0.1), "noise multiplier"),
        (dataclasses.replace(plan, l2=plan.l2 / 2), "L2 sensitivity"),
        (dataclasses.replace(plan, bits=16), "sum-bits"),
    ):
        with pytest.raises(ValueError, match=match):
            check_plan(wrong, cfg, 100)
    with pytest.raises(ValueError, match="update size"):
        check_plan(plan, cfg, 99)


def test_a_client_refuses_a_calibrated_plan_that_would_overspend():
    cfg, plan = plan_for(**{"noise-multiplier": 0.0, "target-epsilon": 4.0, "rounds": 5})
    check_plan(plan, cfg, 100)  # the server's calibration: within the target
    with pytest.raises(ValueError, match="noise for target-epsilon"):
        check_plan(
            dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier * 0.8), cfg, 100
        )


def secure_message(cfg, plan, **extra):
    """A legacy FitIns as SecAgg+'s masked-vector stage delivers it: the model's arrays and the
    run config with the plan."""
    from dpfl import recipes

    model = recipes.build_task(cfg).build_model()
    arrays = [p.detach().numpy() for p in model.state_dict().values()]
    values = {**cfg.to_dict(), **plan_config(plan), "server-round": 1, **extra}
    return arrays, values


def test_a_client_refuses_a_threshold_below_min_contributors_and_an_unasked_noise_seed():
    from dpfl.flower.client_app import handle_secure_train

    cfg, _ = plan_for()
    dim = sum(
        p.numel() for p in __import__("dpfl.recipes", fromlist=["x"]).build_task(cfg)
        .build_model().parameters()
    )  # fmt: skip
    plan = server_spec(cfg, resolve_noise(cfg, dim)).encoding
    arrays, values = secure_message(cfg, plan)
    node = {"partition-id": 1}
    with pytest.raises(ValueError, match="reconstruction threshold 2"):
        handle_secure_train(values, arrays, node, threshold=2)
    encoded, _ = handle_secure_train(values, arrays, node, threshold=3)
    assert encoded.shape == (plan.padded,) and 0 <= encoded.min() and encoded.max() < 2**20
    # reproducible noise only where the node's operator allows it
    seeded = {**values, "noise-seed": 4, "dpfl-noise-nonce": 9}
    with pytest.raises(ValueError, match="allow-reproducible-noise"):
        handle_secure_train(seeded, arrays, node, threshold=3)
    allowed = {**node, "allow-reproducible-noise": "true"}
    a, _ = handle_secure_train(seeded, arrays, allowed, threshold=3)
    b, _ = handle_secure_train(seeded, arrays, allowed, threshold=3)
    c, _ = handle_secure_train({**seeded, "dpfl-noise-nonce": 10}, arrays, allowed, threshold=3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # keyed by the attempt's nonce
