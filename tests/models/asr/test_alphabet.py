"""The speech alphabet: presets, transliteration, and what normalisation drops is counted."""

from pathlib import Path

import pytest

from dpfl.config import RunConfig
from dpfl.models.asr.text import ALPHABETS, CharTokenizer, TextStats
from dpfl.recipes import build_task
from dpfl.recipes.asr.data import SpeechFederatedDataset, Utterance, hold_out

SENTENCE = "Café naïve, 42 times!"


def test_en_transliterates_accents_and_counts_the_dropped_digits():
    tok, stats = CharTokenizer("en"), TextStats()
    assert tok.normalize(SENTENCE, stats) == "cafe naive times"
    assert stats.dropped_digits == 2 and not stats.dropped_letters
    assert sum(stats.transliterated.values()) == 2  # é and ï
    assert "2 digits dropped" in stats.summary("en")


def test_latin_keeps_the_papers_letters():
    tok, stats = CharTokenizer("latin"), TextStats()
    assert tok.normalize(SENTENCE, stats) == "café naïve times"
    assert tok.normalize("Straße, Œuvre, Ärger, garçon") == "straße œuvre ärger garçon"
    assert not stats.transliterated and stats.dropped_digits == 2
    assert set("äöüßàâæçéèêëîïôœùûÿ") <= set(ALPHABETS["latin"])
    assert tok.vocab_size == len(ALPHABETS["en"]) + 19 + 1


def test_letters_with_no_form_in_the_alphabet_are_dropped_and_counted():
    tok, stats = CharTokenizer("en"), TextStats()
    assert tok.normalize("Straße Ωmega", stats) == "strae mega"
    assert stats.dropped_letters == {"ß": 1, "ω": 1}
    assert "2 letters dropped" in stats.summary()


def test_the_model_output_follows_the_alphabet():
    for name in ("en", "latin"):
        cfg = RunConfig.from_mapping(
            {"task": "asr", "alphabet": name, "population": 4, "cohort-size": 2.0}
        )
        model = build_task(cfg).build_model()
        assert model.output.out_features == len(ALPHABETS[name]) + 1


def test_reading_a_corpus_counts_drops_and_leaves_out_empty_transcripts(caplog):
    utts = [
        Utterance("a", Path("a1.flac"), "Élan vital"),
        Utterance("a", Path("a2.flac"), "1984"),  # nothing left
        Utterance("b", Path("b1.flac"), "Schön, 3 Mal"),
        Utterance("c", Path("c1.flac"), "?!"),  # nothing left: speaker c has no data
    ]
    with caplog.at_level("WARNING", logger="dpfl"):
        ds = SpeechFederatedDataset(utts, [Utterance("t", Path("t.flac"), "ok 1")])
    assert ds.speakers == ["a", "b"] and ds.user_size(0) == 1
    assert ds.text_stats.empty == 2 and ds.text_stats.transcripts == 4
    assert ds.text_stats.dropped_digits == 5 and ds.test_text_stats.dropped_digits == 1
    assert "2 transcripts empty after normalisation (left out)" in caplog.text


def test_hold_out_by_speaker_and_by_utterance():
    utts = [Utterance(f"s{k}", Path(f"{k}-{i}.flac"), "hello") for k in range(10) for i in range(4)]
    train, test = hold_out(utts, "speaker", 0.2, seed=1)
    assert len({u.speaker for u in test}) == 2 and not {u.speaker for u in test} & {
        u.speaker for u in train
    }
    assert hold_out(utts, "speaker", 0.2, seed=1) == (train, test)  # fixed by the seed
    train, test = hold_out(utts, "utterance", 0.25, seed=1)
    assert len(test) == 10 and {u.speaker for u in train} == {f"s{k}" for k in range(10)}
    with pytest.raises(ValueError, match="holds out no utterance"):
        hold_out(utts[:2], "utterance", 0.1)
