"""The data adapters: a user's arrays, torch Dataset or Hugging Face Dataset as users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfl.data import from_arrays, from_hf, from_torch_dataset


def arrays(n=30, users=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = rng.integers(0, 2, size=n)
    ids = np.arange(n) % users
    return x, y, ids


def test_from_arrays_groups_rows_by_user_id_in_sorted_order():
    x, y, _ = arrays(6)
    ids = np.array(["bob", "amy", "bob", "cid", "amy", "bob"])
    data = from_arrays({"x": x, "y": y}, users=ids, test={"x": x[:2], "y": y[:2]})
    assert data.num_users == 3 and data.user_ids == ["amy", "bob", "cid"]
    bob = data.user_data(1)
    assert torch.equal(bob.tensors["x"], torch.tensor(x[[0, 2, 5]], dtype=torch.float32))
    assert bob.tensors["x"].dtype == torch.float32  # float64 in, float32 out
    assert data.user_size(2) == 1 and len(data.test_data()) == 2
    with pytest.raises(IndexError, match="user 3 is not in the population of 3"):
        data.user_data(3)


def test_from_arrays_refuses_bad_input_naming_it():
    x, y, ids = arrays(10, users=5)
    with pytest.raises(ValueError, match="example 3 has user id 7, outside 0 .. num_users - 1 = 4"):
        from_arrays({"x": x}, users=np.where(np.arange(10) == 3, 7, ids), num_users=5)
    with pytest.raises(ValueError, match="1 of 6 users have no examples .first: user 5"):
        from_arrays({"x": x}, users=ids, num_users=6)
    with pytest.raises(ValueError, match="9 ids for 10 examples"):
        from_arrays({"x": x}, users=ids[:9])
    with pytest.raises(ValueError, match="one row per example"):
        from_arrays({"x": x, "y": y[:5]}, users=ids)


def test_a_per_user_held_out_split_is_disjoint_complete_and_fixed():
    x, y, ids = arrays(40, users=4)
    data = from_arrays({"x": x, "i": np.arange(40)}, users=ids, user_test_fraction=0.25, seed=3)
    again = from_arrays({"x": x, "i": np.arange(40)}, users=ids, user_test_fraction=0.25, seed=3)
    for u in range(4):
        train = set(data.user_data(u).tensors["i"].tolist())
        test = set(data.user_test_data(u).tensors["i"].tolist())
        assert len(test) == 3 and len(train) == 7 and not train & test
        assert train | test == set(np.flatnonzero(ids == u).tolist())
        assert test == set(again.user_test_data(u).tensors["i"].tolist())
    with pytest.raises(ValueError, match="user_test_fraction > 0"):
        from_arrays({"x": x}, users=ids).user_test_data(0)


def test_a_population_of_a_million_users_is_looked_up_without_the_others():
    n = 1_000_000
    data = from_arrays({"v": np.arange(n)}, users=np.arange(n)[::-1].copy())
    assert data.num_users == n
    assert data.user_data(0).tensors["v"].tolist() == [n - 1]
    assert data.user_data(n - 1).tensors["v"].tolist() == [0]


class Counting(torch.utils.data.Dataset):
    """A map-style dataset that counts the items it loads."""

    def __init__(self, n: int) -> None:
        self.n, self.loads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loads += 1
        return {"x": torch.full((2,), float(i)), "y": torch.tensor(i % 3)}


def test_from_torch_dataset_loads_nothing_until_a_batch_asks():
    ds = Counting(20)
    data = from_torch_dataset(ds, user_of=lambda i: i // 4)
    assert ds.loads == 0 and data.num_users == 5
    user = data.user_data(2)
    assert ds.loads == 0 and len(user) == 4
    batch = user.batch(torch.tensor([1, 3]))
    assert ds.loads == 2
    assert batch["x"][:, 0].tolist() == [9.0, 11.0]
    from_torch_dataset(ds, user_of=[i % 2 for i in range(20)])  # a sequence of ids
    assert ds.loads == 2


def hf_dataset(n=60):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {
            "x": rng.normal(size=(n, 3)).astype(np.float32).tolist(),
            "label": (np.arange(n) % 3).tolist(),
            "speaker": [f"s{i % 6}" for i in range(n)],
        }
    )


def test_from_hf_by_a_natural_id_column():
    data = from_hf(hf_dataset(), "speaker", test=hf_dataset(9), columns={"x": "x", "label": "y"})
    assert data.num_users == 6
    sizes = [data.user_size(u) for u in range(6)]
    assert sizes == [10] * 6
    first = data.user_data(0)
    assert set(first.tensors) == {"x", "y"} and first.tensors["x"].shape == (10, 3)
    assert len(data.test_data()) == 9
    with pytest.raises(IndexError):
        data.user_data(6)


def test_from_hf_with_flower_datasets_partitioners():
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    iid = from_hf(hf_dataset(), IidPartitioner(num_partitions=4), columns=["x", "label"])
    assert iid.num_users == 4 and sum(iid.user_size(u) for u in range(4)) == 60
    skew = from_hf(
        hf_dataset(),
        DirichletPartitioner(num_partitions=3, partition_by="label", alpha=0.5,
                             min_partition_size=2, seed=1),
        columns=["x", "label"],
        user_test_fraction=0.2,
    )  # fmt: skip
    total = sum(skew.user_size(u) + len(skew.user_test_data(u)) for u in range(3))
    assert total == 60
    with pytest.raises(ValueError, match="no column"):
        from_hf(hf_dataset(), "speaker", columns=["pixels"])
    with pytest.raises(TypeError, match="Partitioner"):
        from_hf(hf_dataset(), 3)


def test_from_hf_reads_a_local_csv(tmp_path, monkeypatch):
    from datasets import load_dataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "data.csv"
    path.write_text("a,b,user\n" + "".join(f"{i},{i * 2},{i % 3}\n" for i in range(12)))
    ds = load_dataset("csv", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    data = from_hf(ds, "user", columns=["a", "b"])
    assert data.num_users == 3
    assert sorted(data.user_data(1).tensors["a"].tolist()) == [1, 4, 7, 10]
