"""Central vs distributed DP at the same (epsilon, delta) on the synthetic classification task.

Every cell trains the same federation (``--population`` users, expected cohort ``--cohort``,
``--rounds`` rounds, Poisson sampling) with the noise calibrated for ``--epsilon``:

* central: the server adds Gaussian noise to the sum of clipped updates;
* distributed at b = 12, 16, 20 bits: each client rotates, scales, rounds and adds its Skellam share
  (for min-contributors t = cohort / 2, the default), the server sums modulo 2^b and decodes;
  accounted as the Poisson-subsampled Skellam mechanism (written by hand);
* distributed at 20 bits with t = 0.8 x cohort (less noise per share, more rounds not released).

Per cell, over ``--seeds`` seeds (data, model and sampling; the noise is secret): the final test
accuracy, the noise std on the average, the rounds not released. Then, on this machine, for the
task's model and for larger updates: the client's encoding time per update and the server's
decoding time per round (medians of repeats), and the bits a client sends per round.

Not a test; CI does not run it. About 4 minutes on 2 CPU cores:
    .venv/bin/python benchmarks/distributed_dp.py [--out benchmarks/results/distributed_dp]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpfl.config import RunConfig
from dpfl.privacy.distributed import (
    client_generator,
    decode,
    encode,
    plan_encoding,
    rotation_signs,
)
from dpfl.simulation import simulate

CELLS = [
    ("central", {"dp-mode": "central"}),
    ("distributed b=12", {"dp-mode": "distributed", "sum-bits": 12}),
    ("distributed b=16", {"dp-mode": "distributed", "sum-bits": 16}),
    ("distributed b=20", {"dp-mode": "distributed", "sum-bits": 20}),
    ("distributed b=20, t=0.8S", {"dp-mode": "distributed", "sum-bits": 20, "t": 0.8}),
]
SAME_NOISE = {"sampling": "fixed", "target-epsilon": 0.0}
"""The encoding alone: fixed-size cohorts of S, t = S (so the noise on the sum is exactly the
accounted one), and central's calibrated z in both modes (no epsilon is reported for fixed
cohorts: these cells compare utility at equal noise)."""
SAME_NOISE_CELLS = [
    ("same noise: central", {"dp-mode": "central"}),
    ("same noise: distributed b=12", {"dp-mode": "distributed", "sum-bits": 12, "t": 1.0}),
    ("same noise: distributed b=16", {"dp-mode": "distributed", "sum-bits": 16, "t": 1.0}),
    ("same noise: distributed b=20", {"dp-mode": "distributed", "sum-bits": 20, "t": 1.0}),
]


def run_cell(args, name: str, over: dict, seed: int, root: Path) -> dict:
    over = dict(over)
    share = over.pop("t", None)
    values = {
        "population": args.population,
        "cohort-size": float(args.cohort),
        "rounds": args.rounds,
        "target-epsilon": args.epsilon,
        "noise-multiplier": 0.0,
        "server-lr": args.server_lr,
        "classification.examples-per-user": args.examples,
        "seed": seed,
        "sampling-seed": seed,  # the same cohorts in every cell of a seed (the noise is secret)
        "diagnostics": True,
        "run-dir": str(root / f"{''.join(c if c.isalnum() else '_' for c in name)}-s{seed}"),
        **over,
    }
    if share is not None:
        values["min-contributors"] = int(math.ceil(share * args.cohort))
    started = time.perf_counter()
    summary = simulate(RunConfig.from_mapping(values), progress=False)
    rows = [
        json.loads(x) for x in (Path(values["run-dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    released = [r for r in rows if r.get("round", 0) > 0 and not r.get("discarded")]
    privacy = summary["privacy"]
    return {
        "cell": name,
        "seed": seed,
        "accuracy": summary["final"]["accuracy"],
        "epsilon": privacy["epsilon"]["rdp"]["epsilon"] if "epsilon" in privacy else math.nan,
        "noise_multiplier": privacy["noise_multiplier"],
        # the noise a released sum carried: every contribution's share (a diagnostic; the
        # public noise_std_average is the accounted floor of min-contributors shares)
        "noise_std_average": statistics.median(
            r.get("diag_noise_std_sum", r["noise_std_sum"]) / args.cohort for r in released
        )
        if released
        else math.nan,
        "not_released": args.rounds - len(released),
        "seconds": time.perf_counter() - started,
        "min_contributors": privacy.get("distributed", {}).get("min_contributors"),
    }


def timings(dim: int, bits: int, cohort: int, repeats: int) -> dict:
    """Encoding per client and decoding per round for a ``dim``-coordinate update."""
    plan = plan_encoding(dim, 1.0, 1.0, bits, max(2, cohort // 2), cohort * 2)
    signs = rotation_signs(0, 1, plan.padded)
    x = torch.randn(dim, dtype=torch.float64)
    x = x / x.norm() * 0.9
    enc, dec, clip = [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        v = encode(x, plan, signs, client_generator(None, 1, r))
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode(v, plan, signs)
        dec.append(time.perf_counter() - t0)
        y = x.float()
        t0 = time.perf_counter()  # the central client's own step after training: clip
        y * min(1.0, 1.0 / float(torch.linalg.vector_norm(y)))
        clip.append(time.perf_counter() - t0)
    modulus_bits = bits + 1 + math.ceil(math.log2(cohort + 1))
    return {
        "dim": dim,
        "padded": plan.padded,
        "bits": bits,
        "encode_ms": 1e3 * statistics.median(enc),
        "decode_ms": 1e3 * statistics.median(dec),
        "central_clip_ms": 1e3 * statistics.median(clip),
        "central_bits": 32 * dim,
        "encoding_bits": bits * plan.padded,
        "secagg_modulus_bits": modulus_bits * plan.padded,
        "wire_bits_int64": 64 * plan.padded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/distributed_dp")
    ap.add_argument("--population", type=int, default=400)
    ap.add_argument("--cohort", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--server-lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="dpfl-distributed-"))
    torch.set_num_threads(2)
    results = []
    try:
        for seed in range(args.seeds):
            central_z = None
            for name, over in CELLS + SAME_NOISE_CELLS:
                if name.startswith("same noise"):
                    over = {**over, **SAME_NOISE, "noise-multiplier": central_z}
                cell = run_cell(args, name, over, seed, root)
                if name == "central":
                    central_z = cell["noise_multiplier"]
                results.append(cell)
                print(
                    f"{name:26s} seed {seed}: accuracy {cell['accuracy']:.4f} "
                    f"epsilon {cell['epsilon']:.3f} z {cell['noise_multiplier']:.3f} "
                    f"noise/avg {cell['noise_std_average']:.4f} not released "
                    f"{cell['not_released']} ({cell['seconds']:.1f} s)",
                    flush=True,
                )
        dim = sum(
            p.numel()
            for p in __import__("dpfl.recipes", fromlist=["build_task"])
            .build_task(RunConfig())
            .build_model()
            .parameters()
        )
        speed = []
        for d in (dim, 100_000, 1_000_000):
            for b in (12, 16, 20):
                try:
                    speed.append(timings(d, b, args.cohort, args.repeats))
                except ValueError as err:  # b bits too few for the rounding floor at this size
                    speed.append({"dim": d, "bits": b, "refused": str(err)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write(out, args, results, speed)


def write(out: Path, args, results: list[dict], speed: list[dict]) -> None:
    by_cell: dict[str, list[dict]] = {}
    for r in results:
        by_cell.setdefault(r["cell"], []).append(r)

    def spread(cell: str) -> tuple[float, float]:
        acc = [r["accuracy"] for r in by_cell[cell]]
        return statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0

    lines = [
        "# Central vs distributed DP at the same (epsilon, delta)",
        "",
        f"Synthetic classification, {args.population} users, expected cohort {args.cohort} "
        f"(Poisson, q = {args.cohort / args.population:g}), {args.rounds} rounds, target "
        f"epsilon {args.epsilon:g} (RDP; default delta), {args.seeds} seeds. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. "
        "Command: `.venv/bin/python benchmarks/distributed_dp.py`.",
        "",
        "| cell | accuracy (mean +- sd) | vs its central (in central sd) | z | noise std on "
        "the average | rounds not released |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = {}
    for name, rows in by_cell.items():
        acc = [r["accuracy"] for r in rows]
        mean = statistics.mean(acc)
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        c_mean, c_sd = spread("same noise: central" if name.startswith("same") else "central")
        gap = (mean - c_mean) / c_sd if c_sd > 0 else math.nan
        verdicts[name] = gap
        lines.append(
            f"| {name} | {mean:.4f} +- {sd:.4f} | {gap:+.2f} | "
            f"{statistics.mean(r['noise_multiplier'] for r in rows):.3f} | "
            f"{statistics.mean(r['noise_std_average'] for r in rows):.4f} | "
            f"{sum(r['not_released'] for r in rows)} of {len(rows) * args.rounds} |"
        )
    lines += [
        "",
        "z is the noise multiplier each mode's accountant calibrated for the target: central, "
        "of the Gaussian (Opacus' RDP of the subsampled Gaussian); distributed, of the Skellam "
        "shares' total at min-contributors t, in units of the integer L2 sensitivity (the "
        "Skellam bound with Zhu-Wang's general Poisson-subsampling bound). The noise on the "
        "average is what a released round carried (distributed: the shares of every "
        "contributor, n/t times the accounted variance). The 'same noise' cells isolate the "
        "encoding: fixed-size cohorts of S with t = S and central's calibrated z in both "
        "modes, so both carry the same noise and differ only by rotation, rounding and the "
        "modular sum (no epsilon is reported for fixed-size cohorts).",
        "",
        "## Client and server cost per update (this machine)",
        "",
        "| coordinates | padded | b | encode (ms/client) | decode (ms/round) | central clip (ms) "
        "| central bits | encoding bits | SecAgg+ modulus bits | on the wire (int64) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in speed:
        if "refused" in s:
            lines.append(f"| {s['dim']:,} | | {s['bits']} | refused: {s['refused']} | | | | | | |")
            continue
        lines.append(
            f"| {s['dim']:,} | {s['padded']:,} | {s['bits']} | {s['encode_ms']:.2f} | "
            f"{s['decode_ms']:.2f} | {s['central_clip_ms']:.3f} | {s['central_bits']:,} | "
            f"{s['encoding_bits']:,} | {s['secagg_modulus_bits']:,} | {s['wire_bits_int64']:,} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"args": vars(args), "cells": results, "speed": speed, "gaps": verdicts}, indent=2
        )  # fmt: skip
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
