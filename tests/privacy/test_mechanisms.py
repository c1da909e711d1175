import math

import numpy as np
import pytest
import torch

from dpfl.privacy.clipping import ClipConfig, clip_update
from dpfl.privacy.mechanisms import (
    GaussianMechanism,
    NoiseSource,
    effective_noise_multiplier,
    noise_multiplier_from_sigma_dp,
    noisy_count,
    sigma_dp_from_noise_multiplier,
    sum_noise_multiplier,
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


def test_secure_key_comes_straight_from_the_os_source(monkeypatch):
    import dpfl.privacy.randomness as r

    calls = []
    real = r.secrets.token_bytes

    def recording(n):
        key = real(n)
        calls.append(key)
        return key

    monkeypatch.setattr(r.secrets, "token_bytes", recording)
    source = NoiseSource()
    assert len(calls) == 1 and len(calls[0]) >= 16  # 128-bit AES or 256-bit ChaCha key
    got = source.standard_normal(10_000).numpy()
    # the draws are exactly the cipher's stream under that key (not a seed expanded from it)
    expected = np.empty(10_000, dtype=np.float32)
    r.CipherStreams(calls[0], source.cipher, secure=True).standard_normal(expected)
    assert np.array_equal(got, expected)
    with pytest.raises(RuntimeError, match="never exports"):
        source.get_state()


def test_a_seed_and_its_low_32_bits_give_different_noise():
    # MT19937 kept 32 bits of a seed: seed and seed mod 2^32 gave identical noise
    seed = (1 << 40) + 12345
    a = NoiseSource(seed=seed).standard_normal(1000)
    b = NoiseSource(seed=seed & 0xFFFFFFFF).standard_normal(1000)
    assert not torch.equal(a, b)


def test_noise_of_many_tensors_is_one_bulk_draw(monkeypatch):
    source = NoiseSource(seed=3)
    calls = []
    real = source._streams.standard_normal
    monkeypatch.setattr(
        source._streams, "standard_normal", lambda out: calls.append(out.size) or real(out)
    )
    summed = {f"layer{i}": torch.zeros(100 + i) for i in range(20)}
    noisy = GaussianMechanism(1.0, 1.0, source).add_noise(summed)
    assert calls == [sum(100 + i for i in range(20))]  # one draw for all twenty tensors
    flat = torch.cat([t for t in noisy.values()])
    assert len(torch.unique(flat)) == flat.numel()  # no tensor reuses another's draws


def test_reproducible_source_resumes_from_its_state():
    a = NoiseSource(seed=9)
    a.standard_normal(3 * 2**20 + 5)  # several streams
    state = a.get_state()
    expected = a.standard_normal(1000)
    b = NoiseSource(seed=9)
    b.set_state(state)
    assert torch.equal(b.standard_normal(1000), expected)
    with pytest.raises(ValueError, match="not this source"):
        NoiseSource(seed=9).set_state(torch.zeros(5))  # an old (torch generator) state


def test_noisy_count_has_std_z_c_and_the_effective_multiplier_composes():
    source = NoiseSource(seed=1)
    draws = np.array([noisy_count(40, 3.0, source) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(40, abs=4 * 3.0 / math.sqrt(20_000))
    assert draws.std() == pytest.approx(3.0, rel=0.03)
    z_eff = effective_noise_multiplier(0.8, 8.0)
    assert z_eff == pytest.approx((0.8**-2 + 8.0**-2) ** -0.5)
    assert effective_noise_multiplier(0.8, 0.0) == 0.8  # no count released
    assert sum_noise_multiplier(z_eff, 8.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="must exceed"):
        sum_noise_multiplier(1.0, 0.9)


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


def test_in_place_noise_equals_the_copying_path_and_reuses_its_buffer():
    sums = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    copy = GaussianMechanism(1.5, 0.5, NoiseSource(seed=11)).noisy_mean(sums, 4.0)
    assert torch.equal(sums["a"], torch.arange(6.0).reshape(2, 3))  # untouched
    source = NoiseSource(seed=11)
    mech = GaussianMechanism(1.5, 0.5, source)
    own = {k: v.clone() for k, v in sums.items()}
    out = mech.noisy_mean(own, 4.0, inplace=True)
    assert out["a"] is own["a"]  # computed in the server's own sum
    for k in sums:
        torch.testing.assert_close(out[k], copy[k], rtol=1e-6, atol=1e-7)
    buffer = source._scratch
    mech.noisy_mean({k: v.clone() for k, v in sums.items()}, 4.0, inplace=True)
    assert source._scratch is buffer  # the next round draws into the same memory
