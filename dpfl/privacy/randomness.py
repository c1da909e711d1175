"""Secret randomness for the DP noise and the cohorts: cipher-based generators keyed by the OS.

The (epsilon, delta) of a run holds only if nobody outside the server can recompute its noise or
its cohorts. A generator seeded with a number (MT19937, PCG64, Philox, SFC64, torch's CPU and CUDA
generators) fails that in practice: MT19937 keeps 32 bits of any seed, and none of them is a
cryptographic generator, so a released aggregate that is pure noise (a round without the target
user, an empty cohort) lets an attacker search the seed space and subtract every round's noise.

Here every draw comes from a block cipher in counter mode, used as a bit generator by NumPy's
``Generator`` (which does the Gaussian, binomial and choice transforms; nothing of the cipher or
the transforms is written here):

* ``aes-ctr``: AES-128 in counter mode (randomgen's ``AESCounter``), chosen when the CPU has
  AES-NI (constant-time in hardware, the fastest);
* ``chacha20``: ChaCha with 20 rounds and a 256-bit key (randomgen's ``ChaCha``), otherwise.

A secure key comes straight from ``secrets.token_bytes`` (128 bits for AES, 256 for ChaCha) and
is held in memory only. A reproducible stream (``noise-seed``, ``sampling-seed``) is keyed by a
SHA-256 of the seed and a purpose label; anyone with the seed recomputes it, so it is INSECURE by
construction and labelled so.

One key gives 2^64 independent streams: stream ``s`` starts at counter ``s * 2^64``. Bulk draws
split into fixed-size chunks, one stream each, filled on several threads (NumPy releases the GIL
while filling), so the values depend on the key and the stream index only, never on the number
of threads.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from randomgen import AESCounter, ChaCha

CIPHERS: tuple[str, ...] = ("aes-ctr", "chacha20")
KEY_BYTES: dict[str, int] = {"aes-ctr": 16, "chacha20": 32}
CHACHA_ROUNDS = 20
ALLOWED_BIT_GENERATORS = (AESCounter, ChaCha)
"""The only bit generators accepted in secure mode (ChaCha with 20 rounds only)."""

CHUNK = 1 << 20
"""Normals per stream in a bulk draw (4 MiB of float32): the unit of work of one thread."""
MAX_STREAM = 1 << 64


class InsecureGeneratorError(TypeError):
    """A generator that is not cipher-based was offered where secret randomness is required."""


def aes_ni() -> bool:
    """Whether randomgen's AES uses the CPU's AES-NI instructions here."""
    return bool(AESCounter(key=0).use_aesni)


def default_cipher() -> str:
    """AES-CTR where the CPU has AES-NI (fast, constant-time), else ChaCha20."""
    return "aes-ctr" if aes_ni() else "chacha20"


def _check_cipher(cipher: str) -> str:
    if cipher not in CIPHERS:
        raise ValueError(f"cipher must be one of {', '.join(CIPHERS)}, got {cipher!r}")
    return cipher


def bit_generator(key: bytes, stream: int = 0, cipher: str = "chacha20"):
    """The cipher's bit generator under ``key`` (exactly 16 bytes for AES-128, 32 for ChaCha20),
    positioned at the start of stream ``stream`` (counter ``stream * 2^64``)."""
    _check_cipher(cipher)
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES[cipher]:
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"a {cipher} key is {KEY_BYTES[cipher]} bytes, got {size}")
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
        raise TypeError(f"stream must be an integer, got {stream!r}")
    if not 0 <= int(stream) < MAX_STREAM:
        raise ValueError(f"stream must be in [0, 2^64), got {stream}")
    k = int.from_bytes(bytes(key), "little")
    counter = int(stream) << 64
    if cipher == "chacha20":
        return ChaCha(key=k, counter=counter, rounds=CHACHA_ROUNDS)
    return AESCounter(key=k, counter=counter)


def check_secure(generator) -> None:
    """Raise :class:`InsecureGeneratorError` unless ``generator`` (a NumPy ``Generator`` or a
    bit generator) draws from AES-CTR or ChaCha20. PCG64, Philox, SFC64, MT19937, torch
    generators and anything else are refused whatever their seed."""
    bg = generator.bit_generator if isinstance(generator, np.random.Generator) else generator
    if isinstance(bg, ChaCha):
        rounds = bg.state["state"]["rounds"]
        if rounds != CHACHA_ROUNDS:
            raise InsecureGeneratorError(
                f"ChaCha with {rounds} rounds is refused for secret randomness: use 20"
            )
        return
    if isinstance(bg, AESCounter):
        return
    raise InsecureGeneratorError(
        f"{type(bg).__module__}.{type(bg).__name__} is not a cryptographic generator: secret "
        "noise and cohorts need AES-CTR or ChaCha20 (dpfl.privacy.randomness)"
    )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # a forked child inherits the pool object but not its threads: it makes its own
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="dpfl-noise")
        return _pool


class CipherStreams:
    """A cipher key and the index of the next unused stream under it.

    :meth:`secret` keys it from the OS (the key is never exported: :attr:`secure` is True);
    :meth:`from_seed` derives the key from a seed (reproducible, INSECURE). Each bulk draw takes
    the next ``ceil(n / CHUNK)`` streams, so the state of a reproducible source is one integer.
    """

    def __init__(self, key: bytes, cipher: str, secure: bool) -> None:
        bit_generator(key, 0, cipher)  # validates the key for the cipher
        self._key = bytes(key)
        self.cipher = cipher
        self.secure = secure
        self.next_stream = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # pickling (torch.save, multiprocessing) would write the key: never for a secret one
        if self.secure:
            raise TypeError("a secret CipherStreams cannot be pickled: its key never leaves memory")
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def secret(cls, cipher: str | None = None) -> CipherStreams:
        cipher = _check_cipher(cipher or default_cipher())
        if cipher == "aes-ctr" and not aes_ni():
            raise ValueError(
                "aes-ctr without AES-NI is software AES, which is not constant-time: use chacha20"
            )
        return cls(secrets.token_bytes(KEY_BYTES[cipher]), cipher, secure=True)

    @classmethod
    def from_seed(cls, seed: int, purpose: str, cipher: str = "chacha20") -> CipherStreams:
        """A reproducible stream set for ``seed``; ``purpose`` separates noise from cohorts."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        digest = hashlib.sha256(f"dpfl/{purpose}/{int(seed)}".encode()).digest()
        return cls(digest[: KEY_BYTES[cipher]], cipher, secure=False)

    def generator(self, stream: int) -> np.random.Generator:
        """A NumPy generator on stream ``stream`` (does not move :attr:`next_stream`)."""
        return np.random.Generator(bit_generator(self._key, stream, self.cipher))

    def take(self, count: int = 1) -> int:
        """Reserve ``count`` fresh streams; returns the first one's index."""
        with self._lock:
            first = self.next_stream
            if first + count > MAX_STREAM:
                raise RuntimeError("this key's streams are used up: start a fresh source")
            self.next_stream += count
            return first

    def standard_normal(self, out: np.ndarray) -> np.ndarray:
        """Fill the contiguous float32/float64 array ``out`` with N(0, 1) draws (NumPy's
        ziggurat on the cipher's bits), a chunk of :data:`CHUNK` per stream, on several
        threads when there is more than one chunk."""
        if out.dtype not in (np.float32, np.float64) or not out.flags.c_contiguous:
            raise ValueError("out must be a contiguous float32 or float64 array")
        flat = out.reshape(-1)
        n = flat.size
        chunks = max(1, -(-n // CHUNK))
        first = self.take(chunks)

        def fill(j: int) -> None:
            part = flat[j * CHUNK : min((j + 1) * CHUNK, n)]
            self.generator(first + j).standard_normal(dtype=part.dtype, out=part)

        if chunks == 1:
            fill(0)
        else:
            for future in [_executor().submit(fill, j) for j in range(chunks)]:
                future.result()
        return out

    def __repr__(self) -> str:  # never the key
        kind = "secret key" if self.secure else "key from a seed (INSECURE)"
        return f"CipherStreams({self.cipher}, {kind}, next stream {self.next_stream})"
