"""Federated datasets: users by id, each user's data on demand.

The simulator touches only the users it samples, so a population of 1,000,000 users costs memory
for the cohort, not the population. Two kinds:

* :class:`SyntheticClassification`: generated from (seed, user id) on request; needs no download
  and is the embedded default of ``dpfl simulate``.
* :class:`PartitionedDataset`: an in-memory dataset split into users by a partitioner
  (:func:`partition_by_key` for a natural key such as a speaker id, :func:`partition_iid`,
  :func:`partition_dirichlet`). ``flwr-datasets`` has these partitioners for Hugging Face datasets;
  ours are the few lines needed for tensors already in memory.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dpfl.api import TensorData


def _check_user(user: int, num_users: int) -> int:
    if not 0 <= int(user) < num_users:
        raise IndexError(f"user {user} is not in the population of {num_users} users")
    return int(user)


@dataclass
class SyntheticClassification:
    """Users with shifted Gaussian features, labelled by one random linear teacher.

    Each user's inputs are ``mu_u + N(0, I)`` with a user mean ``mu_u ~ N(0, user_shift^2 I)``
    (covariate shift, so users are not IID); the label is ``argmax(W x + b)`` for a teacher (W, b)
    drawn from the seed, flipped to a random class with probability ``label_noise``. The test set
    comes from ``test_users`` fresh users that are not in the population.
    """

    num_users: int = 1000
    examples_per_user: int = 50
    features: int = 32
    classes: int = 10
    seed: int = 0
    user_shift: float = 1.0
    label_noise: float = 0.05
    test_users: int = 100
    _teacher: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_users", "examples_per_user", "features", "classes", "test_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        rng = np.random.default_rng([self.seed, 0])
        w = rng.normal(size=(self.features, self.classes)) / np.sqrt(self.features)
        b = rng.normal(scale=0.1, size=self.classes)
        self._teacher = (w, b)

    def _generate(self, stream: int, held_out: bool = False) -> TensorData:
        rng = np.random.default_rng([self.seed, 1, stream])
        mu = rng.normal(scale=self.user_shift, size=self.features)
        n = self.examples_per_user
        if held_out:  # the same user's distribution, examples of their own stream
            rng = np.random.default_rng([self.seed, 2, stream])
            n = max(1, n // 5)
        x = mu + rng.normal(size=(n, self.features))
        w, b = self._teacher
        y = np.argmax(x @ w + b, axis=1)
        flip = rng.random(n) < self.label_noise
        y[flip] = rng.integers(0, self.classes, size=int(flip.sum()))
        return TensorData({"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.as_tensor(y)})

    def user_test_data(self, user: int) -> TensorData:
        """The user's own held-out examples (a fifth as many as it trains on, from the same
        distribution): what it evaluates on in federated evaluation."""
        return self._generate(_check_user(user, self.num_users), held_out=True)

    def user_data(self, user: int) -> TensorData:
        return self._generate(_check_user(user, self.num_users))

    def users_data(self, users: Sequence[int]) -> list[TensorData]:
        """``[user_data(u) for u in users]``, equal to it, with the labels of all users computed
        in one matrix product (what a vectorised cohort fetches each round)."""
        users = [_check_user(u, self.num_users) for u in users]
        if not users:
            return []
        n = self.examples_per_user
        xs = np.empty((len(users), n, self.features))
        draws = []
        for k, u in enumerate(users):
            rng = np.random.default_rng([self.seed, 1, u])  # the stream of _generate
            mu = rng.normal(scale=self.user_shift, size=self.features)
            xs[k] = mu + rng.normal(size=(n, self.features))
            draws.append((rng, rng.random(n) < self.label_noise))
        w, b = self._teacher
        ys = np.argmax(xs @ w + b, axis=2)
        for k, (rng, flip) in enumerate(draws):
            if flip.any():
                ys[k, flip] = rng.integers(0, self.classes, size=int(flip.sum()))
        x32 = torch.from_numpy(xs.astype(np.float32))
        y = torch.from_numpy(ys)
        return [TensorData({"x": x32[k], "y": y[k]}) for k in range(len(users))]

    def user_size(self, user: int) -> int:
        """The number of the user's examples, without generating them."""
        _check_user(user, self.num_users)
        return self.examples_per_user

    def test_data(self) -> TensorData:
        parts = [self._generate(self.num_users + i) for i in range(self.test_users)]
        return TensorData({k: torch.cat([p.tensors[k] for p in parts]) for k in ("x", "y")})


@dataclass
class PartitionedDataset:
    """An in-memory dataset split into users: ``partition[u]`` holds user u's example indices."""

    data: TensorData
    partition: Sequence[np.ndarray]
    test: TensorData
    user_keys: Sequence[Hashable] | None = None
    """The natural id of each user (e.g. a speaker id), when partitioned by key."""
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if len(self.partition) == 0:
            raise ValueError("a federated dataset needs at least one user")
        empty = [u for u, idx in enumerate(self.partition) if len(idx) == 0]
        if empty and not self.allow_empty:
            raise ValueError(
                f"{len(empty)} of {len(self.partition)} users have no examples (first: user "
                f"{empty[0]}); drop them or pass allow_empty=True (a sampled empty user sends a "
                "zero update)"
            )

    @property
    def num_users(self) -> int:
        return len(self.partition)

    def user_data(self, user: int) -> TensorData:
        idx = self.partition[_check_user(user, self.num_users)]
        return TensorData(self.data.batch(torch.as_tensor(idx, dtype=torch.long)))

    def user_size(self, user: int) -> int:
        return len(self.partition[_check_user(user, self.num_users)])

    def test_data(self) -> TensorData:
        return self.test


def partition_by_key(keys: Sequence[Hashable]) -> tuple[list[Hashable], list[np.ndarray]]:
    """One user per distinct key (e.g. speaker id), in order of first appearance."""
    order: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    return list(order), [np.asarray(v, dtype=np.int64) for v in order.values()]


def partition_iid(num_examples: int, num_users: int, seed: int) -> list[np.ndarray]:
    """A random split into ``num_users`` parts whose sizes differ by at most one."""
    if not 1 <= num_users <= num_examples:
        raise ValueError(f"need 1 <= num_users <= {num_examples} examples, got {num_users}")
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(p) for p in np.array_split(perm, num_users)]


def partition_dirichlet(
    labels: Sequence[int], num_users: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew: each class is split across users with proportions ~ Dirichlet(alpha).

    Small ``alpha`` (0.1) gives users few classes each; large (100) approaches IID. A user may end
    up with no examples at small alpha; such users are kept (they simply have nothing to train on).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_users)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_users, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for u, chunk in enumerate(np.split(idx, cuts)):
            parts[u].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
