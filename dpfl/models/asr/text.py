"""Characters in and out of a CTC model: tokenizer, greedy decoding, error rates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchaudio.functional import edit_distance

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz '-"


class CharTokenizer:
    """Characters to ids and back; id 0 is the CTC blank.

    The default alphabet (a-z, space, apostrophe, hyphen) gives 30 outputs with the blank. Text is
    lower-cased, other characters are dropped and runs of spaces collapsed, so "Hello,  World!"
    becomes "hello world".
    """

    blank = 0

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(
                f"the alphabet must be non-empty with distinct characters: {alphabet!r}"
            )
        self.alphabet = alphabet
        self._ids = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def normalize(self, text: str) -> str:
        kept = "".join(c if c in self._ids else (" " if c.isspace() else "") for c in text.lower())
        words = kept.split()
        return " ".join(words) if " " in self._ids else "".join(words)

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
