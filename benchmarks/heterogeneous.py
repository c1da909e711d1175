"""Heterogeneous cohorts in dpfl's simulator: slow clients, and a round deadline that drops them.

Workload: the default synthetic classification task (2,000 users x 50 examples, 32 features,
10 classes, MLP 32-64-10), Poisson cohorts of expected size 200 (q = 0.1), 1 local epoch of
batch-10 SGD (5 steps per client) at lr 0.1, flat clipping at C = 0.5, the noise multiplier
calibrated for epsilon = 8 over the planned rounds (100 by default), LAMB on the server. Runs
with the same seeds (the same cohorts from a fixed sampling-seed, the same local training and,
through a fixed noise-seed, the same noise draws), differing only in the simulated clock: (a)
once, (b) and (c) once per spread in ``--spreads`` (0.5 and 1.0 by default), five runs in all:

(a) homogeneous: every client takes ``--step-seconds`` simulated seconds per local step;
(b) heterogeneous: a client's steps take ``--step-seconds`` x s_u, with its slowness
    s_u = exp(N(0, spread^2)) fixed per user (``sim-speed-spread``), and no deadline
    (round-timeout 1e9): each round waits for its slowest client;
(c) the same clients with a deadline (``round-timeout``) set at the (1 - ``--miss``) quantile of
    a client's simulated time (5 steps x step-seconds x exp(spread x z)), so about ``--miss``
    of the cohort misses it. A late reply is dropped (the client still trained).

Measured per run, from the run folder's metrics.jsonl and summary.json: simulated seconds per
round (``diag_sim_round_seconds``: the last accepted reply, or the deadline when anyone was late;
median and total over the run), clients timed out per round (mean, and as a fraction of the
sampled cohort), accepted replies per round, the divisor of the noisy sum (noise_std_sum /
noise_std_average: the expected cohort q K, whatever the number of replies), the mean
accepted / expected ratio (how much a deadline shrinks the average), final test accuracy, and
the final epsilon. The accountant charges the scheduled rate q in every run, so the epsilons
must be equal; the script asserts it, and that the divisor is q K in every round of every run.
Runs (a) and (b) must also reach the same model (nobody is dropped): asserted on the accuracy.

Not a test; CI does not run it. About 1 minute on 2 idle CPU cores. Usage:
    .venv/bin/python benchmarks/heterogeneous.py [--rounds 100] [--spreads 0.5,1.0] \\
        [--step-seconds 0.05] [--miss 0.15] [--out benchmarks/results/heterogeneous/...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOAD = {
    "task": "classification",
    "population": 2000,
    "examples-per-user": 50,
    "hidden": "64",
    "cohort-size": 200.0,
    "sampling": "poisson",
    "local-epochs": 1,
    "batch-size": 10,
    "client-optimizer": "sgd",
    "client-lr": 0.1,
    "clip-norm": 0.5,
    "clip-scheme": "flat",
    "noise-multiplier": 0.0,  # calibrated for target-epsilon over the planned rounds
    "target-epsilon": 8.0,
    "server-optimizer": "lamb",
    "server-lr": 0.05,
    "noise-seed": 0,  # the same noise draws in every run (reproducible, not for real use)
    "sampling-seed": 0,  # the same cohorts in every run (reproducible, not for real use)
    "diagnostics": True,  # the exact counts and simulated times (diag_*) it reports
    "seed": 0,
}


def client_steps(cfg) -> int:
    """Local steps of one client of the workload (every user holds the same number of examples)."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    examples = cfg.options("classification").examples_per_user
    return cfg.local_epochs * math.ceil(examples / cfg.batch_size)


def run(name: str, values: dict) -> dict:
    from dpfl.config import RunConfig
    from dpfl.simulation import simulate

    with tempfile.TemporaryDirectory(prefix="dpfl-hetero-") as run_dir:
        cfg = RunConfig.from_mapping({**values, "run-dir": run_dir})
        t0 = time.perf_counter()
        summary = simulate(cfg, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
        rows = [
            json.loads(line)
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
    rounds = [r for r in rows if r.get("round", 0) > 0 and not r.get("retry")]
    sim = [r["diag_sim_round_seconds"] for r in rounds]
    privacy = summary["privacy"]
    expected = privacy["expected_cohort"]
    divisors = [
        r["noise_std_sum"] / r["noise_std_average"] for r in rounds if r["noise_std_average"] > 0
    ]
    return {
        "name": name,
        "values": values,
        "rounds": len(rounds),
        "sim_round_seconds_median": statistics.median(sim),
        "sim_seconds_total": sum(sim),
        "timed_out_mean": statistics.fmean(r["diag_timed_out"] for r in rounds),
        "timed_out_fraction": sum(r["diag_timed_out"] for r in rounds)
        / sum(r["diag_cohort"] for r in rounds),
        "cohort_mean": statistics.fmean(r["diag_cohort"] for r in rounds),
        "accepted_mean": statistics.fmean(r["diag_accepted"] for r in rounds),
        "accepted_over_expected": statistics.fmean(r["diag_accepted"] / expected for r in rounds),
        "expected_cohort": expected,
        "divisors": divisors,
        "final_accuracy": summary["final"]["accuracy"],
        "epsilon": privacy["epsilon"][cfg.accountant]["epsilon"],
        "delta": privacy["delta"],
        "noise_multiplier": privacy["noise_multiplier"],
        "wall_seconds": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument(
        "--spreads", default="0.5,1.0", help="sim-speed-spread values of (b) and (c), each"
    )
    parser.add_argument("--step-seconds", type=float, default=0.05, help="sim-step-seconds")
    parser.add_argument(
        "--miss", type=float, default=0.15, help="(c): fraction of clients meant to miss it"
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "heterogeneous" / "heterogeneous.txt"),
        help="write the printed table here ('' for nowhere)",
    )
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    if not 0 < args.miss < 1:
        parser.error("--miss must be in (0, 1)")

    import torch

    from dpfl.config import RunConfig

    base = {**WORKLOAD, "rounds": args.rounds, "eval-every": args.eval_every}
    steps = client_steps(RunConfig.from_mapping(base))
    z = statistics.NormalDist().inv_cdf(1 - args.miss)
    spreads = [float(x) for x in args.spreads.split(",") if x.strip()]
    clock = {"sim-step-seconds": args.step_seconds}
    # (name, config values, deadline or None, spread)
    configs: list[tuple[str, dict, float | None, float]] = [
        ("(a) homogeneous", {**base, **clock, "sim-speed-spread": 0.0}, None, 0.0)
    ]
    for spread in spreads:
        deadline = steps * args.step_seconds * math.exp(spread * z)
        hetero = {**base, **clock, "sim-speed-spread": spread}
        configs.append(
            (f"(b) s={spread:g}, no deadline", {**hetero, "round-timeout": 1e9}, None, spread)
        )
        configs.append(
            (f"(c) s={spread:g}, deadline", {**hetero, "round-timeout": deadline}, deadline, spread)
        )
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    say("$ " + shlex.join([python.name if python.is_absolute() else str(python), *sys.argv]))
    say(
        f"# {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads"
    )
    say(
        f"workload: {base['population']} users x {base['examples-per-user']} examples, expected"
        f" cohort {base['cohort-size']:g} (q = {base['cohort-size'] / base['population']:g},"
        f" Poisson), {steps} local steps per client, {args.rounds} rounds, target epsilon"
        f" {base['target-epsilon']:g}, noise-seed {base['noise-seed']}"
    )
    say(
        f"clock: {args.step_seconds:g} simulated s per local step; (b), (c): slowness"
        f" exp(N(0, s^2)) per user, s = sim-speed-spread; (c): round-timeout at the"
        f" {1 - args.miss:.0%} quantile of a client's simulated time"
        f" ({steps} x {args.step_seconds:g} x exp(s x {z:.3f}))"
    )
    say()
    results = []
    for name, values, _, _ in configs:
        results.append(run(name, values))
    header = (
        f"{'run':<24} {'deadline':>8} {'sim s/round':>11} {'sim s total':>11}"
        f" {'timed out/round':>16} {'accepted':>8} {'divisor':>7} {'acc/expected':>12}"
        f" {'accuracy':>8} {'epsilon':>8} {'real s':>6}"
    )
    say(header)
    say("-" * len(header))
    for (_, _, dl, _), r in zip(configs, results, strict=True):
        say(
            f"{r['name']:<24} {f'{dl:.3f}' if dl else '-':>8}"
            f" {r['sim_round_seconds_median']:>11.3f} {r['sim_seconds_total']:>11.2f}"
            f" {r['timed_out_mean']:>7.1f} ({r['timed_out_fraction']:>5.1%})"
            f" {r['accepted_mean']:>8.1f} {r['expected_cohort']:>7.1f}"
            f" {r['accepted_over_expected']:>12.3f} {r['final_accuracy']:>8.4f}"
            f" {r['epsilon']:>8.4f} {r['wall_seconds']:>6.1f}"
        )
    say()
    a = results[0]
    say(
        "sim s/round: median over rounds of sim_round_seconds (the last accepted reply, or the"
        " deadline when a client was late); timed out/round: mean clients dropped per round"
        " (share of the sampled cohort); divisor: noise_std_sum / noise_std_average."
    )
    say(
        f"expected-cohort normalisation: every round of every run divides the noisy sum by"
        f" q K = {a['expected_cohort']:g}, not by the number of replies, so a deadline shrinks"
        f" the average by accepted / expected (column acc/expected)."
    )
    say(
        f"privacy: the accountant charges the scheduled q in every run: epsilon"
        f" {a['epsilon']:.6g} (delta {a['delta']:g}, z {a['noise_multiplier']:.4g}) in every"
        f" row alike."
    )
    for k in range(len(spreads)):
        b, c = results[1 + 2 * k], results[2 + 2 * k]
        say(
            f"s = {spreads[k]:g}: the deadline cuts the simulated time per round by"
            f" {1 - c['sim_round_seconds_median'] / b['sim_round_seconds_median']:.0%} (median;"
            f" total {c['sim_seconds_total']:.1f} s vs {b['sim_seconds_total']:.1f} s) and drops"
            f" {c['timed_out_fraction']:.1%} of the sampled clients; final accuracy"
            f" {c['final_accuracy']:.4f} with it vs {b['final_accuracy']:.4f} without"
            f" ({c['final_accuracy'] - b['final_accuracy']:+.4f})."
        )
    if len(spreads) > 1:
        say(
            "the deadline sits at the same quantile of each user's fixed N(0, 1) draw whatever"
            " the spread, so the same users miss it at every spread: (c) trains the same model"
            " at each s; only the simulated time differs."
        )
    say(
        "real s: this machine's seconds for the whole run (start-up included; noisy when the"
        " CPU is shared)."
    )
    say(
        f"homogeneous clients: {a['sim_round_seconds_median']:.3f} simulated s per round"
        f" ({steps} steps x {args.step_seconds:g} s)."
    )

    # What the mechanism promises, checked on these runs.
    epsilons = {r["epsilon"] for r in results}
    assert len(epsilons) == 1, f"epsilon differs between runs: {epsilons}"
    for r in results:
        assert all(math.isclose(d, r["expected_cohort"], rel_tol=1e-9) for d in r["divisors"]), (
            f"{r['name']}: the sum was not divided by the expected cohort: {r['divisors']}"
        )
    for (name, _, dl, _), r in zip(configs, results, strict=True):
        if dl is None:  # nobody dropped: the same model as the homogeneous run
            assert r["timed_out_mean"] == 0, f"{name}: clients timed out without a deadline"
            assert r["final_accuracy"] == a["final_accuracy"], f"{name}: another model than (a)"
        else:
            assert r["timed_out_mean"] > 0, f"{name}: nobody missed the deadline"

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"(written to {out})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
