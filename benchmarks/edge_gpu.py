"""Client step of the `small` CTC transformer on a GPU, in float32 and bfloat16 autocast.

One client step = forward pass on a batch of about 120 s of 16 kHz audio, CTC loss (in float32),
backward pass, gradient-norm clipping at 1.0, SGD update: the inner step of dpfl's local training.
Reported per precision: steps/s, seconds of audio per second, peak GPU memory, and the loss
after the timed steps (so a broken precision path shows up as NaN or a loss that does not move).

Needs only torch and torchaudio (the dpfl model modules import nothing else), so it runs on a GPU
machine that has neither flwr nor opacus. Audio is synthetic (band-limited noise with a random
envelope; throughput does not depend on the content), targets are random character strings of
about 15 characters per second. On a machine without CUDA it prints so and exits 0.

Not a test; CI does not run it. Usage:
    python benchmarks/edge_gpu.py [--size small] [--batch-seconds 120] [--steps 30] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_batch(seconds: float, utterance_seconds: float, vocab: int, generator):
    """``seconds`` of audio as utterances of ``utterance_seconds`` +-30 %, 16 kHz."""
    lengths = []
    total = 0.0
    while total < seconds:
        s = min(
            seconds - total,
            utterance_seconds * (0.7 + 0.6 * torch.rand(1, generator=generator).item()),
        )
        s = max(s, 1.0)
        lengths.append(int(s * 16_000))
        total += s
    n, longest = len(lengths), max(lengths)
    noise = torch.randn(n, longest, generator=generator)
    kernel = torch.hann_window(33)[None, None, :] / 16
    waves = torch.nn.functional.conv1d(noise[:, None, :], kernel, padding="same")[:, 0]
    envelope = torch.rand(n, longest // 1600 + 1, generator=generator).repeat_interleave(1600, 1)
    waves = waves * envelope[:, :longest]
    lens = torch.tensor(lengths)
    waves[torch.arange(longest)[None, :] >= lens[:, None]] = 0.0
    target_lengths = (lens / 16_000 * 15).long().clamp(min=1)
    targets = torch.randint(1, vocab, (int(target_lengths.sum()),), generator=generator)
    return {"waves": waves, "lengths": lens, "targets": targets, "target_lengths": target_lengths}


def measure(model, batch, precision: str, steps: int, warmup: int, device) -> dict:
    from dpfl.models.asr.text import CharTokenizer

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            log_probs, out_lengths = model(batch["waves"], batch["lengths"])
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1).float(),
            batch["targets"],
            out_lengths,
            batch["target_lengths"],
            blank=CharTokenizer.blank,
            zero_infinity=True,
        )
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    first = float(step())
    for _ in range(warmup - 1):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    audio = float(batch["lengths"].sum()) / 16_000
    return {
        "precision": precision,
        "steps": steps,
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "audio_seconds_per_s": steps * audio / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_loss": first,
        "last_loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--utterance-seconds", type=float, default=12.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--cpu", action="store_true", help="dry run on the CPU (to check the script)"
    )
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("edge_gpu: no CUDA GPU found; nothing to measure (exit 0)")
        return 0

    from dpfl.models.asr.models import build_asr_model
    from dpfl.models.asr.text import CharTokenizer

    device = torch.device("cpu" if args.cpu else "cuda")
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(
        args.batch_seconds, args.utterance_seconds, CharTokenizer().vocab_size, gen
    )
    info = {
        "gpu": "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "size": args.size,
        "utterances": len(batch["lengths"]),
        "audio_seconds": float(batch["lengths"].sum()) / 16_000,
        "results": [],
    }
    print(
        f"{info['gpu']}, torch {info['torch']}: '{args.size}' model,"
        f" batch {info['audio_seconds']:.1f} s of audio in {info['utterances']} utterances",
        flush=True,
    )
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        model = (
            build_asr_model("transformer", args.size, CharTokenizer().vocab_size).to(device).train()
        )
        r = measure(model, batch, precision, args.steps, args.warmup, device)
        info["results"].append(r)
        print(
            f"  {precision}: {r['steps_per_s']:.2f} steps/s,"
            f" {r['audio_seconds_per_s']:.0f} s audio/s, peak {r['peak_memory_gib']:.2f} GiB,"
            f" loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}",
            flush=True,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(info["results"]) > 1:
        base = info["results"][0]
        for r in info["results"][1:]:
            speed = r["steps_per_s"] / base["steps_per_s"]
            print(
                f"  {r['precision']} vs {base['precision']}: {speed:.2f}x"
                f" steps/s, {r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x peak memory"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
