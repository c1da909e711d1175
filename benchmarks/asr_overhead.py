"""dpfl's own overhead on a real model: federated rounds of the `tiny` CTC transformer (cohort
16) in dpfl's simulator vs a plain PyTorch loop doing the same client work.

Both sides use the same synthetic speech corpus (espeak-ng, made once in a temporary folder;
its creation is not timed), the same model (dpfl's `tiny` transformer, same initial weights),
the same users each round (Poisson, expected cohort 16 of 32 speakers) and the same batches (the
batch plan of dpfl.client.train.batches: 2 local steps of about 15 s of audio). The plain loop
is what a researcher would write: load the weights, SGD steps with per-step gradient clipping,
delta, flat clipping, sum, Gaussian noise, divide by the expected cohort, server SGD. dpfl adds
its round machinery: validation and the server's bound check of each update, the privacy ledger
and per-round epsilon, metrics, fault handling. Evaluation is left out of both (every 1000
rounds). Prints ms/round for each: the median of rounds 3.. (two warm-up rounds, as new audio
lengths build their kernels), over alternating turns of the two loops.

Not a test. Usage: python benchmarks/asr_overhead.py [--rounds 10] [--repeat 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPEAKERS = 32
WORKLOAD = {
    "task": "asr",
    "asr-size": "tiny",
    "asr-dropout": 0.0,
    "asr-layerdrop": 0.0,
    "spec-augment": False,
    "data-format": "synthetic",
    "synthetic-speakers": SPEAKERS,
    "synthetic-utterances": 6,
    "synthetic-test-speakers": 1,
    "max-test-utterances": 4,
    "population": SPEAKERS,
    "cohort-size": 16.0,
    "local-steps": 2,
    "batch-seconds": 15.0,
    "client-optimizer": "sgd",
    "client-lr": 0.2,
    "client-grad-clip": 1.0,
    "clip-norm": 0.01,
    "clip-scheme": "flat",
    "noise-multiplier": 0.5,
    "target-epsilon": 0.0,
    "delta": 1e-5,
    "server-optimizer": "sgd",
    "server-lr": 1.0,
    "eval-every": 1000,
    "diagnostics": False,
    "seed": 0,
}


def plain_loop(values: dict, rounds: int) -> list[float]:
    """The same client work without dpfl's round machinery; per-round seconds."""
    import numpy as np
    import torch

    from dpfl.client.train import batches
    from dpfl.config import RunConfig
    from dpfl.loop.run import local_config
    from dpfl.recipes import build_data as build_dataset
    from dpfl.recipes import build_task

    cfg = RunConfig.from_mapping(values)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    dataset = build_dataset(cfg)
    model = task.build_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    local = local_config(cfg)
    noise = torch.Generator().manual_seed(1)
    q = cfg.cohort_size / cfg.population
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, 7, r])
        users = np.sort(rng.choice(cfg.population, rng.binomial(cfg.population, q), False))
        total = {n: torch.zeros_like(w) for n, w in weights.items()}
        for u in users:
            data = dataset.user_data(int(u))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(weights[n])
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], cfg.client_lr)
            for idx in batches(data, local, torch.Generator().manual_seed(int(u) * 1000 + r)):
                opt.zero_grad()
                task.loss(model, data.batch(idx)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.client_grad_clip)
                opt.step()
            delta = {n: p.detach() - weights[n] for n, p in model.named_parameters() if n in names}
            norm = torch.sqrt(sum(d.pow(2).sum() for d in delta.values()))
            scale = min(1.0, cfg.clip_norm / max(float(norm), 1e-12))
            for n, d in delta.items():
                total[n] += d * scale
        for n, t in total.items():
            noisy = t + torch.randn(t.shape, generator=noise) * cfg.noise_multiplier * cfg.clip_norm
            weights[n] = weights[n] + cfg.server_lr * noisy / cfg.cohort_size
        times.append(time.perf_counter() - t0)
    return times


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from asr_overhead import child
child(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
"""


def child(mode: str, values: dict, rounds: int) -> None:
    if mode == "plain":
        times = plain_loop(values, rounds)
    else:
        from dpfl.config import RunConfig
        from dpfl.simulation import simulate

        simulate(
            RunConfig.from_mapping({**values, "rounds": rounds}), progress=False, overwrite=True
        )
        rows = [json.loads(x) for x in Path(values["run-dir"], "metrics.jsonl").open()]
        times = [m["seconds"] for m in rows if m.get("round", 0) > 0]
    print(json.dumps({"times": times}))


WARMUP_ROUNDS = 2
"""Rounds left out of each median: every new audio length compiles/allocates kernels first."""


def measure(mode: str, values: dict, rounds: int) -> float:
    script = CHILD.format(root=str(Path(__file__).resolve().parent))
    res = subprocess.run(
        [sys.executable, "-c", script, mode, json.dumps(values), str(rounds)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    times = json.loads(res.stdout.strip().splitlines()[-1])["times"]
    return statistics.median(times[WARMUP_ROUNDS:] if len(times) > WARMUP_ROUNDS else times) * 1000


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2, help="turns of each loop, alternating")
    parser.add_argument("--json")
    args = parser.parse_args()
    return run(args.rounds, args.json, args.repeat)


def run(rounds: int = 10, json_path: str | None = None, repeat: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        values = {**WORKLOAD, "data-dir": f"{tmp}/speech", "run-dir": f"{tmp}/run"}
        from dpfl.config import RunConfig
        from dpfl.recipes import build_data as build_dataset

        t0 = time.perf_counter()
        build_dataset(RunConfig.from_mapping(values))  # synthesise the corpus (not timed)
        made = time.perf_counter() - t0
        turns = {"dpfl": [], "plain": []}
        for _ in range(repeat):  # alternating, so a slow spell of the machine hits both
            for mode in turns:
                turns[mode].append(measure(mode, values, rounds))
        result = {
            "corpus_seconds": made,
            "dpfl_ms": statistics.median(turns["dpfl"]),
            "plain_ms": statistics.median(turns["plain"]),
            "turns": turns,
        }
    result["overhead"] = result["dpfl_ms"] / result["plain_ms"] - 1
    print(
        f"tiny ASR, cohort 16 (median of rounds {WARMUP_ROUNDS + 1}-{rounds}, {repeat} alternating "
        f"turns): dpfl {result['dpfl_ms']:.0f} ms/round "
        f"({', '.join(f'{t:.0f}' for t in turns['dpfl'])}), plain PyTorch loop "
        f"{result['plain_ms']:.0f} ms/round ({', '.join(f'{t:.0f}' for t in turns['plain'])}): "
        f"dpfl's overhead {result['overhead']:+.1%}"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
