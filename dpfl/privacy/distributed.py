"""Distributed DP: each client adds its share of integer noise and the server learns only the sum.

The mechanism is the Skellam mechanism of Agarwal, Kairouz and Liu (NeurIPS 2021) with the
encoding of Kairouz, Liu and Steinke's distributed discrete Gaussian (ICML 2021). Skellam is
chosen because a sum of independent Skellam shares is exactly Skellam, whatever the number of
contributors, so the noise on the sum is known exactly; sampling it takes two Poisson draws
(NumPy's, on the cipher bit generators of :mod:`dpfl.privacy.randomness`), where the discrete
Gaussian needs an exact sampler that no maintained package ships and whose sum is not a discrete
Gaussian. Each client, for its clipped update x (L2 norm <= C):

1. pads x to d' = 2^k coordinates and rotates it, ``x' = H D x / sqrt(d')``: D random signs from a
   public per-round seed (shared by every client and the server), H the Walsh-Hadamard matrix
   (written here: a butterfly, O(d' log d')). The rotation spreads the norm evenly over the
   coordinates, so a per-coordinate range bound holds with high probability;
2. scales by s and rounds each coordinate at random to a neighbouring integer, redrawing the
   rounding until the rounded vector's L2 norm is at most the bound Delta_2 of Kairouz et al.'s
   conditional randomized rounding (Delta_2^2 = min(c^2 + d'/4 + sqrt(2 ln(1/beta))
   (c + sqrt(d')/2), (c + sqrt(d'))^2), c = sC). The bound is *enforced* (rejection), so it
   holds always; beta only sets how often a draw is redrawn. The L1 norm of an integer vector
   is then at most min(Delta_2^2, sqrt(d') Delta_2);
3. adds its noise share Sk(mu / t) (variance mu / t: Poisson(mu / 2t) - Poisson(mu / 2t)) per
   coordinate, mu = (z Delta_2)^2 and t the fewest contributors a released sum may have
   (``min-contributors``, SecAgg's reconstruction threshold), so any released sum carries at least
   Sk(mu);
4. reduces modulo 2^b.

The server sums modulo 2^b (secure aggregation does this without seeing the addends), maps the sum
to [-2^(b-1), 2^(b-1)), divides by s and applies the inverse rotation. The scale s is the largest
that keeps the chance of any coordinate of the integer sum leaving [-2^(b-1), 2^(b-1)) below
``WRAP_PROBABILITY`` per round (:func:`plan_encoding`: a union bound over coordinates of a
sub-Gaussian bound for the rotated sum, the rounding's worst case and Bernstein's bound for the
Skellam noise, at the largest cohort Poisson sampling gives with probability 1 - 1e-10).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpfl.privacy.randomness import CipherStreams

WRAP_PROBABILITY = 1e-9
"""Per round: the stated bound on the chance that any coordinate of the integer sum wraps."""
COHORT_TAIL = 1e-10
"""Of that, the chance that a Poisson cohort is larger than the cohort the bound assumes."""
ROUNDING_BETA = math.exp(-0.5)
"""beta of the conditional rounding bound (as TensorFlow Federated's default)."""
MAX_ROUNDING_TRIES = 1000
BOUNDARY_ZONE = 0.75
"""A decoded coordinate beyond this fraction of 2^(b-1) is "near the boundary" (a deployment's
heuristic check for a wrap)."""
BITS_RANGE = (4, 30)


def padded_dim(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the Hadamard transform's size)."""
    if dim < 1:
        raise ValueError(f"an update needs at least one coordinate, got {dim}")
    return 1 << (dim - 1).bit_length()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform H x / sqrt(n) of a vector of length n = 2^k
    (its own inverse). A butterfly in float64: O(n log n)."""
    n = x.numel()
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    y = x.reshape(-1).to(torch.float64).clone()
    h = 1
    while h < n:
        v = y.view(-1, 2, h)
        a, b = v[:, 0, :].clone(), v[:, 1, :]
        v[:, 0, :].add_(b)
        v[:, 1, :].neg_().add_(a)
        h *= 2
    return y.div_(math.sqrt(n))


@functools.lru_cache(maxsize=4)
def rotation_signs(seed: int, round_number: int, n: int) -> torch.Tensor:
    """The round's public random signs D (+-1, float64): the same at every client and the
    server, from the run's public ``seed`` and the round (no secret: the rotation only spreads
    the norm; the privacy rests on the noise). Cached, as every client of a round in one process
    uses the same signs: read the tensor, never modify it."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 23, int(round_number)])
    return torch.from_numpy(rng.integers(0, 2, n).astype(np.float64) * 2 - 1)


def rounded_l2_bound(c: float, n: int, beta: float = ROUNDING_BETA) -> float:
    """Delta_2 of conditional randomized rounding (Kairouz, Liu, Steinke 2021) for a vector of
    L2 norm <= ``c`` in ``n`` coordinates: the bound the rounding enforces."""
    loose = (c + math.sqrt(n)) ** 2  # any rounding moves each coordinate by less than 1
    tight = c * c + n / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(n) / 2)
    return math.sqrt(min(loose, tight))


@dataclass(frozen=True)
class EncodingPlan:
    """Everything a client and the server agree on to encode, sum and decode (all public)."""

    bits: int
    dim: int
    """d: coordinates of an update."""
    scale: float
    """s: integer units per unit of the rotated update."""
    clip_norm: float
    """C: the float updates' L2 bound (with the server's tolerance)."""
    noise_multiplier: float
    """z: the noise on a released sum is at least Sk(mu), mu = (z Delta_2)^2."""
    min_contributors: int
    """t: a sum is released only with at least t contributions."""
    max_cohort: int
    """The largest cohort the wrap bound covers."""
    l2: float
    """Delta_2: the rounded integer vector's L2 bound (enforced)."""
    l1: float
    """Delta_1 = min(Delta_2^2, sqrt(d') Delta_2)."""
    wrap_probability: float
    """The per-round bound on the chance of a wrap this plan gives."""
    calibrated_rounds: int = 0
    """The rounds z was calibrated for (target-epsilon); 0 when z was given."""

    @property
    def padded(self) -> int:
        return padded_dim(self.dim)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def total_variance(self) -> float:
        """mu: the noise variance per coordinate of a sum of exactly t contributions."""
        return (self.noise_multiplier * self.l2) ** 2

    @property
    def share_variance(self) -> float:
        """One client's share: mu / t."""
        return self.total_variance / self.min_contributors

    def noise_std_float(self, contributors: int) -> float:
        """The decoded sum's noise std per coordinate (float units) with that many shares."""
        return math.sqrt(contributors * self.share_variance) / self.scale

    def to_dict(self) -> dict:
        return asdict(self)


def _tail_terms(
    scale: float, n: int, dim: int, clip_norm: float, z: float, t: int, target: float
) -> tuple[float, float, float, float]:
    """(signal, rounding, noise) magnitudes that each coordinate of a sum of ``n`` encodings
    stays within except with the allotted probabilities; and Delta_2 at this scale."""
    d2 = padded_dim(dim)
    c = clip_norm
    p_each = (target - COHORT_TAIL) / (2 * d2)
    log_term = math.log(2 / p_each)
    # rotated sum: sub-Gaussian with variance proxy (s n C)^2 / d'
    signal = scale * n * c * math.sqrt(2 * log_term / d2)
    rounding = float(n)  # each rounding moves a coordinate by < 1
    l2 = rounded_l2_bound(scale * c, d2)
    variance = n * (z * l2) ** 2 / t
    # Bernstein for a sum of centred Poisson variables: P(|X| >= u) <= 2 exp(-u^2 / 2(V + u/3))
    noise = log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * variance * log_term)
    return signal, rounding, noise, l2


def plan_encoding(
    dim: int,
    clip_norm: float,
    noise_multiplier: float,
    bits: int,
    min_contributors: int,
    max_cohort: int,
    target: float = WRAP_PROBABILITY,
) -> EncodingPlan:
    """The largest scale s at which a sum of up to ``max_cohort`` encodings stays inside
    [-2^(b-1), 2^(b-1)) in every coordinate except with probability ``target`` per round (which
    includes ``COHORT_TAIL`` for a larger cohort). ValueError when no scale fits: too few bits."""
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int)
        or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]
    ):
        raise ValueError(f"sum-bits must be an integer in {list(BITS_RANGE)}, got {bits!r}")
    if min_contributors < 1 or max_cohort < min_contributors:
        raise ValueError(
            f"need 1 <= min-contributors <= the largest cohort, got {min_contributors} and "
            f"{max_cohort}"
        )
    if not clip_norm > 0 or not noise_multiplier > 0:
        raise ValueError("distributed DP needs clip-norm > 0 and a noise multiplier > 0")
    half = (1 << (bits - 1)) - 1

    def fits(s: float) -> bool:
        signal, rounding, noise, _ = _tail_terms(
            s, max_cohort, dim, clip_norm, noise_multiplier, min_contributors, target
        )
        return signal + rounding + noise <= half

    lo, hi = 0.0, 1.0
    if not fits(1e-12):
        raise ValueError(
            f"sum-bits = {bits} is too few for a cohort of up to {max_cohort} with "
            f"min-contributors = {min_contributors} at noise multiplier {noise_multiplier:.4g}: "
            "the rounding and noise alone can wrap; use more bits"
        )
    while fits(hi):
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    scale = lo
    l2 = rounded_l2_bound(scale * clip_norm, padded_dim(dim))
    l1 = min(l2 * l2, math.sqrt(padded_dim(dim)) * l2)
    return EncodingPlan(
        bits=bits,
        dim=dim,
        scale=scale,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        min_contributors=min_contributors,
        max_cohort=max_cohort,
        l2=l2,
        l1=l1,
        wrap_probability=target,
    )


def poisson_cohort_bound(population: int, sample_rate: float, tail: float = COHORT_TAIL) -> int:
    """The smallest m with P(Binomial(K, q) > m) <= ``tail``: the largest cohort the wrap bound
    covers under Poisson sampling."""
    from scipy.stats import binom

    return int(max(1, binom.isf(tail, population, sample_rate)))


def flatten(update: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector of an update's tensors, in their order, float64 on the CPU."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in update.values()])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, shape in like.items():
        n = math.prod(shape)
        out[name] = vector[at : at + n].reshape(shape).to(torch.float32)
        at += n
    return out


class UpdateRefused(ValueError):
    """An update a client must not encode: above the clip bound, or not finite."""


def client_generator(noise_seed: int | None, nonce: int, user: int) -> np.random.Generator:
    """A client's generator for its rounding and noise share: keyed from the OS (secure), or in
    reproducible mode from (noise-seed, the attempt's nonce, user): INSECURE, anyone with the seed
    recomputes every share. The nonce is drawn per attempt from the server's reproducible noise
    stream, so a retry or a replay after a resume with secret cohorts never reuses a share."""
    if noise_seed is None:
        return CipherStreams.secret().generator(0)
    return CipherStreams.from_seed(noise_seed, f"client-noise/{nonce}/{user}").generator(0)


def encode(
    vector: torch.Tensor,
    plan: EncodingPlan,
    signs: torch.Tensor,
    generator: np.random.Generator,
    *,
    reduce: bool = True,
) -> np.ndarray:
    """One client's clipped update (a flat vector of ``plan.dim`` values) as integers modulo
    2^b (int64, length d'), its noise share included (``reduce=False``: before the reduction,
    for the simulator's exact wrap check). An update above the clip bound is refused
    (ValueError): clipping is the device's job and the server cannot check it any more."""
    x = vector.reshape(-1).to(torch.float64)
    if x.numel() != plan.dim:
        raise ValueError(f"an update of {x.numel()} values for a plan of {plan.dim}")
    norm = float(torch.linalg.vector_norm(x))
    if not math.isfinite(norm) or norm > plan.clip_norm:
        raise UpdateRefused(
            f"update norm {norm:.6g} exceeds the clip bound {plan.clip_norm:.6g} (or is not "
            "finite): never encoded"
        )
    n = plan.padded
    padded = torch.zeros(n, dtype=torch.float64)
    padded[: plan.dim] = x
    y = (hadamard(padded * signs) * plan.scale).numpy()
    floor = np.floor(y)
    frac = y - floor
    bound2 = plan.l2 * plan.l2
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (generator.random(n) < frac)
        if float(np.dot(rounded, rounded)) <= bound2:
            break
    else:  # the chance of this is below beta^1000
        raise RuntimeError("conditional rounding did not meet its bound in 1000 draws")
    lam = plan.share_variance / 2
    noise = generator.poisson(lam, n) - generator.poisson(lam, n)
    values = rounded.astype(np.int64) + noise
    return np.mod(values, plan.modulus) if reduce else values


def encode_update(
    update: dict[str, torch.Tensor],
    plan: EncodingPlan,
    rotation_seed: int,
    round_number: int,
    user: int,
    noise_seed: int | None,
    nonce: int = 0,
    *,
    reduce: bool = True,
) -> np.ndarray:
    """A client's step of distributed DP for round ``round_number``: its clipped update (name ->
    tensor) encoded with the round's public rotation and its own rounding and noise share
    (``nonce``: the attempt's, for reproducible noise)."""
    signs = rotation_signs(rotation_seed, round_number, plan.padded)
    generator = client_generator(noise_seed, nonce, user)
    return encode(flatten(update), plan, signs, generator, reduce=reduce)


class ModularSum:
    """A running sum of encodings modulo 2^b, as secure aggregation computes it. In the
    simulator ``exact`` also keeps the integer sum itself, so a wrap is detected with certainty
    (which a deployment cannot do)."""

    def __init__(self, plan: EncodingPlan, exact: bool = False) -> None:
        self.plan = plan
        self.total = np.zeros(plan.padded, dtype=np.int64)
        self.exact = np.zeros(plan.padded, dtype=np.int64) if exact else None
        self.count = 0

    def add(self, encoded: np.ndarray, unreduced: np.ndarray | None = None) -> None:
        if encoded.shape != (self.plan.padded,) or encoded.dtype != np.int64:
            raise ValueError(f"an encoding must be int64 of length {self.plan.padded}")
        if encoded.min() < 0 or encoded.max() >= self.plan.modulus:
            raise ValueError(f"an encoding's values must lie in [0, 2^{self.plan.bits})")
        self.total = np.mod(self.total + encoded, self.plan.modulus)
        if self.exact is not None:
            self.exact += unreduced if unreduced is not None else centred(encoded, self.plan.bits)
        self.count += 1


def centred(values: np.ndarray, bits: int) -> np.ndarray:
    """Values modulo 2^b mapped to [-2^(b-1), 2^(b-1))."""
    half = 1 << (bits - 1)
    return np.mod(values + half, 1 << bits) - half


class WrapError(RuntimeError):
    """A coordinate of the integer sum left [-2^(b-1), 2^(b-1)): the decoded sum is wrong."""


def check_exact(total: ModularSum) -> None:
    """Simulator: raise :class:`WrapError` if any coordinate of the exact integer sum wrapped."""
    if total.exact is None:
        return
    half = 1 << (total.plan.bits - 1)
    out = int(np.count_nonzero((total.exact < -half) | (total.exact >= half)))
    if out:
        raise WrapError(
            f"{out} coordinates of the integer sum left [-2^{total.plan.bits - 1}, "
            f"2^{total.plan.bits - 1}): the modular sum would decode wrongly. The plan's bound "
            f"put this below {total.plan.wrap_probability:g} per round: check sum-bits and the "
            "cohort size"
        )


def near_boundary(values: np.ndarray, bits: int, zone: float = BOUNDARY_ZONE) -> int:
    """How many centred coordinates lie beyond ``zone`` x 2^(b-1): in deployment, a heuristic
    sign of a wrap (under secure aggregation a wrap cannot be detected with certainty)."""
    half = 1 << (bits - 1)
    return int(np.count_nonzero(np.abs(centred(values, bits)) > zone * half))


def boundary_limit(plan: EncodingPlan, contributors: int) -> int:
    """The most near-boundary coordinates a sum may have before its round is failed: 1 plus ten
    times the expected count under the plan's tail bounds."""
    signal, rounding, noise, _ = _tail_terms(
        plan.scale,
        max(contributors, 1),
        plan.dim,
        plan.clip_norm,
        plan.noise_multiplier,
        plan.min_contributors,
        plan.wrap_probability,
    )
    reach = signal + rounding + noise  # the magnitude each coordinate exceeds w.p. <= p_each
    zone = BOUNDARY_ZONE * ((1 << (plan.bits - 1)) - 1)
    # the tails decay at least like exp(-u^2): scale the per-coordinate chance to the zone
    p_each = (plan.wrap_probability - COHORT_TAIL) / (2 * plan.padded)
    p_zone = min(1.0, p_each ** ((zone / reach) ** 2)) if reach > 0 else 0.0
    return 1 + int(10 * plan.padded * p_zone)


def decode(total: np.ndarray, plan: EncodingPlan, signs: torch.Tensor) -> torch.Tensor:
    """The float sum (length d) from the sum modulo 2^b: centre, descale, inverse rotation."""
    y = torch.from_numpy(centred(total, plan.bits).astype(np.float64)) / plan.scale
    return (hadamard(y) * signs)[: plan.dim]
