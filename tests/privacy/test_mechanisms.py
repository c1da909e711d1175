import math

import pytest
import torch

from dpfl.privacy.clipping import ClipConfig, clip_update
from dpfl.privacy.mechanisms import (
    GaussianMechanism,
    NoiseSource,
    noise_multiplier_from_sigma_dp,
    sigma_dp_from_noise_multiplier,
)

N_DRAWS = 2_000_000


def test_noise_on_the_sum_has_std_z_times_c_and_mean_zero():
    z, c = 1.3, 0.7
    mech = GaussianMechanism(z, c, NoiseSource(seed=1234))
    zeros = [
        torch.zeros(N_DRAWS // 2, dtype=torch.float64),
        torch.zeros(1000, 1000, dtype=torch.float64),
    ]
    noisy = mech.add_noise(zeros)
    draws = torch.cat([t.reshape(-1) for t in noisy])
    assert draws.numel() >= 10**6
    std = draws.std().item()
    assert abs(std / (z * c) - 1) < 0.01
    standard_error = z * c / math.sqrt(draws.numel())
    assert abs(draws.mean().item()) < 3 * standard_error
    # every coordinate is noised independently: neighbouring coordinates are uncorrelated
    x = draws[:-1] - draws[:-1].mean()
    y = draws[1:] - draws[1:].mean()
    corr = (x * y).mean().item() / (x.std().item() * y.std().item())
    assert abs(corr) < 5 / math.sqrt(draws.numel())


def test_noise_reaching_the_average_is_z_c_over_expected_cohort():
    """End to end: clip every client's update, sum, noisy mean over q*K; the residual against the
    exact mean of the clipped updates has std z*C / (q*K) (here 17 of an expected 20 replied)."""
    torch.manual_seed(0)
    z, c = 2.0, 0.5
    population, q = 400, 0.05
    expected = q * population  # 20
    cfg = ClipConfig(c, scheme="dim")
    replied = 17  # fewer than expected: the divisor must not change
    shapes = [(300, 1000), (1000,), (50, 20, 10)]
    clipped = []
    for _ in range(replied):
        update = [torch.randn(s, dtype=torch.float64) * 3 for s in shapes]
        clipped.append(clip_update(update, cfg)[0])
    summed = [sum(parts) for parts in zip(*clipped, strict=True)]
    mech = GaussianMechanism(z, c, NoiseSource(seed=7))
    mean = mech.noisy_mean(summed, expected_cohort_size=expected)
    residual = torch.cat(
        [(m - s / expected).reshape(-1) for m, s in zip(mean, summed, strict=True)]
    )
    assert residual.numel() > 10**5
    assert residual.std().item() == pytest.approx(z * c / expected, rel=0.01)


def test_secure_source_draws_differ_and_seeded_source_reproduces():
    a, b = NoiseSource(), NoiseSource()
    t = torch.zeros(1000)
    assert a.secure and b.secure
    assert "secure" in a.label and "INSECURE" not in a.label
    assert not torch.equal(a.gaussian_like(t, 1.0), b.gaussian_like(t, 1.0))
    s1, s2 = NoiseSource(seed=42), NoiseSource(seed=42)
    assert not s1.secure and "INSECURE" in s1.label and "42" in s1.label
    assert torch.equal(s1.gaussian_like(t, 1.0), s2.gaussian_like(t, 1.0))


def test_secure_seed_comes_from_the_os_source(monkeypatch):
    import dpfl.privacy.mechanisms as m

    calls = []

    def fake_randbits(k):
        calls.append(k)
        return 99

    monkeypatch.setattr(m.secrets, "randbits", fake_randbits)
    t = torch.zeros(100)
    got = m.NoiseSource().gaussian_like(t, 1.0)
    assert calls == [63]
    assert torch.equal(got, NoiseSource(seed=99).gaussian_like(t, 1.0))


def test_mechanism_keeps_structure_and_input():
    summed = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    out = GaussianMechanism(1.0, 1.0, NoiseSource(seed=0)).add_noise(summed)
    assert list(out) == ["w", "b"] and out["w"].shape == (3, 2)
    assert torch.equal(summed["w"], torch.ones(3, 2))


def test_zero_noise_is_the_identity():
    summed = [torch.arange(5.0)]
    mech = GaussianMechanism(0.0, 1.0, NoiseSource(seed=0))
    assert torch.equal(mech.add_noise(summed)[0], summed[0])
    assert torch.equal(mech.noisy_mean(summed, 5)[0], summed[0] / 5)


def test_paper_convention():
    # sigma_DP = 1e-5 at cohort 204,800 is z = 2.048 (the paper's eps = 4.5 row).
    assert noise_multiplier_from_sigma_dp(1e-5, 204_800) == pytest.approx(2.048)
    assert noise_multiplier_from_sigma_dp(3e-6, 204_800) == pytest.approx(0.6144)
    assert sigma_dp_from_noise_multiplier(2.048, 204_800) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: GaussianMechanism(-1.0, 1.0), "noise_multiplier"),
        (lambda: GaussianMechanism(float("nan"), 1.0), "noise_multiplier"),
        (lambda: GaussianMechanism(1.0, 0.0), "clip_norm"),
        (lambda: GaussianMechanism(1.0, 1.0).noisy_mean([torch.ones(1)], 0), "expected_cohort"),
        (lambda: GaussianMechanism(1.0, 1.0).add_noise([]), "empty"),
        (lambda: NoiseSource(seed=-3), "seed"),
        (lambda: noise_multiplier_from_sigma_dp(1e-5, 0), "cohort_size"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
