"""A synthetic multi-speaker speech corpus, made offline with espeak-ng.

A speaker is an espeak-ng voice (an English accent plus a voice variant) with its own pitch and
speed. Sentences come from a small grammar over an embedded vocabulary (no text download). The
corpus is written in LibriSpeech layout (``<subset>/<speaker>/<chapter>/<id>.flac`` and
``.trans.txt``), or in Common Voice layout (``clips/*.mp3`` and a TSV), so the real readers of
:mod:`dpfl.recipes.asr.data` load it.

Requires the ``espeak-ng`` program (Debian package ``espeak-ng``).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan")
VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "adam",
    "alex",
    "andy",
    "annie",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "gene",
    "henrique",
    "hugo",
    "iven",
    "jacky",
    "john",
    "lee",
    "linda",
    "marco",
    "max",
    "michael",
    "mike",
    "norbert",
    "pablo",
    "paul",
    "pedro",
)

_SUBJECTS = (
    "the farmer",
    "my sister",
    "a young child",
    "the old teacher",
    "our neighbour",
    "the doctor",
    "a tired traveller",
    "the captain",
    "his brother",
    "the small dog",
    "a quiet student",
    "the baker",
    "her mother",
    "the king",
    "a clever fox",
    "the sailor",
)
_VERBS = (
    "found",
    "carried",
    "painted",
    "opened",
    "watched",
    "followed",
    "cleaned",
    "counted",
    "borrowed",
    "dropped",
    "lifted",
    "moved",
    "heard",
    "kept",
    "brought",
    "sold",
)
_OBJECTS = (
    "a green box",
    "the heavy door",
    "seven apples",
    "the red kite",
    "an old letter",
    "the wooden chair",
    "a bright lamp",
    "the silver coin",
    "two warm blankets",
    "the map",
    "a broken clock",
    "the fresh bread",
    "a long rope",
    "the blue boat",
    "three small stones",
)
_PLACES = (
    "near the river",
    "in the garden",
    "before dinner",
    "after the rain",
    "at the market",
    "under the bridge",
    "by the window",
    "on the hill",
    "in the morning",
    "at night",
    "behind the house",
    "across the field",
)


def sentence(rng: np.random.Generator) -> str:
    """One sentence of the grammar: subject verb object [place]."""
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.7:
        words.append(rng.choice(_PLACES))
    return " ".join(str(w) for w in words)


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    pitch: int
    speed: int

    def args(self) -> list[str]:
        return ["-v", f"{self.accent}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed)]


def voices(count: int, seed: int) -> list[Voice]:
    """``count`` distinct speakers: accents x variants, each with its own pitch and speed."""
    rng = np.random.default_rng([seed, 1])
    combos = [(a, v) for v in VARIANTS for a in ACCENTS]
    order = rng.permutation(len(combos))
    out = []
    for k in range(count):
        accent, variant = combos[order[k % len(combos)]]
        out.append(Voice(accent, variant, int(rng.integers(25, 76)), int(rng.integers(130, 191))))
    return out


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: Voice, out_wav: Path) -> None:
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    subprocess.run(
        ["espeak-ng", *voice.args(), "-w", str(out_wav), text],
        check=True,
        capture_output=True,
        timeout=60,
    )


def generate_corpus(
    out_dir: str | Path,
    speakers: int,
    utterances: int,
    test_speakers: int = 0,
    seed: int = 0,
    layout: str = "librispeech",
    sample_rate: int | None = 16_000,
    workers: int = 4,
    only_speakers: Collection[str] | None = None,
) -> Path:
    """Write a corpus; returns ``out_dir``. Idempotent: an existing complete corpus is kept.

    ``only_speakers``: write the whole index (transcripts or TSVs: text) but synthesise only
    these speakers' audio (ids as the index names them, e.g. ``"1003"``): what one node of a
    deployment needs. Each speaker so written is marked, so a second call redoes nothing.

    LibriSpeech layout: ``train/`` with ``speakers`` speakers and ``test/`` with
    ``test_speakers`` other speakers. Common Voice layout: ``clips/*.mp3``, ``train.tsv`` and
    ``test.tsv``. ``sample_rate=None`` keeps espeak-ng's native 22,050 Hz (to exercise
    resampling on load).
    """
    import soundfile
    import torch
    import torchaudio.functional as AF

    if layout not in ("librispeech", "commonvoice"):
        raise ValueError(f"layout must be 'librispeech' or 'commonvoice', got {layout!r}")
    if speakers < 1 or utterances < 1 or test_speakers < 0:
        raise ValueError("need speakers >= 1, utterances >= 1 and test_speakers >= 0")
    out = Path(out_dir)
    done = out / ".complete"
    spec = f"{speakers} {utterances} {test_speakers} {seed} {layout} {sample_rate}\n"
    if done.is_file() and done.read_text() == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    all_voices = voices(speakers + test_speakers, seed)
    partial = only_speakers is not None
    rng = np.random.default_rng([seed, 2])
    jobs = []  # (speaker index, utterance index, subset, text)
    for k in range(speakers + test_speakers):
        subset = "train" if k < speakers else "test"
        for i in range(utterances):
            jobs.append((k, i, subset, sentence(rng)))

    def speaker_id(k: int) -> str:
        return f"{1000 + k}"

    def render(job) -> tuple:
        k, i, subset, text = job
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "u.wav"
            synthesize(text, all_voices[k], wav)
            data, rate = soundfile.read(str(wav), dtype="float32")
        if sample_rate is not None and rate != sample_rate:
            data = AF.resample(torch.from_numpy(data), rate, sample_rate).numpy()
            rate = sample_rate
        spk = speaker_id(k)
        if layout == "librispeech":
            folder = out / subset / spk / "1"
            folder.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(folder / f"{spk}-1-{i:04d}.flac"), data, rate, format="FLAC")
        else:
            (out / "clips").mkdir(exist_ok=True)
            soundfile.write(str(out / "clips" / f"{spk}_{i:04d}.mp3"), data, rate, format="MP3")
        return job

    if partial:
        wanted = set(only_speakers)
        todo = [
            j
            for j in jobs
            if speaker_id(j[0]) in wanted
            and _read(out / f".speaker-{speaker_id(j[0])}") != spec
        ]
    else:
        todo = jobs
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(render, todo))
    _write_index(out, layout, jobs, speaker_id)
    if partial:
        for spk in {speaker_id(j[0]) for j in todo}:
            (out / f".speaker-{spk}").write_text(spec)
    else:
        done.write_text(spec)
    return out


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _write_index(out: Path, layout: str, jobs: Sequence[tuple], speaker_id) -> None:
    if layout == "librispeech":
        groups: dict[tuple[str, str], list[str]] = {}
        for k, i, subset, text in jobs:
            spk = speaker_id(k)
            groups.setdefault((subset, spk), []).append(f"{spk}-1-{i:04d} {text.upper()}")
        for (subset, spk), lines in groups.items():
            (out / subset / spk / "1").mkdir(parents=True, exist_ok=True)
            (out / subset / spk / "1" / f"{spk}-1.trans.txt").write_text("\n".join(lines) + "\n")
        return
    for subset in ("train", "test"):
        with (out / f"{subset}.tsv").open("w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(["client_id", "path", "sentence", "up_votes", "down_votes"])
            for k, i, sub, text in jobs:
                if sub == subset:
                    spk = speaker_id(k)
                    w.writerow(
                        [f"speaker{spk}", f"{spk}_{i:04d}.mp3", text.capitalize() + ".", 2, 0]
                    )
