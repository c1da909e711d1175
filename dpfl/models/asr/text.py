"""Characters in and out of a CTC model: tokenizer, greedy decoding, error rates."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchaudio.functional import edit_distance

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz '-"
LATIN_LETTERS = "äöüßàâæçéèêëîïôœùûÿ"
"""The accented letters of the paper's character set (French and German) beyond English."""
ALPHABETS: dict[str, str] = {
    "en": DEFAULT_ALPHABET,
    "latin": DEFAULT_ALPHABET + LATIN_LETTERS,
}
"""Presets of the ``alphabet`` config key."""


@dataclass
class TextStats:
    """What normalisation did to a set of transcripts: characters outside the alphabet are
    transliterated when the result is in it (``é`` -> ``e`` with ``en``), else dropped; letters
    and digits dropped are counted (punctuation is dropped without a count: it is not spoken)."""

    transcripts: int = 0
    empty: int = 0
    """Transcripts with nothing left after normalisation."""
    transliterated: Counter = field(default_factory=Counter)
    dropped_letters: Counter = field(default_factory=Counter)
    dropped_digits: int = 0

    def summary(self, alphabet: str = "") -> str:
        """One line for a log; '' when nothing was lost."""
        parts = []
        if self.dropped_letters:
            top = ", ".join(f"{c!r} x{n}" for c, n in self.dropped_letters.most_common(8))
            parts.append(f"{sum(self.dropped_letters.values())} letters dropped ({top})")
        if self.dropped_digits:
            parts.append(f"{self.dropped_digits} digits dropped (numbers are not spelled out)")
        if self.transliterated:
            parts.append(f"{sum(self.transliterated.values())} letters transliterated")
        if self.empty:
            parts.append(f"{self.empty} transcripts empty after normalisation (left out)")
        if not parts:
            return ""
        where = f" outside the alphabet {alphabet!r}" if alphabet else ""
        return f"{self.transcripts} transcripts{where}: " + "; ".join(parts)


class CharTokenizer:
    """Characters to ids and back; id 0 is the CTC blank.

    The default alphabet (a-z, space, apostrophe, hyphen) gives 30 outputs with the blank. Text is
    lower-cased; a character outside the alphabet is replaced by its compatibility decomposition
    without accents (Unicode NFKD: ``é`` -> ``e``, ``ﬁ`` -> ``fi``) when all of that is in the
    alphabet, else dropped; runs of spaces collapse. "Café naïve, 42 times!" becomes
    "cafe naive times" with ``en`` and "café naïve times" with ``latin``; the 4 and the 2 are
    dropped and counted in ``stats``.
    """

    blank = 0

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        alphabet = ALPHABETS.get(alphabet, alphabet)
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(
                f"the alphabet must be non-empty with distinct characters: {alphabet!r}"
            )
        self.alphabet = alphabet
        self.name = next((k for k, v in ALPHABETS.items() if v == alphabet), alphabet)
        self._ids = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def _map(self, c: str, stats: TextStats | None) -> str:
        if c in self._ids:
            return c
        if c.isspace():
            return " "
        plain = "".join(
            x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x)
        ).lower()
        if plain and plain != c and all(x in self._ids for x in plain):
            if stats is not None:
                stats.transliterated[c] += 1
            return plain
        if stats is not None:
            if c.isdigit():
                stats.dropped_digits += 1
            elif c.isalpha():
                stats.dropped_letters[c] += 1
        return ""

    def normalize(self, text: str, stats: TextStats | None = None) -> str:
        kept = "".join(self._map(c, stats) for c in text.lower())
        words = kept.split()
        out = " ".join(words) if " " in self._ids else "".join(words)
        if stats is not None:
            stats.transcripts += 1
            stats.empty += not out
        return out

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in self.normalize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i - 1] for i in ids if i != self.blank)


def greedy_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor, tokenizer: CharTokenizer
) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks. ``log_probs``: (B, T, C)."""
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best, lengths.cpu().tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append(" ".join(tokenizer.decode(ids).split()))
    return out


def error_counts(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Word and character edit distances and reference lengths, summed over utterances."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    words = chars = ref_words = ref_chars = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        words += edit_distance(ref.split(), hyp.split())
        chars += edit_distance(list(ref), list(hyp))
        ref_words += len(ref.split())
        ref_chars += len(ref)
    return {"word_errors": words, "words": ref_words, "char_errors": chars, "chars": ref_chars}


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    c = error_counts(hypotheses, references)
    return c["word_errors"] / max(1, c["words"])


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    c = error_counts(hypotheses, references)
    return c["char_errors"] / max(1, c["chars"])
