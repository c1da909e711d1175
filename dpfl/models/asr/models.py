"""CTC speech recognisers: the DP-FL-for-ASR paper's pre-LN transformer, and a Conformer.

Both take raw 16 kHz waveforms and return per-frame log-probabilities over characters + blank:

    waveforms (B, samples), lengths (B,) -> log_probs (B, T', vocab), out_lengths (B,)

or, with the front-end's work done ahead (a feature store), ``forward_features(feats (B, 80, T),
frames (B,))`` with the same output.

Front-end (no trainable parameters, so nothing of it is federated): 80-bin log-mel features
(25 ms window, 10 ms hop) from torchaudio, normalised per utterance over its own frames, then
SpecAugment while training (2 frequency masks of width <= 30, 10 time masks of width
<= min(50, 0.1 x length)).

The paper's encoder: a 1-D convolution (kernel 7, stride 3) to 2*d channels with GLU, a LayerNorm,
positional information, N pre-LayerNorm blocks with bias-free dense layers (attention and a ReLU
MLP), dropout and layer-drop, a final LayerNorm and a linear layer to the characters. The paper
uses CAPE positions; dpfl uses fixed sinusoidal positions (no parameters, no random shifts).
With the ``paper`` size this gives 255.8M parameters in 296 tensors, the count that fixes the
paper's per-layer clip bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torchaudio
from torch import nn

from dpfl.models.normalization import NORMS, NormOptions, make_norm, record_projection_norms

SAMPLE_RATE = 16_000
N_MELS = 80


@dataclass(frozen=True)
class ASRSize:
    blocks: int
    width: int
    mlp: int
    heads: int


SIZES: dict[str, ASRSize] = {
    "tiny": ASRSize(blocks=4, width=96, mlp=384, heads=4),  # ~0.56M parameters: CPU tests
    # deeper and narrower than tiny (3.4x its tensors, fewer parameters): many small layers,
    # where the norms of tensors differ the most (per-layer clipping's case)
    "deep": ASRSize(blocks=16, width=48, mlp=192, heads=4),  # ~0.50M in 136 tensors
    "small": ASRSize(blocks=12, width=256, mlp=1024, heads=4),  # ~9.7M
    "paper": ASRSize(blocks=36, width=768, mlp=3072, heads=4),  # ~255.8M, 296 tensors
}


class LogMelFrontend(nn.Module):
    """Waveforms -> per-utterance-normalised log-mel frames (B, 80, T) and frame counts."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS) -> None:
        super().__init__()
        self.hop = int(0.010 * sample_rate)
        self.half_window = int(0.025 * sample_rate) // 2
        # torchaudio computes the filterbank eagerly: build it on the CPU even when the model is
        # built on the meta device (to count the paper model's parameters without memory).
        with torch.device("cpu"):
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=int(0.025 * sample_rate),
                win_length=int(0.025 * sample_rate),
                hop_length=self.hop,
                n_mels=n_mels,
            )

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            feats = self.mel(waveforms.float()).clamp_min(1e-10).log()  # (B, mels, T)
        # Frames whose window reaches past the utterance's end would see the batch's padding:
        # keep only those inside it, so an utterance's features do not depend on its batch.
        inside = (lengths - self.half_window).clamp_min(0)
        frames = torch.div(inside, self.hop, rounding_mode="floor") + 1
        mask = torch.arange(feats.shape[-1], device=feats.device)[None, :] < frames[:, None]
        m = mask[:, None, :].to(feats.dtype)
        count = m.sum(dim=-1, keepdim=True).clamp_min(1)
        mean = (feats * m).sum(dim=-1, keepdim=True) / count
        var = ((feats - mean) ** 2 * m).sum(dim=-1, keepdim=True) / count
        feats = (feats - mean) / (var + 1e-5).sqrt() * m
        return feats, frames


class SpecAugment(nn.Module):
    """torchaudio's frequency and time masking; active only in training mode."""

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 30,
        time_masks: int = 10,
        time_width: int = 50,
        time_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.freq = torchaudio.transforms.FrequencyMasking(freq_width)
        self.time = torchaudio.transforms.TimeMasking(time_width, p=time_fraction)
        self.freq_masks, self.time_masks = freq_masks, time_masks

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, mels, T)
        if not self.training:
            return feats
        for _ in range(self.freq_masks):
            feats = self.freq(feats)
        for _ in range(self.time_masks):
            feats = self.time(feats)
        return feats


def sinusoidal_positions(length: int, width: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, width, 2, device=device) * (-math.log(10000.0) / width))
    pe = torch.zeros(length, width, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: width // 2])
    return pe


class PreLNBlock(nn.Module):
    """x + attn(LN(x)); x + MLP(LN(x)); dense layers without biases."""

    def __init__(
        self, width: int, mlp: int, heads: int, dropout: float, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.norm1 = norm(width)
        self.attn = nn.MultiheadAttention(
            width, heads, dropout=dropout, bias=False, batch_first=True
        )
        self.norm2 = norm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp, bias=False),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(mlp, width, bias=False),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.norm2(x)))


class _ConvFrontend(nn.Module):
    """Conv1d (kernel 7, stride 3) to 2*width channels, GLU, LayerNorm."""

    kernel, stride = 7, 3

    def __init__(self, width: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, 2 * width, self.kernel, self.stride, padding=self.kernel // 2)
        self.glu = nn.GLU(dim=1)
        self.norm = norm(width)

    def out_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        pad = self.kernel // 2
        return torch.div(frames + 2 * pad - self.kernel, self.stride, rounding_mode="floor") + 1

    def forward(self, feats: torch.Tensor, frames: torch.Tensor):
        x = self.norm(self.glu(self.conv(feats)).transpose(1, 2))  # (B, T', width)
        lengths = self.out_lengths(frames)
        return x[:, : int(lengths.max())], lengths


class CTCTransformer(nn.Module):
    """The paper's encoder-only pre-LN transformer with a CTC head."""

    def __init__(
        self,
        size: ASRSize,
        vocab: int,
        dropout: float = 0.3,
        layerdrop: float = 0.3,
        spec_augment: bool = True,
        norm: str = "layernorm",
        norm_options: NormOptions | None = None,
    ) -> None:
        """``norm``: a normalisation by name (:mod:`dpfl.models.normalization`) for every norm
        layer. Layers with batch statistics count the padded frames of a batch too."""
        super().__init__()
        if not 0 <= dropout < 1 or not 0 <= layerdrop < 1:
            raise ValueError(
                f"dropout and layer-drop must be in [0, 1), got {dropout}, {layerdrop}"
            )
        self.size, self.layerdrop = size, layerdrop
        self.frontend = LogMelFrontend()
        self.augment = SpecAugment() if spec_augment else nn.Identity()

        def make(width: int) -> nn.Module:
            return make_norm(norm, width, "last", norm_options, "the ASR transformer")

        self.conv = _ConvFrontend(size.width, make)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(size.width, size.mlp, size.heads, dropout, make) for _ in range(size.blocks)
        )
        self.final_norm = make(size.width)
        self.output = nn.Linear(size.width, vocab)
        if NORMS[norm].projection:
            record_projection_norms(self)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        return self.forward_features(*self.frontend(waveforms, lengths))

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        """From the front-end's output (B, mels, T) and frame counts (a feature store's)."""
        x, out_lengths = self.conv(self.augment(feats), frames)
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device))
        pad_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths[:, None]
        for block in self.blocks:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # layer-drop: skip the whole block
            x = block(x, pad_mask)
        return self.output(self.final_norm(x)).log_softmax(dim=-1), out_lengths


class CTCConformer(nn.Module):
    """The same front-end and head around ``torchaudio.models.Conformer``.

    GroupNorm replaces the convolution module's BatchNorm, so the model keeps no running
    statistics (they would not be federated, and would leak between clients that share a
    workspace model). torchaudio's depthwise convolution does not mask padding, so frames near an
    utterance's end depend slightly on how much padding its batch has; the transformer does not.
    """

    def __init__(
        self,
        size: ASRSize,
        vocab: int,
        dropout: float = 0.1,
        kernel: int = 15,
        spec_augment: bool = True,
    ) -> None:
        super().__init__()
        self.size = size
        self.frontend = LogMelFrontend()
        self.augment = SpecAugment() if spec_augment else nn.Identity()
        self.conv = _ConvFrontend(size.width, nn.LayerNorm)
        self.conformer = torchaudio.models.Conformer(
            input_dim=size.width,
            num_heads=size.heads,
            ffn_dim=size.mlp,
            num_layers=size.blocks,
            depthwise_conv_kernel_size=kernel,
            dropout=dropout,
            use_group_norm=True,
        )
        self.output = nn.Linear(size.width, vocab)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        return self.forward_features(*self.frontend(waveforms, lengths))

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        """From the front-end's output (B, mels, T) and frame counts (a feature store's)."""
        x, out_lengths = self.conv(self.augment(feats), frames)
        x, out_lengths = self.conformer(x, out_lengths)
        return self.output(x).log_softmax(dim=-1), out_lengths


ARCHS = ("transformer", "conformer")


def build_asr_model(
    arch: str = "transformer",
    size: str | ASRSize = "tiny",
    vocab: int = 30,
    dropout: float = 0.3,
    layerdrop: float = 0.3,
    spec_augment: bool = True,
    norm: str = "layernorm",
    norm_options: NormOptions | None = None,
    **size_overrides: int,
) -> nn.Module:
    """A CTC model by name; ``size_overrides`` (blocks, width, mlp, heads) change a named size.
    ``norm`` picks the transformer's normalisation layers by name; the Conformer keeps
    torchaudio's own (LayerNorm, GroupNorm in the convolution module)."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown ASR size {size!r}; known: {', '.join(SIZES)}")
        size = SIZES[size]
    size = replace(size, **size_overrides)
    if size.width % size.heads:
        raise ValueError(f"width {size.width} is not divisible by {size.heads} heads")
    if arch == "transformer":
        return CTCTransformer(size, vocab, dropout, layerdrop, spec_augment, norm, norm_options)
    if arch == "conformer":
        if norm != "layernorm":
            raise ValueError(
                f"normalisation {norm!r} does not fit the Conformer (torchaudio's Conformer has "
                "its own LayerNorm and GroupNorm); use asr-arch = 'transformer' or norm = "
                "'layernorm'"
            )
        return CTCConformer(size, vocab, dropout, spec_augment=spec_augment)
    raise ValueError(f"unknown ASR architecture {arch!r}; known: {', '.join(ARCHS)}")
