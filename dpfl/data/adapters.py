"""A user's own data as a federated dataset: arrays, a torch Dataset, or a Hugging Face Dataset.

Every adapter maps the user ids it is given to dpfl's users ``0 .. K - 1`` (``user_ids[k]`` is
user k's own id), looks a user up in O(1) without touching the others (so a population of
millions costs O(cohort) per round), refuses empty users, and can hold out a fraction of every
user's examples (``user_test_fraction``) for federated evaluation: ``user_data(u)`` then holds the
rest and ``user_test_data(u)`` the held-out part, split by ``seed`` the same way every time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dpfl.api import TensorData


def _tensor(name: str, value: Any) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.dtype == torch.float64:  # models train in float32
        t = t.float()
    if t.dim() == 0:
        raise ValueError(f"array {name!r} is a scalar: every array needs one row per example")
    return t


def _tensors(arrays: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    if not isinstance(arrays, Mapping) or not arrays:
        shown = repr(arrays)[:80]
        raise TypeError(f"{what}: expected a non-empty mapping of name -> array, got {shown}")
    out = {str(k): _tensor(str(k), v) for k, v in arrays.items()}
    sizes = {k: len(v) for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{what}: arrays must have one row per example, got lengths {sizes}")
    return out


class _Users:
    """Example indices grouped by user: user k's are ``order[start[k]:start[k + 1]]``."""

    def __init__(
        self,
        ids: Sequence[Hashable] | np.ndarray,
        num_users: int | None,
        user_test_fraction: float,
        seed: int,
    ) -> None:
        if not 0 <= user_test_fraction < 1:
            raise ValueError(f"user_test_fraction must be in [0, 1), got {user_test_fraction}")
        self.fraction, self.seed = float(user_test_fraction), int(seed)
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"users: expected one id per example, got shape {ids.shape}")
        if num_users is not None:
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"users: with num_users, ids must be integers, got {ids.dtype}")
            bad = np.flatnonzero((ids < 0) | (ids >= num_users))
            if len(bad):
                raise ValueError(
                    f"users: example {int(bad[0])} has user id {int(ids[bad[0]])}, outside "
                    f"0 .. num_users - 1 = {num_users - 1}"
                )
            self.user_ids: list[Hashable] = list(range(num_users))
            codes = ids.astype(np.int64)
        else:
            uniques, codes = np.unique(ids, return_inverse=True)
            self.user_ids = uniques.tolist()
        self.order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(self.user_ids))
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise ValueError(
                f"{len(empty)} of {len(counts)} users have no examples (first: user "
                f"{int(empty[0])}); a federated dataset's users must each hold data"
            )
        self.start = np.concatenate([[0], np.cumsum(counts)])

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def _all(self, user: int) -> np.ndarray:
        if isinstance(user, bool) or not 0 <= int(user) < self.num_users:
            raise IndexError(f"user {user} is not in the population of {self.num_users} users")
        user = int(user)
        return self.order[self.start[user] : self.start[user + 1]]

    def _split(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self._all(user)
        if self.fraction == 0:
            return idx, idx[:0]
        held = math.ceil(self.fraction * len(idx)) if len(idx) > 1 else 0
        perm = np.random.default_rng([self.seed, 17, int(user)]).permutation(len(idx))
        return np.sort(idx[perm[held:]]), np.sort(idx[perm[:held]])

    def train(self, user: int) -> np.ndarray:
        return self._split(user)[0]

    def test(self, user: int) -> np.ndarray:
        if self.fraction == 0:
            raise ValueError("no per-user test data: build the dataset with user_test_fraction > 0")
        return self._split(user)[1]


class ArrayFederatedDataset:
    """Arrays with one row per example and a user id per row (see :func:`from_arrays`)."""

    def __init__(self, arrays, users, test=None, *, num_users=None, user_test_fraction=0.0,
                 seed=0) -> None:  # fmt: skip
        self.arrays = _tensors(arrays, "arrays")
        n = len(next(iter(self.arrays.values())))
        if len(users) != n:
            raise ValueError(f"users: {len(users)} ids for {n} examples (one id per example)")
        self._users = _Users(users, num_users, user_test_fraction, seed)
        self.test = TensorData(_tensors(test, "test")) if test is not None else None

    @property
    def num_users(self) -> int:
        return self._users.num_users

    @property
    def user_ids(self) -> list[Hashable]:
        return self._users.user_ids

    def _rows(self, idx: np.ndarray) -> TensorData:
        at = torch.from_numpy(idx)
        return TensorData({k: v[at] for k, v in self.arrays.items()})

    def user_data(self, user: int) -> TensorData:
        return self._rows(self._users.train(user))

    def user_size(self, user: int) -> int:
        return len(self._users.train(user))

    def user_test_data(self, user: int) -> TensorData:
        return self._rows(self._users.test(user))

    def test_data(self) -> TensorData | None:
        return self.test


def from_arrays(
    arrays: Mapping[str, Any],
    users: Sequence[Hashable] | np.ndarray | torch.Tensor,
    test: Mapping[str, Any] | None = None,
    *,
    num_users: int | None = None,
    user_test_fraction: float = 0.0,
    seed: int = 0,
) -> ArrayFederatedDataset:
    """A federated dataset from NumPy or torch arrays.

    Args:
        arrays: name -> array with one row per example (e.g. ``{"x": X, "y": y}``); a batch is a
            dict of the same names. float64 becomes float32.
        users: the user id of each example (ints, strings, any sortable ids). Users are numbered
            in sorted order of their ids; ``user_ids`` gives the id of each.
        test: the central test set (same kind of mapping), or None.
        num_users: with integer ids, the population size: ids must lie in ``0 .. num_users - 1``
            and user k is id k.
        user_test_fraction: hold out this fraction of every user's examples
            (``user_test_data``); 0 holds out nothing.
        seed: the seed of that split.
    """
    if isinstance(users, torch.Tensor):
        users = users.numpy()
    return ArrayFederatedDataset(arrays, users, test, num_users=num_users,
                                 user_test_fraction=user_test_fraction, seed=seed)  # fmt: skip


class LazyData:
    """Some items of a map-style dataset, fetched only when a batch asks for them."""

    def __init__(self, dataset, indices: np.ndarray, collate: Callable) -> None:
        self.dataset, self.indices, self.collate = dataset, indices, collate

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: torch.Tensor) -> Any:
        return self.collate([self.dataset[int(self.indices[i])] for i in indices.tolist()])

    def batches(self, batch_size: int):
        """In order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


class TorchFederatedDataset:
    """A map-style ``torch.utils.data.Dataset`` split by user (see :func:`from_torch_dataset`)."""

    def __init__(self, dataset, user_of, test=None, *, num_users=None, user_test_fraction=0.0,
                 seed=0, collate=None) -> None:  # fmt: skip
        from torch.utils.data import default_collate

        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("from_torch_dataset needs a map-style dataset (__getitem__, __len__)")
        n = len(dataset)
        if callable(user_of):
            ids = [user_of(i) for i in range(n)]  # on the index: no item is loaded
        else:
            ids = user_of
            if len(ids) != n:
                raise ValueError(f"user_of: {len(ids)} ids for {n} items (one id per item)")
        self.dataset = dataset
        self.collate = collate or default_collate
        self._users = _Users(np.asarray(ids), num_users, user_test_fraction, seed)
        self.test = test

    @property
    def num_users(self) -> int:
        return self._users.num_users

    @property
    def user_ids(self) -> list[Hashable]:
        return self._users.user_ids

    def user_data(self, user: int) -> LazyData:
        return LazyData(self.dataset, self._users.train(user), self.collate)

    def user_size(self, user: int) -> int:
        return len(self._users.train(user))

    def user_test_data(self, user: int) -> LazyData:
        return LazyData(self.dataset, self._users.test(user), self.collate)

    def test_data(self) -> LazyData | None:
        if self.test is None:
            return None
        return LazyData(self.test, np.arange(len(self.test)), self.collate)


def from_torch_dataset(
    dataset,
    user_of: Sequence[Hashable] | Callable[[int], Hashable],
    test=None,
    *,
    num_users: int | None = None,
    user_test_fraction: float = 0.0,
    seed: int = 0,
    collate: Callable | None = None,
) -> TorchFederatedDataset:
    """A federated dataset over any map-style torch Dataset, loaded lazily.

    Args:
        dataset: a map-style ``torch.utils.data.Dataset``; items are fetched only for the
            batches of sampled users, never at construction.
        user_of: the user id of each item: a sequence (one id per index) or a callable on the
            INDEX (never on the item, so building the split loads nothing).
        test: the central test set, another map-style dataset, or None.
        num_users, user_test_fraction, seed: as for :func:`from_arrays`.
        collate: how items become a batch (default ``torch.utils.data.default_collate``: a tuple
            item ``(x, y)`` gives a batch ``[X, Y]``, a dict item a dict).
    """
    return TorchFederatedDataset(dataset, user_of, test, num_users=num_users,
                                 user_test_fraction=user_test_fraction, seed=seed,
                                 collate=collate)  # fmt: skip


class HFFederatedDataset:
    """A Hugging Face ``datasets.Dataset`` split by a Flower Datasets partitioner (see
    :func:`from_hf`)."""

    def __init__(self, dataset, partitioner, test=None, *, columns=None, user_test_fraction=0.0,
                 seed=0) -> None:  # fmt: skip
        from flwr_datasets.partitioner import NaturalIdPartitioner, Partitioner

        if isinstance(partitioner, str):
            partitioner = NaturalIdPartitioner(partition_by=partitioner)
        if not isinstance(partitioner, Partitioner):
            raise TypeError(
                "from_hf: partitioner must be a column name or a flwr_datasets Partitioner "
                f"(NaturalIdPartitioner, DirichletPartitioner, IidPartitioner...), got "
                f"{type(partitioner).__name__}"
            )
        if isinstance(columns, str):
            columns = [columns]
        self.columns = dict(columns) if isinstance(columns, Mapping) else (
            {c: c for c in columns} if columns is not None else None)  # fmt: skip
        if self.columns is not None:
            missing = [c for c in self.columns if c not in dataset.column_names]
            if missing:
                raise ValueError(f"from_hf: no column {missing} (it has {dataset.column_names})")
        partitioner.dataset = dataset
        self.partitioner = partitioner
        if not 0 <= user_test_fraction < 1:
            raise ValueError(f"user_test_fraction must be in [0, 1), got {user_test_fraction}")
        self.fraction, self.seed = float(user_test_fraction), int(seed)
        self.test = test
        self.num_users = int(partitioner.num_partitions)
        if self.num_users < 1:
            raise ValueError("from_hf: the partitioner made no partitions")

    def _tensors(self, part) -> TensorData:
        columns = self.columns or {
            c: c for c, f in part.features.items() if getattr(f, "dtype", "") not in ("string",)
        }
        table = part.select_columns(list(columns)).with_format("torch")
        return TensorData({key: _tensor(c, table[c]) for c, key in columns.items()})

    def _partition(self, user: int):
        if isinstance(user, bool) or not 0 <= int(user) < self.num_users:
            raise IndexError(f"user {user} is not in the population of {self.num_users} users")
        part = self.partitioner.load_partition(int(user))
        if len(part) == 0:
            raise ValueError(f"user {user} has no examples (partition {user} is empty)")
        return part

    def _split(self, user: int):
        part = self._partition(user)
        if self.fraction == 0 or len(part) < 2:
            return part, part.select([])
        held = math.ceil(self.fraction * len(part))
        perm = np.random.default_rng([self.seed, 17, int(user)]).permutation(len(part))
        return part.select(np.sort(perm[held:])), part.select(np.sort(perm[:held]))

    def user_data(self, user: int) -> TensorData:
        return self._tensors(self._split(user)[0])

    def user_size(self, user: int) -> int:
        return len(self._split(user)[0])

    def user_test_data(self, user: int) -> TensorData:
        if self.fraction == 0:
            raise ValueError("no per-user test data: build the dataset with user_test_fraction > 0")
        return self._tensors(self._split(user)[1])

    def test_data(self) -> TensorData | None:
        return self._tensors(self.test) if self.test is not None else None


def from_hf(
    dataset,
    partitioner,
    test=None,
    *,
    columns: Sequence[str] | Mapping[str, str] | None = None,
    user_test_fraction: float = 0.0,
    seed: int = 0,
) -> HFFederatedDataset:
    """A federated dataset from a Hugging Face ``datasets.Dataset``, split into users by a Flower
    Datasets partitioner (the ecosystem's standard federated splits).

    Args:
        dataset: a ``datasets.Dataset`` (e.g. ``Dataset.from_dict``, ``load_dataset("csv",
            data_files=...)`` on local files).
        partitioner: a column name (one user per distinct value: ``NaturalIdPartitioner``) or a
            ``flwr_datasets.partitioner`` instance (``DirichletPartitioner(num_partitions=100,
            partition_by="label", alpha=0.5)``, ``IidPartitioner(num_partitions=100)``...).
        test: the central test set, a ``datasets.Dataset`` with the same columns, or None.
        columns: the columns a batch holds (default: every non-string column), or a mapping
            column -> batch key (e.g. ``{"pixels": "x", "label": "y"}``).
        user_test_fraction, seed: as for :func:`from_arrays`.
    """
    return HFFederatedDataset(dataset, partitioner, test, columns=columns,
                              user_test_fraction=user_test_fraction, seed=seed)  # fmt: skip
