"""Federated rounds of the `small` CTC transformer in dpfl's simulator, on CUDA and on the CPU.

The paper's client recipe (10 local SGD steps at lr 0.2, per-step gradient clipping at 1.0,
per-layer "dim" clipping of the delta at C = 0.01, Gaussian noise on the average, LAMB on the
server), a cohort of 16 speakers of a synthetic espeak-ng corpus in LibriSpeech layout. Reported
per device: median seconds per round (the first round, which includes CUDA start-up, is left
out when there are more), client steps per second and seconds of audio trained on per second,
and peak GPU memory.

Not a test; CI does not run it. Make the corpus first (needs espeak-ng), then run where a GPU is:
    .venv/bin/dpfl speech-corpus data/gpu-speech --speakers 24 --utterances 10 \\
        --test-speakers 2
    python benchmarks/asr_gpu_round.py --data-dir data/gpu-speech [--devices cuda,cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--size", default="small")
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--rounds", type=int, default=5, help="rounds on CUDA")
    parser.add_argument("--cpu-rounds", type=int, default=1)
    parser.add_argument("--cohort", type=float, default=16.0)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-seconds", type=float, default=15.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from dpfl.config import RunConfig
    from dpfl.models.asr.task import ASRTask
    from dpfl.simulation import simulate

    audio = {"seconds": 0.0}
    original_loss = ASRTask.loss

    def counting_loss(self, model, batch):  # counts the audio each training step sees
        audio["seconds"] += float(batch["lengths"].sum()) / 16_000
        return original_loss(self, model, batch)

    ASRTask.loss = counting_loss
    speakers = len([p for p in (Path(args.data_dir) / "train").iterdir() if p.is_dir()])
    results = []
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("asr_gpu_round: no CUDA GPU found; skipping cuda")
            continue
        rounds = args.rounds if device == "cuda" else args.cpu_rounds
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = RunConfig.from_mapping(
                {
                    "task": "asr",
                    "asr-size": args.size,
                    "asr-dropout": 0.1,
                    "asr-layerdrop": 0.0,
                    "data-format": "librispeech",
                    "data-dir": args.data_dir,
                    "population": speakers,
                    "cohort-size": args.cohort,
                    "rounds": rounds,
                    "local-steps": args.local_steps,
                    "client-optimizer": "sgd",
                    "client-lr": 0.2,
                    "client-grad-clip": 1.0,
                    "batch-seconds": args.batch_seconds,
                    "clip-norm": 0.01,
                    "clip-scheme": "dim",
                    "noise-multiplier": 0.01,
                    "target-epsilon": 0.0,
                    "delta": 1e-9,
                    "server-optimizer": "lamb",
                    "server-lr": 0.002,
                    "eval-every": rounds,
                    "max-test-utterances": 8,
                    "device": device,
                    "diagnostics": True,  # the exact counts it reports (diag_*)
                    "run-dir": run_dir,
                }
            )
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            audio["seconds"] = 0.0
            t0 = time.perf_counter()
            summary = simulate(cfg, progress=False, overwrite=True)
            wall = time.perf_counter() - t0
            records = [
                json.loads(line)
                for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            ]
        rows = [r for r in records if "seconds" in r]
        times = [r["seconds"] for r in rows]
        # leave out the first round (CUDA start-up) and the last (it evaluates), when there are more
        timed = rows[1:-1] if len(rows) >= 3 else rows
        per_round = statistics.median(r["seconds"] for r in timed)
        client_steps = sum(r["diag_cohort"] for r in rows) * args.local_steps
        steps_per_s = (
            sum(r["diag_cohort"] for r in timed)
            * args.local_steps
            / sum(r["seconds"] for r in timed)
        )
        row = {
            "device": torch.cuda.get_device_name()
            if device == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "rounds": len(times),
            "round_seconds": times,
            "median_round_seconds": per_round,
            "cohorts": [r["diag_cohort"] for r in rows],
            "client_steps_per_s": steps_per_s,
            "audio_seconds_per_s": audio["seconds"] / client_steps * steps_per_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
            if device == "cuda"
            else None,
            "wall_seconds": wall,
            "privacy": (summary.get("privacy") or {}).get("text"),
        }
        results.append(row)
        print(
            f"{row['device']}: {per_round:.2f} s/round (median of {len(timed)}),"
            f" {row['client_steps_per_s']:.1f} client steps/s,"
            f" {row['audio_seconds_per_s']:.0f} s audio/s"
            + (f", peak {row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] else ""),
            flush=True,
        )
    if len(results) == 2:
        ratio = results[1]["median_round_seconds"] / results[0]["median_round_seconds"]
        print(f"{results[0]['device']} vs {results[1]['device']}: {ratio:.1f}x faster per round")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
