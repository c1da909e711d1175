"""Scale-out of the in-process simulator over several processes with ``torch.distributed``.

Launched by ``torchrun`` (one machine or several), every rank runs the same simulation:

* rank 0 draws the cohort from its secret sampling key and broadcasts it (as it does the noisy
  count that min-replies decides on, and the ledger on resume); every rank takes its share of
  the cohort, balanced by the clients' data sizes (:func:`balanced_shares`: largest first, each
  to the least loaded rank);
* each rank trains and clips its clients (vectorised or one by one, as configured) and sums the
  accepted deltas; the partial sums are added with one all-reduce, and the counts (accepted,
  rejected with reasons, time-outs, failures, diagnostics) are gathered;
* rank 0 draws the Gaussian noise once and broadcasts the noisy average, so every rank takes the
  same server step and ends every round with the same model (checked at the end of the run);
* rank 0 alone evaluates and writes the run folder (metrics, checkpoints, summary, report).

Backends: gloo on CPU, NCCL when the config's device is CUDA (each rank on ``cuda:LOCAL_RANK``).
One rank and N ranks agree for the same noise-seed and sampling-seed to float rounding (the sum
is taken in another order). The ranks form one trust domain, the server's: partial sums of
clipped updates, the noise and the cohorts travel between them unencrypted, so links between
machines must be private.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def balanced_shares(sizes: Sequence[int], ranks: int) -> list[list[int]]:
    """Split clients (given by their data sizes) over ``ranks``: each rank's list of client
    positions, in cohort order. Largest first, each to the rank with the least data so far
    (ties: the lower rank); deterministic, so every rank computes the same split."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += max(int(sizes[i]), 1)
    return [sorted(s) for s in shares]


def user_size(dataset, user: int) -> int:
    """The amount of a user's data, for balancing: the dataset's ``user_size`` when it has one
    (no loading), else the length of the user's data."""
    size = getattr(dataset, "user_size", None)
    return int(size(user)) if size is not None else len(dataset.user_data(user))


class Group:
    """This process's place in a ``torchrun`` job, and the collectives the simulator needs."""

    def __init__(self, device: torch.device, owned: bool = False) -> None:
        """``owned``: this object initialised the process group and destroys it in
        :meth:`close`."""
        self.owned = owned
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        # NCCL reduces tensors on the GPU; gloo on the CPU
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait for every rank (on the success path only: after an error on one rank, the
        others may be waiting in another collective)."""
        dist.barrier()

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def share(self, users: Sequence[int], sizes: Sequence[int]) -> list[int]:
        return [users[i] for i in balanced_shares(sizes, self.size)[self.rank]]

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(self.device, torch.float32) for t in tensors.values()])

    @staticmethod
    def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for n, t in like.items():
            out[n] = flat[at : at + t.numel()].view_as(t).to(t.device, t.dtype)
            at += t.numel()
        return out

    def sum_round(self, agg, tally) -> None:
        """Turn this rank's aggregator and tally into the whole cohort's, on every rank."""
        shapes = agg.shapes
        zeros = {n: torch.zeros(s) for n, s in shapes.items()}
        local = agg.total if agg.total is not None else zeros
        flat = self._flat(local)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        parts: list = [None] * self.size
        mine = (agg.accepted, dict(agg.rejected), agg.clipped, list(agg.norms), tally.state())
        dist.all_gather_object(parts, mine)
        agg.accepted = sum(p[0] for p in parts)
        agg.rejected = sum((Counter(p[1]) for p in parts), Counter())
        agg.clipped = sum(p[2] for p in parts)
        agg.norms = [x for p in parts for x in p[3]]
        agg.total = self._unflat(flat, zeros) if agg.accepted else None
        tally.merge([p[4] for p in parts])

    def broadcast_object(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank; a collective call."""
        box = [value if self.primary else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank 0's tensors, on every rank."""
        flat = self._flat(tensors)
        dist.broadcast(flat, src=0)
        return self._unflat(flat, tensors)

    def check_same(self, weights: dict[str, torch.Tensor]) -> None:
        """Raise unless every rank holds the same weights (bit for bit)."""
        h = hashlib.sha256()
        for n, t in weights.items():
            h.update(n.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests: list = [None] * self.size
        dist.all_gather_object(digests, h.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different models: {digests}")


class SharedNoise:
    """The server's Gaussian mechanism, run on rank 0 only: its noisy average is broadcast, so
    the noise is drawn once and every rank applies the same update."""

    def __init__(self, mechanism, group: Group) -> None:
        self.mechanism, self.group = mechanism, group

    @property
    def std(self) -> float:
        return self.mechanism.std

    def noisy_mean(self, summed, expected_cohort_size: float, *, inplace: bool = False):
        if self.group.primary:
            out = self.mechanism.noisy_mean(summed, expected_cohort_size, inplace=inplace)
        else:
            out = {n: torch.empty_like(t) for n, t in summed.items()}
        return self.group.broadcast(out)


def join(cfg) -> Group | None:
    """The process group of a ``torchrun`` job with more than one rank (initialised here when
    needed), or None for a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    from dpfl.loop.run import pick_device

    device = pick_device(cfg)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        log.info(
            "rank %d of %d (%s): training a share of each cohort",
            dist.get_rank(),
            size,
            backend,
        )
    return Group(device, owned)
