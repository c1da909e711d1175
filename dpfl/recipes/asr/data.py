"""Speech corpora as federated datasets: one user per speaker.

Readers for a LibriSpeech folder (``<subset>/<speaker>/<chapter>/<id>.flac`` with
``<speaker>-<chapter>.trans.txt``) and a Common Voice folder (``clips/`` plus a TSV such as
``train.tsv`` with ``client_id``, ``path`` and ``sentence``). Audio is decoded with soundfile
(FLAC, WAV, MP3, ...; no network), mixed to mono and resampled to 16 kHz when it is not.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpfl.models.asr.models import SAMPLE_RATE
from dpfl.models.asr.text import CharTokenizer, TextStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Utterance:
    speaker: str
    audio: Path
    text: str


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A mono float32 waveform at ``sample_rate``; a clear error for a missing or bad file."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own error types for undecodable files
        raise ValueError(f"cannot decode audio file {path}: {err}") from None
    wave = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, rate, sample_rate)
    return wave.contiguous()


def read_librispeech(root: str | Path, subset: str, check_audio: bool = True) -> list[Utterance]:
    """Every utterance of ``root/subset``, in speaker, chapter and id order. ``check_audio=False``
    reads the transcripts only (a node whose folder holds only its own speaker's audio; a missing
    file is then reported when it is loaded)."""
    base = Path(root) / subset
    if not base.is_dir():
        raise FileNotFoundError(f"LibriSpeech subset folder {base} does not exist")
    out = []
    for trans in sorted(base.glob("*/*/*.trans.txt")):
        speaker = trans.parent.parent.name
        prefix = f"{speaker}-{trans.parent.name}-"
        for lineno, line in enumerate(trans.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].startswith(prefix):
                raise ValueError(
                    f"{trans}:{lineno}: malformed transcript line {line[:60]!r} "
                    f"(expected '{prefix}NNNN TEXT')"
                )
            audio = trans.parent / f"{parts[0]}.flac"
            if check_audio and not audio.is_file():
                raise FileNotFoundError(f"{trans}:{lineno}: audio file {audio} is missing")
            out.append(Utterance(speaker, audio, parts[1].strip()))
    if not out:
        raise ValueError(f"no transcripts (*/*/*.trans.txt) under {base}")
    return out


def read_common_voice(
    root: str | Path, tsv: str = "train.tsv", check_audio: bool = True
) -> list[Utterance]:
    """The utterances listed in ``root/tsv`` (``.tsv`` may be left out), audio under
    ``root/clips`` (``check_audio``: as for :func:`read_librispeech`)."""
    root = Path(root)
    table = root / tsv
    if not table.is_file() and table.suffix != ".tsv":
        table = root / f"{tsv}.tsv"
    if not table.is_file():
        raise FileNotFoundError(f"Common Voice table {table} does not exist")
    out = []
    with table.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"client_id", "path", "sentence"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{table}: missing column(s) {', '.join(sorted(missing))}")
        for lineno, row in enumerate(reader, start=2):
            if not row["client_id"] or not row["path"] or row["sentence"] is None:
                raise ValueError(f"{table}:{lineno}: malformed row {row}")
            audio = root / "clips" / row["path"]
            if check_audio and not audio.is_file():
                raise FileNotFoundError(f"{table}:{lineno}: audio file {audio} is missing")
            out.append(Utterance(row["client_id"], audio, row["sentence"]))
    if not out:
        raise ValueError(f"{table} lists no utterances")
    return out


class _Utterances:
    """What a user's speech data offers whatever its form: ``durations`` (seconds), ``len``,
    and length-sorted batches by seconds."""

    durations: list[float]

    def __len__(self) -> int:
        return len(self.durations)

    def batches_by_seconds(self, seconds: float) -> list[torch.Tensor]:
        """Length-sorted batches of at most ``seconds`` of audio, in order (evaluation)."""
        out, current, total = [], [], 0.0
        for i in sorted(range(len(self)), key=lambda i: self.durations[i]):
            if current and total + self.durations[i] > seconds:
                out.append(torch.tensor(current))
                current, total = [], 0.0
            current.append(i)
            total += self.durations[i]
        if current:
            out.append(torch.tensor(current))
        return out


@dataclass
class SpeechData(_Utterances):
    """One user's (or the test set's) utterances as waveforms and character ids: batches hold
    padded waveforms (``waves``, ``lengths``) for the model's own front-end."""

    waves: list[torch.Tensor]
    texts: list[str]
    tokenizer: CharTokenizer

    def __post_init__(self) -> None:
        self.targets = [
            torch.tensor(self.tokenizer.encode(t), dtype=torch.long) for t in self.texts
        ]
        self.durations = [len(w) / SAMPLE_RATE for w in self.waves]

    def batch(self, indices: torch.Tensor) -> dict:
        idx = [int(i) for i in indices]
        lengths = torch.tensor([len(self.waves[i]) for i in idx])
        waves = torch.zeros(len(idx), int(lengths.max()))
        for row, i in enumerate(idx):
            waves[row, : len(self.waves[i])] = self.waves[i]
        return {
            "waves": waves,
            "lengths": lengths,
            "targets": torch.cat([self.targets[i] for i in idx]),
            "target_lengths": torch.tensor([len(self.targets[i]) for i in idx]),
            "texts": [self.tokenizer.normalize(self.texts[i]) for i in idx],
        }


class SpeechFeatures(_Utterances):
    """The same utterances read from a :class:`~dpfl.recipes.asr.features.FeatureStore`: a
    batch is copied from the memory-mapped rows (no decoding, no resampling, no transform) and
    holds the front-end's output (``feats`` (B, 80, T) zero-padded,
    ``frames``), which the models take through ``forward_features``."""

    def __init__(self, store, entries, texts: list[str], tokenizer: CharTokenizer) -> None:
        self.store, self.texts, self.tokenizer = store, list(texts), tokenizer
        self.offsets = np.array([e.offset for e in entries], dtype=np.int64)
        self.frames = np.array([e.frames for e in entries], dtype=np.int64)
        self.samples = np.array([e.samples for e in entries], dtype=np.int64)
        self.durations = (self.samples / SAMPLE_RATE).tolist()
        ids = [tokenizer.encode(t) for t in self.texts]
        self.target_lengths = np.array([len(t) for t in ids], dtype=np.int64)
        self.target_starts = np.concatenate([[0], np.cumsum(self.target_lengths)[:-1]])
        self.all_targets = np.array([c for t in ids for c in t], dtype=np.int64)
        self.normalized = [tokenizer.normalize(t) for t in self.texts]

    def batch(self, indices: torch.Tensor) -> dict:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        frames = self.frames[idx]
        rows = self.store.array()
        # zero-padded as the front-end pads; one strided copy per utterance from the map
        feats = torch.zeros(len(idx), rows.shape[1], int(frames.max()))
        for r, (at, n) in enumerate(zip(self.offsets[idx].tolist(), frames.tolist(), strict=True)):
            feats[r, :, :n] = torch.from_numpy(rows[at : at + n]).T
        lengths = self.target_lengths[idx]
        ends = np.cumsum(lengths)
        at = np.repeat(self.target_starts[idx] - (ends - lengths), lengths) + np.arange(ends[-1])
        return {
            "feats": feats,
            "frames": torch.from_numpy(frames),
            "lengths": torch.from_numpy(self.samples[idx]),
            "targets": torch.from_numpy(self.all_targets[at]),
            "target_lengths": torch.from_numpy(lengths),
            "texts": [self.normalized[i] for i in idx.tolist()],
        }


class SpeechFederatedDataset:
    """Users are speakers (sorted by id); audio is decoded when a user is first sampled, or, with
    a feature store, its features are read from the store (computed there on first use).

    ``exclude`` speakers are left out of the federation (e.g. those a seed model was trained on
    centrally). Loaded users are kept in a small LRU cache, so a population of any size costs
    memory for about ``cache_users`` users (decoded audio; with a store, only where their rows
    are).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        test: Sequence[Utterance],
        tokenizer: CharTokenizer | None = None,
        exclude: Sequence[str] = (),
        cache_users: int = 64,
        max_test_utterances: int = 0,
        test_from_users: bool = False,
        features=None,
    ) -> None:
        """``test_from_users``: the test utterances were held out of the federated speakers'
        own (an evaluation on them is then not covered by the DP guarantee). ``features``: a
        :class:`~dpfl.recipes.asr.features.FeatureStore` the users' features are read from
        (computed there on first use); None decodes the audio on each use."""
        self.test_from_users = test_from_users
        self.features = features
        self.tokenizer = tokenizer or CharTokenizer()
        excluded = set(exclude)
        utterances = [u for u in utterances if u.speaker not in excluded]
        # What the alphabet loses is counted once, here, and said: a corpus in another language
        # would otherwise lose characters without a word. Empty transcripts are left out (CTC
        # would learn to say nothing for speech).
        self.text_stats = TextStats()
        utterances = [u for u in utterances if self.tokenizer.normalize(u.text, self.text_stats)]
        self.test_text_stats = TextStats()
        test = [u for u in test if self.tokenizer.normalize(u.text, self.test_text_stats)]
        for name, stats in (("training", self.text_stats), ("test", self.test_text_stats)):
            line = stats.summary(self.tokenizer.name)
            if line:
                log.warning("%s corpus: %s", name, line)
        by_speaker: dict[str, list[Utterance]] = {}
        for u in utterances:
            by_speaker.setdefault(u.speaker, []).append(u)
        self.speakers = sorted(by_speaker)
        self._by_speaker = by_speaker
        self._test = list(test)
        if max_test_utterances > 0 and len(self._test) > max_test_utterances:
            step = len(self._test) / max_test_utterances  # an even spread over speakers
            self._test = [self._test[int(i * step)] for i in range(max_test_utterances)]
        self._cache: OrderedDict[str, SpeechData] = OrderedDict()
        self._cache_users = cache_users
        self.node_user: int | None = None

    @property
    def num_users(self) -> int:
        return len(self.speakers)

    def for_node(self, user: int) -> SpeechFederatedDataset:
        """This dataset as the node of ``user`` holds it: the federation's numbering, and a clear
        error for any other user's data (whose audio the node need not have)."""
        self._check(user)
        self.node_user = int(user)
        return self

    def _check(self, user: int) -> None:
        if not 0 <= int(user) < self.num_users:
            raise IndexError(f"user {user} is not in the population of {self.num_users} speakers")
        if self.node_user is not None and int(user) != self.node_user:
            raise ValueError(
                f"user {user}'s data is not on this node: it holds user {self.node_user} "
                f"(speaker {self.speakers[self.node_user]}) only"
            )

    def speaker_data(self, speaker: str) -> SpeechData:
        if speaker in self._cache:
            self._cache.move_to_end(speaker)
            return self._cache[speaker]
        data = self._load(self._by_speaker[speaker])
        self._cache[speaker] = data
        if len(self._cache) > self._cache_users:
            self._cache.popitem(last=False)
        return data

    def user_data(self, user: int) -> SpeechData:
        self._check(user)
        return self.speaker_data(self.speakers[int(user)])

    def user_size(self, user: int) -> int:
        """The number of the speaker's utterances, without loading their audio (the listing
        has it, also on a node)."""
        if not 0 <= int(user) < self.num_users:
            raise IndexError(f"user {user} is not in the population of {self.num_users} speakers")
        return len(self._by_speaker[self.speakers[int(user)]])

    def pooled_data(self, speakers: Sequence[str]) -> SpeechData:
        """All utterances of ``speakers`` as one dataset (central training of a seed model)."""
        return self._load([u for s in speakers for u in self._by_speaker[s]])

    @functools.cached_property
    def _test_data(self) -> SpeechData | SpeechFeatures:
        return self._load(self._test)

    def test_data(self) -> SpeechData | SpeechFeatures:
        return self._test_data

    def _load(self, utts: Sequence[Utterance]) -> SpeechData | SpeechFeatures:
        texts = [u.text for u in utts]
        if self.features is None:
            return SpeechData([load_audio(u.audio) for u in utts], texts, self.tokenizer)
        entries = self.features.entries_for([u.audio for u in utts], load_audio)
        return SpeechFeatures(self.features, entries, texts, self.tokenizer)


def hold_out(
    utterances: Sequence[Utterance], by: str, fraction: float, seed: int = 0
) -> tuple[list[Utterance], list[Utterance]]:
    """(train, test) for a corpus without a test set.

    ``by = "speaker"``: a ``fraction`` of the speakers (at least one) becomes the test set and
    leaves the federation, so the test set holds no federated user's data. ``by = "utterance"``:
    about ``fraction`` of every speaker's utterances (each speaker keeps at least one to train
    on); the test set is then users' data, and an evaluation on it is not covered by DP.
    The choice is random but fixed by ``seed``.
    """
    if by not in ("speaker", "utterance"):
        raise ValueError(f"test-split must be 'speaker' or 'utterance', got {by!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"test-fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng([int(seed), 17])
    speakers = sorted({u.speaker for u in utterances})
    if by == "speaker":
        if len(speakers) < 2:
            raise ValueError(
                f"test-split = 'speaker' needs 2 or more speakers, got {len(speakers)}"
            )
        count = min(len(speakers) - 1, max(1, round(fraction * len(speakers))))
        chosen = {speakers[i] for i in rng.choice(len(speakers), count, replace=False)}
        return (
            [u for u in utterances if u.speaker not in chosen],
            [u for u in utterances if u.speaker in chosen],
        )
    by_speaker: dict[str, list[int]] = {}
    for i, u in enumerate(utterances):
        by_speaker.setdefault(u.speaker, []).append(i)
    test_ids: set[int] = set()
    for speaker in speakers:
        own = by_speaker[speaker]
        count = min(len(own) - 1, round(fraction * len(own)))
        test_ids.update(own[i] for i in rng.choice(len(own), count, replace=False))
    if not test_ids:
        raise ValueError(
            f"test-split = 'utterance' with test-fraction {fraction:g} holds out no utterance: "
            "the speakers have too few; raise test-fraction or use test-split = 'speaker'"
        )
    return (
        [u for i, u in enumerate(utterances) if i not in test_ids],
        [u for i, u in enumerate(utterances) if i in test_ids],
    )


def split_speakers(utterances: Sequence[Utterance], first: int) -> tuple[list[str], list[str]]:
    """The first ``first`` speakers (sorted by id) and the rest."""
    speakers = sorted({u.speaker for u in utterances})
    if not 0 <= first < len(speakers):
        raise ValueError(f"cannot hold out {first} of {len(speakers)} speakers")
    return speakers[:first], speakers[first:]


def total_hours(data: SpeechData) -> float:
    return float(np.sum(data.durations)) / 3600
