import numpy as np
import pytest

from dpfl.server.sampling import sample_cohort


def test_poisson_cohorts_are_reproducible_and_have_rate_q():
    a = sample_cohort(1000, 0.05, seed=1, round_number=3)
    assert np.array_equal(a, sample_cohort(1000, 0.05, seed=1, round_number=3))
    assert not np.array_equal(a, sample_cohort(1000, 0.05, seed=1, round_number=4))
    counts = np.zeros(1000)
    sizes = []
    for r in range(2000):
        c = sample_cohort(1000, 0.05, seed=1, round_number=r)
        assert len(np.unique(c)) == len(c) and np.all(np.diff(c) > 0)
        counts[c] += 1
        sizes.append(len(c))
    # each user joins a round with probability q; sizes vary like Binomial(K, q)
    assert counts.mean() / 2000 == pytest.approx(0.05, rel=0.02)
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.05 * 0.95), rel=0.1)
    # no user is favoured: the busiest user is within ~5 sd of the mean
    assert counts.max() < 100 + 5 * np.sqrt(2000 * 0.05 * 0.95)


def test_fixed_size_and_large_population():
    assert len(sample_cohort(1000, 0.05, 0, 1, "fixed")) == 50
    big = sample_cohort(1_000_000, 50 / 1_000_000, seed=0, round_number=1)
    assert 20 < len(big) < 90 and big.max() < 1_000_000


@pytest.mark.parametrize("args", [(0, 0.1), (10, 0.0), (10, 1.5)])
def test_bad_sampling_input(args):
    with pytest.raises(ValueError):
        sample_cohort(*args, seed=0, round_number=1)
