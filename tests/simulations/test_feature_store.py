"""The speech feature store: features equal the model front-end's on the fly, a changed audio
file is read again, a store cut short is detected and repaired, processes append to one store
safely, and training from it equals training from decoded audio."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpfl.models.asr.models import build_asr_model
from dpfl.recipes.asr.data import (
    SpeechData,
    SpeechFeatures,
    SpeechFederatedDataset,
    load_audio,
    read_librispeech,
)
from dpfl.recipes.asr.features import ROW_BYTES, FeatureStore
from dpfl.recipes.asr.synth import espeak_available, generate_corpus

if not espeak_available():  # CI and `make setup` install it; say so loudly elsewhere
    pytest.fail("espeak-ng is required (apt-get install espeak-ng)", pytrace=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("fs"), 3, 3, test_speakers=1, seed=4)


@pytest.fixture
def own_corpus(corpus, tmp_path):
    """A copy this test may change."""
    return shutil.copytree(corpus, tmp_path / "corpus")


def both(corpus, store_dir):
    train = read_librispeech(corpus, "train")
    plain = SpeechFederatedDataset(train, [])
    stored = SpeechFederatedDataset(train, [], features=FeatureStore(store_dir))
    return plain, stored


def on_the_fly(data: SpeechData, idx):
    """The front-end's output on a batch of decoded audio, cut to its longest utterance's
    frames (the rest is padding the front-end zeroes, and a store's batch does not hold)."""
    from dpfl.models.asr.models import LogMelFrontend

    batch = data.batch(idx)
    with torch.no_grad():
        feats, frames = LogMelFrontend()(batch["waves"], batch["lengths"])
    assert not feats[..., int(frames.max()) :].any()
    return batch, feats[..., : int(frames.max())], frames


def test_features_equal_the_front_ends_within_1e_6(corpus, tmp_path):
    plain, stored = both(corpus, tmp_path / "store")
    for user in range(plain.num_users):
        a, b = plain.user_data(user), stored.user_data(user)
        assert isinstance(b, SpeechFeatures) and b.durations == a.durations
        idx = torch.arange(len(a))
        batch, feats, frames = on_the_fly(a, idx)
        got = b.batch(idx)
        assert torch.equal(got["frames"], frames)
        # beyond an utterance's frames the front-end's batch holds zeros, as the store's does
        assert got["feats"].shape == feats.shape
        assert torch.allclose(got["feats"], feats, atol=1e-6, rtol=0)
        for key in ("targets", "target_lengths", "lengths"):
            assert torch.equal(got[key], batch[key]), key
        assert got["texts"] == batch["texts"]
    # the model gives the same output from either (no augmentation or dropout in eval mode)
    model = build_asr_model("transformer", "tiny", 30).eval()
    idx = torch.tensor([2, 0])
    a, b = plain.user_data(1).batch(idx), stored.user_data(1).batch(idx)
    with torch.no_grad():
        ref, ref_len = model(a["waves"], a["lengths"])
        out, out_len = model.forward_features(b["feats"], b["frames"])
    assert torch.equal(ref_len, out_len) and torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_a_second_open_reads_the_store_not_the_audio(corpus, tmp_path, monkeypatch):
    _, stored = both(corpus, tmp_path / "store")
    for user in range(stored.num_users):
        stored.user_data(user)
    rows = stored.features.rows

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr("dpfl.recipes.asr.data.load_audio", no_decoding)
    again = SpeechFederatedDataset(
        read_librispeech(corpus, "train"), [], features=FeatureStore(tmp_path / "store")
    )
    data = again.user_data(2)
    assert again.features.rows == rows and len(data.batch(torch.arange(len(data)))["texts"]) == 3


def test_a_changed_audio_file_is_read_again(own_corpus, tmp_path):
    plain, stored = both(own_corpus, tmp_path / "store")
    before = stored.user_data(0).batch(torch.tensor([0]))["feats"]
    utt = read_librispeech(own_corpus, "train")[0]
    other = read_librispeech(own_corpus, "train")[4]  # another speaker's utterance
    shutil.copyfile(other.audio, utt.audio)  # new content, size and mtime
    plain2, stored2 = both(own_corpus, tmp_path / "store")
    got = stored2.user_data(0).batch(torch.tensor([0]))
    _, feats, frames = on_the_fly(plain2.user_data(0), torch.tensor([0]))
    assert torch.allclose(got["feats"], feats, atol=1e-6, rtol=0)
    assert got["feats"].shape != before.shape or not torch.allclose(got["feats"], before)
    assert stored2.user_data(0).durations[0] == pytest.approx(len(load_audio(other.audio)) / 16000)


@pytest.mark.parametrize("damage", ["features cut", "index line cut", "extra rows"])
def test_a_store_cut_short_is_detected_and_repaired(corpus, tmp_path, caplog, damage):
    plain, stored = both(corpus, tmp_path / "store")
    for user in range(stored.num_users):
        stored.user_data(user)
    store = stored.features
    rows, lines = store.rows, store.index_path.read_text().splitlines()
    last = json.loads(lines[-1])
    if damage == "features cut":  # a crash in the middle of the last utterance's rows
        with open(store.data_path, "r+b") as fh:
            fh.truncate((rows - last["frames"] // 2) * ROW_BYTES - 3)
    elif damage == "index line cut":  # ... or of its index line
        store.index_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    else:  # rows written, their index line never was
        store.index_path.write_text("\n".join(lines[:-1]) + "\n")
    with caplog.at_level(logging.WARNING):
        reopened = FeatureStore(tmp_path / "store")
    assert "was cut short" in caplog.text
    assert reopened.rows == rows - last["frames"] and reopened.repaired <= 1
    assert reopened.data_path.stat().st_size == reopened.rows * ROW_BYTES
    assert len(reopened.index_path.read_text().splitlines()) == len(lines) - 1
    # the lost utterance is recomputed on use, and the store is whole again
    again = SpeechFederatedDataset(read_librispeech(corpus, "train"), [], features=reopened)
    for user in range(again.num_users):
        data, ref = again.user_data(user), plain.user_data(user)
        idx = torch.arange(len(ref))
        _, feats, _ = on_the_fly(ref, idx)
        assert torch.allclose(data.batch(idx)["feats"], feats, atol=1e-6, rtol=0)
    assert reopened.rows == rows
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        FeatureStore(tmp_path / "store")
    assert "cut short" not in caplog.text


APPEND = """
import sys
from dpfl.recipes.asr.data import SpeechFederatedDataset, read_librispeech
from dpfl.recipes.asr.features import FeatureStore
ds = SpeechFederatedDataset(read_librispeech(sys.argv[1], "train"), [],
                            features=FeatureStore(sys.argv[2]))
for user in [int(u) for u in sys.argv[3].split(",")]:
    ds.user_data(user)
"""


def test_processes_append_to_one_store_safely(corpus, tmp_path):
    store = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, "-c", APPEND, str(corpus), str(store), users])
        for users in ("0,1,2", "2,1,0")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    plain, stored = both(corpus, store)
    lines = stored.features.index_path.read_text().splitlines()
    assert len({json.loads(x)["path"] for x in lines}) == 9  # every utterance, once or twice
    for user in range(plain.num_users):
        ref = plain.user_data(user)
        idx = torch.arange(len(ref))
        _, feats, _ = on_the_fly(ref, idx)
        assert torch.allclose(stored.user_data(user).batch(idx)["feats"], feats, atol=1e-6)


def test_bad_store_folder_names_the_key(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="asr.feature-cache"):
        FeatureStore(blocker / "store")


def test_training_from_the_store_equals_training_from_audio(corpus, tmp_path):
    from dpfl.config import RunConfig
    from dpfl.simulation import simulate

    base = {
        "task": "asr", "data-format": "librispeech", "data-dir": str(corpus),
        "population": 3, "cohort-size": 2.0, "rounds": 1, "local-steps": 2,
        "batch-seconds": 8.0, "asr-dropout": 0.0, "asr-layerdrop": 0.0, "spec-augment": False,
        "clip-norm": 0.5, "noise-multiplier": 0.0, "target-epsilon": 0.0,
        "sampling-seed": 1, "eval-every": 100, "max-test-utterances": 2, "diagnostics": True,
    }  # fmt: skip
    models, norms = {}, []
    for cache in ("off", str(tmp_path / "store")):
        cfg = {**base, "feature-cache": cache, "run-dir": str(tmp_path / f"run-{len(models)}")}
        summary = simulate(RunConfig.from_mapping(cfg), progress=False)
        run = tmp_path / f"run-{len(models)}"
        models[cache] = torch.load(run / "model.pt")
        assert summary["final"]["wer"] >= 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        norms.append(rows[-1]["diag_update_norm_mean"])
    off, on = models.values()
    assert set(off) == set(on)
    # The features agree to float32 rounding (an FFT of one utterance vs of a padded batch);
    # two SGD steps through the CTC loss amplify that to ~3e-5 on some weights, while the
    # clients' updates are far larger: equal to 1e-4.
    for name in off:
        assert torch.allclose(off[name], on[name], atol=1e-4, rtol=0), name
    assert norms[0] > 0.05 and norms[1] == pytest.approx(norms[0], rel=1e-3)
    assert np.isfinite(sum(float(t.abs().sum()) for t in on.values()))


def test_speech_corpus_cache_fills_the_store_ahead(corpus, tmp_path, capsys):
    from dpfl.cli import main

    real = shutil.copytree(corpus, tmp_path / "libri")  # a corpus dpfl did not synthesise
    (real / ".complete").unlink()
    before = sorted(p.name for p in real.rglob("*") if p.is_file())
    assert main(["speech-corpus", str(real), "--cache"]) == 0
    out = capsys.readouterr().out
    assert "wrote" not in out and "12 utterances of train, test" in out
    store = FeatureStore(real / ".dpfl-features")
    rows = store.rows
    assert rows > 0 and len(store.entries) == 12
    # nothing of the corpus was written to: only the store was added
    after = sorted(
        p.name for p in real.rglob("*") if p.is_file() and ".dpfl-features" not in str(p)
    )
    assert after == before
    assert main(["speech-corpus", str(real), "--cache", "--splits", "train"]) == 0
    assert "9 utterances of train, 0 new frames" in capsys.readouterr().out
    assert main(["speech-corpus", str(real), "--cache", "--splits", "dev-clean"]) == 2
    assert "dev-clean does not exist" in capsys.readouterr().err
