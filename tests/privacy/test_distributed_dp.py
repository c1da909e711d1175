"""Distributed DP's encoding: rotation, conditional rounding, Skellam shares, modular sum, decoding,
the wrap bound and the checks on the sum."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl.privacy import distributed as D


def unit(d: int, norm: float, seed: int) -> torch.Tensor:
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm() * norm * (1 - 1e-12)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    x = torch.randn(256, dtype=torch.float64)
    y = D.hadamard(x)
    assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-12)
    assert torch.allclose(D.hadamard(y), x, atol=1e-12)
    # against the dense Sylvester matrix
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 256:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert torch.allclose(y, h @ x / 16, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        D.hadamard(torch.ones(6))


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 700),
    n=st.integers(1, 6),
    bits=st.sampled_from([12, 16, 20]),
    seed=st.integers(0, 2**16),
)
def test_encode_sum_decode_is_the_float_sum_within_the_quantisation(d, n, bits, seed):
    # no noise to speak of (z tiny): the decoded sum differs from the float sum only by the
    # rounding, at most 1 per coordinate and client before the (orthonormal) inverse rotation
    plan = D.plan_encoding(d, 1.0, 1e-9, bits, 1, n)
    signs = D.rotation_signs(seed, 3, plan.padded)
    rng = np.random.default_rng(seed)
    xs = [unit(d, float(rng.uniform(0, 1)), seed + i) for i in range(n)]
    total = D.ModularSum(plan, exact=True)
    for x in xs:
        total.add(D.encode(x, plan, signs, rng))
    D.check_exact(total)
    decoded = D.decode(total.total, plan, signs)
    error = float((decoded - sum(xs)).norm())
    assert error <= n * math.sqrt(plan.padded) / plan.scale


def test_the_scale_is_the_largest_that_keeps_the_stated_wrap_bound():
    plan = D.plan_encoding(3000, 0.5, 1.2, 16, 5, 30)
    args = (30, 3000, 0.5, 1.2, 5, D.WRAP_PROBABILITY)
    half = (1 << 15) - 1
    assert sum(D._tail_terms(plan.scale, *args)[:3]) <= half
    assert sum(D._tail_terms(plan.scale * 1.001, *args)[:3]) > half
    assert plan.wrap_probability == 1e-9
    # conditional rounding: Delta_2 is at least the scaled clip bound, and L1 <= Delta_2^2
    assert plan.l2 >= plan.scale * 0.5 and plan.l1 <= plan.l2**2
    with pytest.raises(ValueError, match="too few"):
        D.plan_encoding(3000, 0.5, 1.2, 4, 5, 30)


def test_the_rounding_bound_is_enforced():
    plan = D.plan_encoding(100, 1.0, 1e-9, 8, 1, 1)
    signs = D.rotation_signs(0, 1, plan.padded)
    rng = np.random.default_rng(0)
    for seed in range(50):
        v = D.encode(unit(100, 1.0, seed), plan, signs, rng)
        c = D.centred(v, plan.bits).astype(float)
        assert float(np.sqrt((c * c).sum())) <= plan.l2 + 1e-9


def test_an_update_above_the_clip_bound_is_never_encoded():
    plan = D.plan_encoding(10, 1.0, 1.0, 16, 1, 4)
    signs = D.rotation_signs(0, 1, plan.padded)
    with pytest.raises(ValueError, match="exceeds the clip bound"):
        D.encode(unit(10, 1.01, 0), plan, signs, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not"):
        D.encode(torch.full((10,), float("nan")), plan, signs, np.random.default_rng(0))


def test_the_integer_noise_has_the_planned_variance():
    plan = D.plan_encoding(40_000, 1.0, 1.5, 20, 4, 8)
    signs = D.rotation_signs(0, 1, plan.padded)
    shares = [
        D.centred(D.encode(torch.zeros(40_000), plan, signs, D.client_generator(None, 1, u)), 20)
        for u in range(4)
    ]
    # a zero update rounds to zero: what is left is the shares
    one = shares[0].astype(float)
    assert one.var() == pytest.approx(plan.share_variance, rel=0.03)
    assert abs(one.mean()) < 4 * math.sqrt(plan.share_variance / one.size)
    summed = np.sum(shares, axis=0).astype(float)  # t shares: Sk(mu) exactly
    assert summed.var() == pytest.approx(plan.total_variance, rel=0.03)
    assert plan.total_variance == pytest.approx((1.5 * plan.l2) ** 2)


def test_reproducible_shares_repeat_and_secret_ones_do_not():
    a = D.client_generator(7, 2, 3).random(4)
    assert np.array_equal(a, D.client_generator(7, 2, 3).random(4))
    assert not np.array_equal(a, D.client_generator(7, 2, 4).random(4))
    assert not np.array_equal(D.client_generator(None, 2, 3).random(4), a)


def test_a_wrap_fails_the_simulator_loudly():
    plan = D.plan_encoding(64, 1.0, 1e-9, 8, 1, 4)
    scale = plan.scale * 50  # far beyond the bound
    l2 = D.rounded_l2_bound(scale, plan.padded)
    big = dataclasses.replace(plan, scale=scale, l2=l2, l1=l2 * l2)
    signs = D.rotation_signs(0, 1, big.padded)
    total = D.ModularSum(big, exact=True)
    x = torch.zeros(64, dtype=torch.float64)
    x[0] = 1.0  # the same spike from every client
    for _ in range(4):
        values = D.encode(x, big, signs, np.random.default_rng(0), reduce=False)
        total.add(np.mod(values, big.modulus), values)
    with pytest.raises(D.WrapError, match="left"):
        D.check_exact(total)


def test_the_boundary_heuristic_counts_coordinates_near_the_edge():
    plan = D.plan_encoding(1000, 1.0, 1.0, 16, 3, 10)
    quiet = np.zeros(plan.padded, dtype=np.int64)
    assert D.near_boundary(quiet, 16) == 0
    edge = quiet.copy()
    edge[:5] = (1 << 15) - 3  # just inside the top
    edge[5:10] = (1 << 16) - (1 << 15) + 2  # just inside the bottom, modulo 2^16
    assert D.near_boundary(edge, 16) == 10
    assert D.boundary_limit(plan, 10) < 10
