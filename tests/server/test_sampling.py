import numpy as np
import pytest

from dpfl.server.sampling import CohortSampler, draw_cohort


def test_poisson_cohorts_are_reproducible_from_a_sampling_seed_and_have_rate_q():
    s = CohortSampler.from_seed(1)
    a = s.cohort(1000, 0.05, round_number=3)
    assert np.array_equal(a, CohortSampler.from_seed(1).cohort(1000, 0.05, round_number=3))
    assert not np.array_equal(a, s.cohort(1000, 0.05, round_number=4))
    assert not np.array_equal(a, s.cohort(1000, 0.05, round_number=3, attempt=1))
    assert not s.secure and "INSECURE" in s.label
    counts = np.zeros(1000)
    sizes = []
    for r in range(2000):
        c = s.cohort(1000, 0.05, round_number=r)
        assert len(np.unique(c)) == len(c) and np.all(np.diff(c) > 0)
        counts[c] += 1
        sizes.append(len(c))
    # each user joins a round with probability q; sizes vary like Binomial(K, q)
    assert counts.mean() / 2000 == pytest.approx(0.05, rel=0.02)
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.05 * 0.95), rel=0.1)
    # no user is favoured: the busiest user is within ~5 sd of the mean
    assert counts.max() < 100 + 5 * np.sqrt(2000 * 0.05 * 0.95)


def test_secret_samplers_cannot_be_recomputed():
    a, b = CohortSampler.secret(), CohortSampler.secret()
    assert a.secure and "INSECURE" not in a.label
    draws_a = [tuple(a.cohort(1000, 0.05, r)) for r in range(20)]
    draws_b = [tuple(b.cohort(1000, 0.05, r)) for r in range(20)]
    assert draws_a != draws_b
    # and no sampling seed reproduces a secret sampler's cohorts
    assert draws_a != [tuple(CohortSampler.from_seed(0).cohort(1000, 0.05, r)) for r in range(20)]


def test_fixed_size_and_large_population():
    s = CohortSampler.from_seed(0)
    assert len(s.cohort(1000, 0.05, 1, sampling="fixed")) == 50
    big = s.cohort(1_000_000, 50 / 1_000_000, round_number=1)
    assert 20 < len(big) < 90 and big.max() < 1_000_000


@pytest.mark.parametrize("args", [(0, 0.1), (10, 0.0), (10, 1.5)])
def test_bad_sampling_input(args):
    with pytest.raises(ValueError):
        draw_cohort(*args, rng=CohortSampler.from_seed(0)._streams.generator(0))
    with pytest.raises(ValueError, match="attempt"):
        CohortSampler.from_seed(0).cohort(10, 0.5, 1, attempt=-1)
