"""Speech data: the readers on generated LibriSpeech and Common Voice folders, bad folders,
batching by seconds, and short real training runs (central and federated with DP)."""

import json
import shutil

import pytest
import torch

from dpfl.client.train import LocalTrainConfig, batches
from dpfl.config import RunConfig
from dpfl.recipes.asr.data import (
    SpeechFederatedDataset,
    load_audio,
    read_common_voice,
    read_librispeech,
)
from dpfl.recipes.asr.synth import espeak_available, generate_corpus

if not espeak_available():  # CI and `make setup` install it; say so loudly elsewhere
    pytest.fail("espeak-ng is required (apt-get install espeak-ng)", pytrace=False)


@pytest.fixture(scope="session")
def libri(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("libri"), 4, 3, test_speakers=1, seed=1)


@pytest.fixture(scope="session")
def common_voice(tmp_path_factory):
    # espeak-ng's native 22,050 Hz, as MP3: exercises decoding and resampling on load
    return generate_corpus(
        tmp_path_factory.mktemp("cv"),
        3,
        2,
        test_speakers=1,
        seed=2,
        layout="commonvoice",
        sample_rate=None,
    )


def test_librispeech_reader(libri):
    train, test = read_librispeech(libri, "train"), read_librispeech(libri, "test")
    assert len(train) == 12 and len(test) == 3
    assert sorted({u.speaker for u in train}) == ["1000", "1001", "1002", "1003"]
    assert train[0].audio.name == "1000-1-0000.flac" and train[0].text.isupper()
    ds = SpeechFederatedDataset(train, test)
    assert ds.num_users == 4
    data = ds.user_data(2)
    assert len(data) == 3 and all(1.0 < d < 6.0 for d in data.durations)
    batch = data.batch(torch.tensor([0, 2]))
    assert batch["waves"].shape[0] == 2 and batch["lengths"].max() == batch["waves"].shape[1]
    assert batch["target_lengths"].sum() == len(batch["targets"])
    assert (
        ds.tokenizer.decode(batch["targets"][: batch["target_lengths"][0]].tolist())
        == (batch["texts"][0])
    )


def test_common_voice_reader_resamples_to_16k(common_voice):
    train = read_common_voice(common_voice, "train.tsv")
    assert len(train) == 6 and train[0].speaker == "speaker1000"
    wave = load_audio(train[0].audio)
    import soundfile

    native, rate = soundfile.read(str(train[0].audio))
    assert rate != 16000
    assert abs(len(wave) - len(native) * 16000 / rate) <= 2


def test_bad_folders_name_the_file(libri, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(libri, bad)
    trans = bad / "train" / "1001" / "1" / "1001-1.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join([lines[0], "garbage-line-without-text", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"1001-1.trans.txt:2: malformed transcript line"):
        read_librispeech(bad, "train")
    trans.write_text("\n".join(lines) + "\n")
    (bad / "train" / "1002" / "1" / "1002-1-0001.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"1002-1-0001.flac is missing"):
        read_librispeech(bad, "train")
    with pytest.raises(FileNotFoundError, match="subset folder"):
        read_librispeech(bad, "dev-clean")


def test_bad_common_voice_table(common_voice, tmp_path):
    bad = tmp_path / "cv"
    shutil.copytree(common_voice, bad)
    (bad / "train.tsv").write_text("client_id\tpath\nx\ty.mp3\n")
    with pytest.raises(ValueError, match=r"train.tsv: missing column\(s\) sentence"):
        read_common_voice(bad)
    (bad / "train.tsv").write_text("client_id\tpath\tsentence\nx\tnope.mp3\thello\n")
    with pytest.raises(FileNotFoundError, match=r"train.tsv:2: audio file .*nope.mp3 is missing"):
        read_common_voice(bad)


def test_batches_by_seconds_group_similar_lengths(libri):
    ds = SpeechFederatedDataset(read_librispeech(libri, "train"), [])
    data = ds.pooled_data(ds.speakers)
    cfg = LocalTrainConfig(epochs=1, batch_seconds=7.0)
    got = list(batches(data, cfg, torch.Generator().manual_seed(0)))
    assert sorted(i for b in got for i in b.tolist()) == list(range(len(data)))
    for b in got:
        seconds = sum(data.durations[i] for i in b.tolist())
        assert len(b) == 1 or seconds <= 7.0


@pytest.fixture(scope="session")
def asr_corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("asr"), 16, 6, test_speakers=3, seed=3)


def asr_config(corpus, run_dir, **over):
    values = {
        "task": "asr",
        "data-dir": str(corpus),
        "data-format": "librispeech",
        "population": 8,
        "seed-speakers": 8,
        "cohort-size": 4.0,
        "batch-seconds": 15.0,
        "asr-dropout": 0.1,
        "asr-layerdrop": 0.0,
        "run-dir": str(run_dir),
        "max-test-utterances": 18,
    }
    values.update(over)
    return RunConfig.from_mapping(values)


@pytest.mark.long
def test_central_training_lowers_ctc_loss_and_cer(asr_corpus, tmp_path):
    """About 40 s of CPU: 8 seed speakers, 300 Adam steps; CER on 3 unseen speakers < 0.75."""
    from dpfl.recipes.asr.central import train_central

    cfg = asr_config(asr_corpus, tmp_path / "seed", **{"central-steps": 300})
    summary = train_central(cfg, progress=False)
    assert summary["initial"]["cer"] >= 0.95  # an untrained model gets nothing right
    assert summary["final"]["loss"] < 0.6 * summary["initial"]["loss"]
    assert summary["final"]["cer"] < 0.75
    rows = [json.loads(x) for x in (tmp_path / "seed" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert train_losses[-1] < train_losses[0]


def test_federated_asr_with_dp_lowers_validation_loss(asr_corpus, tmp_path):
    cfg = asr_config(
        asr_corpus,
        tmp_path / "fl",
        **{
            "rounds": 3,
            "local-steps": 5,
            "client-lr": 0.2,
            "client-grad-clip": 1.0,
            "clip-norm": 0.01,
            "clip-scheme": "dim",
            "noise-multiplier": 0.0004,
            "target-epsilon": 0.0,
            "delta": 1e-9,
            "server-optimizer": "lamb",
            "server-lr": 0.02,
        },
    )
    from dpfl.simulation import simulate

    summary = simulate(cfg, progress=False)
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert summary["metric"] == "wer" and "cer" in summary["final"]
    assert summary["privacy"]["epsilon"]["rdp"]["epsilon"] > 0


def test_population_must_match_the_corpus(asr_corpus, tmp_path):
    from dpfl.recipes import build_data as build_dataset

    with pytest.raises(ValueError, match="set population = 8"):
        build_dataset(asr_config(asr_corpus, tmp_path, population=9))


def test_common_voice_without_a_test_table_holds_out_speakers(common_voice, tmp_path):
    """A corpus with no test split: test-split holds speakers out instead of pointing the test
    set at the training data; the defaults of data-train/data-test fit Common Voice."""
    from dpfl.recipes.asr import speech_corpus

    corpus = tmp_path / "cv"
    shutil.copytree(common_voice, corpus)
    (corpus / "test.tsv").unlink()
    keys = {"task": "asr", "data-format": "commonvoice", "data-dir": str(corpus)}
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        speech_corpus(RunConfig.from_mapping({**keys, "population": 3, "cohort-size": 1.0}))
    cfg = RunConfig.from_mapping(
        {**keys, "population": 2, "cohort-size": 1.0, "test-split": "speaker"}
    )
    train, test = speech_corpus(cfg)
    assert len({u.speaker for u in train}) == 2 and len({u.speaker for u in test}) == 1
    assert not {u.speaker for u in train} & {u.speaker for u in test}
    from dpfl.recipes import build_data as build_dataset

    over = {"population": 3, "cohort-size": 1.0, "test-split": "utterance", "test-fraction": 0.5}
    dataset = build_dataset(RunConfig.from_mapping({**keys, **over}))
    assert dataset.test_from_users and len(dataset.test_data()) == 3  # one of each speaker's two
    assert not build_dataset(cfg).test_from_users  # held-out speakers are not federated users


def test_a_node_synthesises_and_reads_only_its_own_speaker(tmp_path):
    """A SuperNode's data (``build_data(cfg, user=u)``): the whole corpus's text index, numbered
    as the server numbers it, but audio for its own speaker alone, and no test set."""
    from dpfl.recipes import build_data

    keys = {
        "task": "asr",
        "data-dir": str(tmp_path / "synth"),
        "synthetic-speakers": 4,
        "synthetic-utterances": 2,
        "synthetic-test-speakers": 1,
        "seed-speakers": 1,
        "cohort-size": 1.0,
    }
    cfg = RunConfig.from_mapping(keys)
    node = build_data(cfg, user=1)
    flacs = sorted(p.name for p in (tmp_path / "synth").rglob("*.flac"))
    assert flacs == ["1002-1-0000.flac", "1002-1-0001.flac"]  # speaker 1000 seeds; 1001 is 0
    assert node.num_users == 3 and len(node.user_data(1)) == 2
    with pytest.raises(ValueError, match="user 0's data is not on this node: it holds user 1"):
        node.user_data(0)
    assert node.user_size(0) == 2  # the index is there; the audio is not
    build_data(cfg, user=1)  # idempotent: nothing synthesised again
    assert len(list((tmp_path / "synth").rglob("*.flac"))) == 2
    whole = build_data(cfg)  # the server's view: the full corpus, the same numbering
    assert len(list((tmp_path / "synth").rglob("*.flac"))) == 10
    assert whole.speakers == node.speakers
    assert whole.user_data(1).texts == node.user_data(1).texts
    a, b = whole.user_data(1), node.user_data(1)  # read from the corpus's feature store
    assert torch.equal(a.batch(torch.tensor([0]))["feats"], b.batch(torch.tensor([0]))["feats"])


def test_a_node_needs_only_its_own_speakers_audio(libri, tmp_path):
    from dpfl.recipes import build_data

    corpus = tmp_path / "libri"
    shutil.copytree(libri, corpus)
    shutil.rmtree(corpus / "test")
    for flac in (corpus / "train").rglob("*.flac"):
        if not flac.name.startswith("1002-"):
            flac.unlink()
    cfg = RunConfig.from_mapping(
        {"task": "asr", "data-format": "librispeech", "data-dir": str(corpus), "cohort-size": 1.0}
    )
    with pytest.raises(FileNotFoundError, match="1000-1-0000.flac is missing"):
        build_data(cfg)  # the server's whole federation needs every file
    node = build_data(cfg, user=2)
    assert node.num_users == 4 and len(node.user_data(2)) == 3
    assert len(node.test_data()) == 0  # a node evaluates nothing centrally
