"""Side-by-side speed of one named workload: dpfl's in-process simulator vs Flower's simulation
engine (running dpfl's own ServerApp/ClientApp, so the maths is identical and only the engine
differs), measured in the same invocation on the same machine, dpfl both sequential and
vectorised (a cohort as one torch.func computation); plus a dpfl-only run with a population of
1,000,000 users (vectorised).

Workload "toy-mlp": 1,000 users x 50 examples (32 features, 10 classes), MLP 32-64-10, expected
cohort 50 (Poisson), 1 local epoch, batch 10, client SGD lr 0.1, flat clipping C = 0.5, noise
multiplier 1.67 on the sum, server SGD lr 1.0, 20 rounds.

Flower is configured fairly: one ClientApp worker per core (client-resources-num-cpus = 1), and
dpfl's ServerApp waits until all 1,000 nodes are connected before round 1, so every round samples
from the full population. Times are medians over rounds of the per-round wall time that both
engines record in metrics.jsonl (start-up excluded: Ray, process spawning, node discovery).

Not a test; CI does not run it. Usage:
    .venv/bin/python benchmarks/federated_speed.py [--rounds 20] [--skip-flower] [--skip-million]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOAD = {
    "population": 1000,
    "examples-per-user": 50,
    "hidden": "64",
    "cohort-size": 50.0,
    "local-epochs": 1,
    "batch-size": 10,
    "client-optimizer": "sgd",
    "client-lr": 0.1,
    "clip-norm": 0.5,
    "clip-scheme": "flat",
    "noise-multiplier": 1.67,
    "target-epsilon": 0.0,
    "server-optimizer": "sgd",
    "server-lr": 1.0,
    "diagnostics": False,
    "seed": 0,
}

# Runs one dpfl simulation in a fresh process and prints its peak RSS, so each figure is that
# run's own and start-up costs are excluded from the per-round times.
CHILD = """
import json, resource, sys
from dpfl.config import RunConfig
from dpfl.simulations.engine import simulate
summary = simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), progress=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "final": summary["final"]}))
"""


def round_ms(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["seconds"] * 1000 for r in rows if r.get("round", 0) > 0]


def run_dpfl(values: dict) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(values)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"dpfl run failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    times = round_ms(Path(values["run-dir"]))
    return {
        "median_ms": statistics.median(times),
        "peak_rss_mb": out["peak_rss_mb"],
        "accuracy": out["final"]["accuracy"],
        "wall_s": time.perf_counter() - t0,
    }


def run_flower(values: dict, workdir: Path) -> dict:
    from dpfl.simulations.flower_local import (
        flwr_run_simulation,
        local_simulation_home,
        stop_local_superlink,
    )

    env = local_simulation_home(workdir / "flwr-home")
    t0 = time.perf_counter()
    try:
        res = flwr_run_simulation(values, values["population"], env)
    finally:
        stop_local_superlink(env)
    run_dir = Path(values["run-dir"])
    if res.returncode != 0 or not (run_dir / "summary.json").exists():
        raise SystemExit(f"Flower run failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "median_ms": statistics.median(round_ms(run_dir)),
        "accuracy": summary["final"]["accuracy"],
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-million", action="store_true")
    args = parser.parse_args()
    base = {**WORKLOAD, "rounds": args.rounds}
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"workload toy-mlp: {json.dumps(base)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {
            "dpfl simulator": run_dpfl({**base, "vectorize": "off", "run-dir": str(tmp / "dpfl")}),
            "dpfl simulator, vectorised": run_dpfl(
                {**base, "vectorize": "on", "run-dir": str(tmp / "dpfl-vec")}
            ),
        }
        if not args.skip_flower:
            results["Flower simulation engine"] = run_flower(
                {**base, "run-dir": str(tmp / "flower")}, tmp
            )
        if not args.skip_million:
            results["dpfl simulator, 1,000,000 users"] = run_dpfl(
                {
                    **base,
                    "population": 1_000_000,
                    "vectorize": "on",
                    "run-dir": str(tmp / "million"),
                }
            )
    print()
    print(f"{'engine':<34}{'median ms/round':>16}{'peak RSS MB':>13}{'accuracy':>10}{'wall s':>8}")
    for name, r in results.items():
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(
            f"{name:<34}{r['median_ms']:>16.1f}{rss:>13}{r['accuracy']:>10.4f}{r['wall_s']:>8.1f}"
        )
    if "Flower simulation engine" in results:
        ratio = (
            results["Flower simulation engine"]["median_ms"]
            / results["dpfl simulator"]["median_ms"]
        )
        print(f"\ndpfl speed-up over Flower's simulation engine (median ms/round): {ratio:.1f}x")
        ratio = (
            results["Flower simulation engine"]["median_ms"]
            / results["dpfl simulator, vectorised"]["median_ms"]
        )
        print(f"dpfl vectorised speed-up over Flower's simulation engine: {ratio:.1f}x")
    ratio = (
        results["dpfl simulator"]["median_ms"] / results["dpfl simulator, vectorised"]["median_ms"]
    )
    print(f"dpfl vectorised speed-up over dpfl sequential: {ratio:.1f}x")
    print("peak RSS: the dpfl process only (Flower's is spread over Ray workers; not compared)")


if __name__ == "__main__":
    main()
