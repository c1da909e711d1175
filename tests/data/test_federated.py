import numpy as np
import pytest
import torch

from dpfl.api import TensorData
from dpfl.data import (
    PartitionedDataset,
    SyntheticClassification,
    partition_by_key,
    partition_dirichlet,
    partition_iid,
)


def test_synthetic_users_are_lazy_deterministic_and_distinct():
    big = SyntheticClassification(num_users=1_000_000, examples_per_user=20, seed=1)
    a, b = big.user_data(999_999), big.user_data(999_999)
    assert torch.equal(a.tensors["x"], b.tensors["x"]) and len(a) == 20
    assert not torch.equal(big.user_data(0).tensors["x"], a.tensors["x"])
    other_seed = SyntheticClassification(num_users=10, examples_per_user=20, seed=2)
    assert not torch.equal(other_seed.user_data(0).tensors["x"], big.user_data(0).tensors["x"])
    with pytest.raises(IndexError, match="not in the population"):
        big.user_data(1_000_000)
    test = big.test_data()
    assert len(test) == 100 * 20
    # labels use most classes (the task is not degenerate)
    assert len(torch.unique(test.tensors["y"])) >= 8


def test_partitioners():
    parts = partition_iid(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}
    labels = np.repeat(np.arange(5), 40)
    parts = partition_dirichlet(labels, 8, alpha=0.1, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    # small alpha: most users see few classes
    assert np.median([len(set(labels[p])) for p in parts if len(p)]) <= 3
    keys, parts = partition_by_key(["s1", "s2", "s1", "s3", "s2"])
    assert keys == ["s1", "s2", "s3"] and [p.tolist() for p in parts] == [[0, 2], [1, 4], [3]]
    with pytest.raises(ValueError):
        partition_iid(3, 5, seed=0)


def test_partitioned_dataset():
    data = TensorData({"x": torch.arange(10.0).reshape(5, 2), "y": torch.arange(5)})
    keys, parts = partition_by_key(["a", "b", "a", "b", "c"])
    ds = PartitionedDataset(data, parts, test=data, user_keys=keys)
    assert ds.num_users == 3
    assert ds.user_data(0).tensors["y"].tolist() == [0, 2]


def test_users_data_equals_user_data_for_every_user():
    data = SyntheticClassification(num_users=600, examples_per_user=20, seed=3, label_noise=0.2)
    users = list(range(600))
    for one, many in zip([data.user_data(u) for u in users], data.users_data(users), strict=True):
        for key in ("x", "y"):
            assert torch.equal(one.tensors[key], many.tensors[key])
            assert one.tensors[key].dtype == many.tensors[key].dtype
    assert data.users_data([]) == []
    with pytest.raises(IndexError):
        data.users_data([0, 600])
