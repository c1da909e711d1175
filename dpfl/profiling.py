"""A per-round time breakdown of a run (``dpfl simulate --profile``).

Code marks its phases with ``with section("clipping"): ...``; while no profile is active a
section costs one attribute lookup. :func:`profiled` activates one for a block and yields the
:class:`Profile` that collects the seconds spent in each named phase. Sections do not nest: each
second of a round is charged to at most one phase, and the rest is reported as "other". On
CUDA the device is synchronised at each section's end, so asynchronous kernels are charged to
the phase that launched them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ORDER = (
    "sampling",
    "data",
    "local training",
    "batch building",
    "weights in/out",
    "fwd/bwd/step",
    "clipping",
    "aggregation",
    "noise",
    "server step",
    "accounting",
    "evaluation",
    "metrics",
)
"""The phases of a round, in the order a breakdown lists them (others follow). One client's
local training is split into building its batches (indexing, padding, copies to the device),
loading the global weights and taking the delta ("weights in/out"), forward, backward and
optimizer step ("fwd/bwd/step") and clipping; "local training" is what a vectorised cohort
step does as one computation."""


class Profile:
    """Seconds per phase, round by round. The first round (warm-up: first calls, caches such as
    the accountant's RDP curve for this (q, z)) is shown apart from the mean of the others."""

    def __init__(self, sync_cuda: bool = False) -> None:
        self.rounds: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.open: str | None = None
        """The section being timed now."""
        self.sync_cuda = sync_cuda and torch.cuda.is_available()

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    def end_round(self, seconds: float) -> None:
        self.current["round (total)"] = seconds
        self.rounds.append(dict(self.current))
        self.current = defaultdict(float)

    def table(self) -> str:
        """ms per phase in round 1 and on average over rounds 2..T, with shares of the round."""
        if not self.rounds:
            return "profile: no round was run"
        first, rest = self.rounds[0], self.rounds[1:]
        seen = {n for r in self.rounds for n in r} - {"round (total)"}
        names = [n for n in ORDER if n in seen] + sorted(seen - set(ORDER))

        def mean(name: str) -> float:
            return sum(r.get(name, 0.0) for r in rest) / len(rest) if rest else math.nan

        def other(r: dict[str, float]) -> float:
            return r["round (total)"] - sum(v for k, v in r.items() if k != "round (total)")

        total = mean("round (total)")
        header = f"{'phase':<18}{'round 1 ms':>12}"
        if rest:
            header += f"{f'rounds 2-{len(self.rounds)} ms':>18}{'share':>8}"
        lines = [header]
        rows = [(n, first.get(n, 0.0), mean(n)) for n in names]
        rows.append(("other", other(first), sum(other(r) for r in rest) / max(len(rest), 1)))
        rows.append(("round (total)", first["round (total)"], total))
        for name, a, b in rows:
            line = f"{name:<18}{1000 * a:>12.2f}"
            if rest:
                line += f"{1000 * b:>18.2f}{b / total if total else 0.0:>8.1%}"
            lines.append(line)
        return "\n".join(lines)


_active: Profile | None = None
_OFF = contextlib.nullcontext()


def section(name: str):
    """A context manager charging the time of its block to phase ``name`` of the active profile;
    without one, a shared no-op (sections sit in every client step: they must cost nothing)."""
    profile = _active
    if profile is None:
        return _OFF
    return _Section(profile, name)


class _Section:
    __slots__ = ("profile", "name", "t0")

    def __init__(self, profile: Profile, name: str) -> None:
        self.profile, self.name = profile, name

    def __enter__(self) -> None:
        profile = self.profile
        if profile.open is not None:  # a second count of the same seconds would hide in "other"
            raise RuntimeError(
                f"profile section {self.name!r} inside {profile.open!r}: sections do not nest"
            )
        profile.open = self.name
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        profile = self.profile
        profile.open = None
        if profile.sync_cuda:
            torch.cuda.synchronize()
        profile.add(self.name, time.perf_counter() - self.t0)


def round_done(seconds: float) -> None:
    """Called by the round loop once per round with its wall time."""
    if _active is not None:
        _active.end_round(seconds)


@contextmanager
def profiled(sync_cuda: bool = True) -> Iterator[Profile]:
    """Collect a breakdown of everything run inside the block."""
    global _active
    previous, _active = _active, Profile(sync_cuda)
    try:
        yield _active
    finally:
        _active = previous
