"""Speech recognition as a dpfl task: CTC loss to train, greedy-decoding WER and CER to evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dpfl.models.asr.models import build_asr_model
from dpfl.models.asr.text import CharTokenizer, error_counts, greedy_decode


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ASRTask:
    arch: str = "transformer"
    size: str = "tiny"
    dropout: float = 0.3
    layerdrop: float = 0.3
    spec_augment: bool = True
    eval_batch_seconds: float = 60.0
    norm: str = "layernorm"
    norm_options: Any = None
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    name: str = "asr"
    metric: str = "wer"
    higher_is_better: bool = False

    def build_model(self) -> nn.Module:
        return build_asr_model(
            self.arch,
            self.size,
            self.tokenizer.vocab_size,
            self.dropout,
            self.layerdrop,
            self.spec_augment,
            norm=self.norm,
            norm_options=self.norm_options,
        )

    @staticmethod
    def _ctc(
        model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = _device(model)
        if "feats" in batch:  # from a feature store: the front-end's work is done
            log_probs, out_lengths = model.forward_features(
                batch["feats"].to(device), batch["frames"].to(device)
            )
        else:
            log_probs, out_lengths = model(batch["waves"].to(device), batch["lengths"].to(device))
        loss = nn.functional.ctc_loss(
            log_probs.transpose(0, 1).float(),
            batch["targets"].to(device),
            out_lengths,
            batch["target_lengths"].to(device),
            blank=CharTokenizer.blank,
            reduction="mean",
            zero_infinity=True,
        )
        return loss, log_probs, out_lengths

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._ctc(model, batch)[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        """WER and CER of greedy decoding, and the mean CTC loss, over ``data``."""
        was_training = model.training
        model.eval()
        hyps, refs, losses, weights = [], [], [], []
        for idx in data.batches_by_seconds(self.eval_batch_seconds):
            batch = data.batch(idx)
            loss, log_probs, out_lengths = self._ctc(model, batch)
            hyps += greedy_decode(log_probs, out_lengths, self.tokenizer)
            refs += batch["texts"]
            losses.append(loss.item() * len(idx))
            weights.append(len(idx))
        model.train(was_training)
        if not refs:
            raise ValueError("cannot evaluate on an empty dataset")
        c = error_counts(hyps, refs)
        return {
            "wer": c["word_errors"] / max(1, c["words"]),
            "cer": c["char_errors"] / max(1, c["chars"]),
            "loss": sum(losses) / sum(weights),
        }
