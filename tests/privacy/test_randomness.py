"""Secret randomness: only cipher-based generators, keyed from the OS, with sound output."""

import numpy as np
import pytest
import torch
from randomgen import AESCounter, ChaCha
from scipy import stats

from dpfl.privacy.mechanisms import NoiseSource
from dpfl.privacy.randomness import (
    ALLOWED_BIT_GENERATORS,
    CHUNK,
    KEY_BYTES,
    CipherStreams,
    InsecureGeneratorError,
    bit_generator,
    check_secure,
)
from dpfl.server.sampling import CohortSampler


def test_secure_noise_and_cohorts_draw_from_a_cipher():
    for streams in (NoiseSource()._streams, CohortSampler.secret()._streams):
        bg = streams.generator(0).bit_generator
        assert isinstance(bg, ALLOWED_BIT_GENERATORS)
        if isinstance(bg, ChaCha):
            assert bg.state["state"]["rounds"] == 20
        check_secure(bg)
        assert streams.secure


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.random.Generator(np.random.PCG64(2**100 + 1)),
        lambda: np.random.Generator(np.random.Philox(7)),
        lambda: np.random.Generator(np.random.SFC64(7)),
        lambda: np.random.Generator(np.random.MT19937(7)),
        lambda: np.random.default_rng(),  # PCG64 seeded from the OS: still refused
        lambda: torch.Generator().manual_seed(2**62),
        lambda: ChaCha(key=1, rounds=8),  # a reduced-round ChaCha
    ],
    ids=["pcg64", "philox", "sfc64", "mt19937", "default_rng", "torch-cpu", "chacha8"],
)
def test_non_cipher_generators_are_refused_whatever_their_seed(make):
    with pytest.raises(InsecureGeneratorError):
        check_secure(make())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_generator_is_refused():
    with pytest.raises(InsecureGeneratorError):
        check_secure(torch.Generator(device="cuda"))


@pytest.mark.parametrize("cipher", ["aes-ctr", "chacha20"])
def test_every_key_bit_matters(cipher):
    key = bytes(range(1, KEY_BYTES[cipher] + 1))

    def first(k: bytes) -> np.ndarray:
        out = np.empty(10_000, dtype=np.float32)
        CipherStreams(k, cipher, secure=True).standard_normal(out)
        return out

    base = first(key)
    bits = [0, 31, 32, 63, 64, 127] + ([128, 255] if cipher == "chacha20" else [])
    for bit in bits:
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = first(bytes(flipped))
        # a different stream, not a shifted or partly equal one
        assert np.mean(other == base) < 1e-3, bit


def test_two_secure_sources_never_agree():
    draws = [NoiseSource().standard_normal(10_000).numpy() for _ in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.mean(draws[i] == draws[j]) < 1e-3
            assert abs(np.corrcoef(draws[i], draws[j])[0, 1]) < 0.05


def test_secure_normals_pass_a_kolmogorov_smirnov_test():
    source = NoiseSource()
    x = source.standard_normal(10**6).numpy().astype(np.float64)
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert abs(x.mean()) < 5 / 1e3 and abs(x.std() - 1) < 5e-3


@pytest.mark.parametrize("threads", [1, 3])
def test_bulk_draws_do_not_depend_on_the_number_of_threads(monkeypatch, threads):
    from concurrent.futures import ThreadPoolExecutor

    import dpfl.privacy.randomness as r

    n = 3 * CHUNK + 17
    a = np.empty(n, dtype=np.float32)
    CipherStreams.from_seed(5, "noise").standard_normal(a)
    pool = ThreadPoolExecutor(max_workers=threads)
    monkeypatch.setattr(r, "_pool", pool)
    b = np.empty(n, dtype=np.float32)
    CipherStreams.from_seed(5, "noise").standard_normal(b)
    pool.shutdown()
    assert np.array_equal(a, b)
    # chunk j is stream j: the same as drawing each chunk on its own
    streams = CipherStreams.from_seed(5, "noise")
    c = np.empty(CHUNK, dtype=np.float32)
    streams.generator(1).standard_normal(dtype=np.float32, out=c)
    assert np.array_equal(a[CHUNK : 2 * CHUNK], c)


def test_purposes_and_seeds_give_separate_streams():
    def draw(seed, purpose):
        out = np.empty(1000)
        CipherStreams.from_seed(seed, purpose).standard_normal(out)
        return out

    assert not np.array_equal(draw(1, "noise"), draw(1, "sampling"))
    assert not np.array_equal(draw(1, "noise"), draw(2, "noise"))
    assert np.array_equal(draw(1, "noise"), draw(1, "noise"))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: bit_generator(b"short", 0, "aes-ctr"), ValueError),
        (lambda: bit_generator(bytes(16), 0, "chacha20"), ValueError),  # ChaCha wants 32 bytes
        (lambda: bit_generator(bytes(16), 2**64, "aes-ctr"), ValueError),
        (lambda: bit_generator(bytes(16), 0, "rc4"), ValueError),
        (lambda: CipherStreams.from_seed(-1, "noise"), ValueError),
    ],
)
def test_bad_keys_and_streams(call, error):
    with pytest.raises(error):
        call()


def test_the_key_is_never_in_a_repr():
    streams = CipherStreams.secret()
    text = repr(streams) + repr(NoiseSource()) + repr(CohortSampler.secret())
    assert streams._key.hex() not in text and "secret key" in repr(streams)
    assert isinstance(bit_generator(streams._key, 0, streams.cipher), (AESCounter, ChaCha))


def test_a_secret_key_cannot_be_pickled_or_printed_in_an_error():
    import pickle

    for holder in (NoiseSource(), CohortSampler.secret(), CipherStreams.secret()):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(holder)
        with pytest.raises(TypeError, match="cannot be pickled"):
            torch.save(holder, __import__("io").BytesIO())
    seeded = CipherStreams.from_seed(3, "noise")  # a seeded one is reproducible anyway
    assert pickle.loads(pickle.dumps(seeded)).generator(0).random() == seeded.generator(0).random()
    key = bytes(range(100, 131))  # 31 bytes: one short for ChaCha20
    with pytest.raises(ValueError) as err:
        bit_generator(key, 0, "chacha20")
    assert "31" in str(err.value) and key.hex()[:8] not in str(err.value)
    assert repr(key)[:12] not in str(err.value)
