"""Side-by-side speed of one named workload, every engine measured in the same invocation on the
same machine: dpfl's in-process simulator (one client at a time, and vectorised: a cohort as one
torch.func computation), a hand-written torch.func loop doing the same work
(benchmarks/handwritten_vmap.py), Flower's simulation engine (running dpfl's own
ServerApp/ClientApp, so the maths is identical and only the engine differs) and pfl-research
(benchmarks/pfl_research.py, in its own virtual environment, built on first use). Then dpfl
alone: the same cohort in populations of 1k to 10M users (time and peak memory per round), an
optional per-round breakdown of dpfl's time (--profile), and a second workload, the `tiny` CTC
transformer with a cohort of 16, against a plain PyTorch loop (benchmarks/asr_overhead.py).

Workload "toy-mlp": 1,000 users x 50 examples (32 features, 10 classes), MLP 32-64-10, expected
cohort 50 (Poisson), 1 local epoch, batch 10, client SGD lr 0.1, flat clipping C = 0.5, noise
multiplier 1.67 on the sum, server SGD lr 1.0, 20 rounds, the model evaluated on the test set
after every round by every engine.

One client at a time (--one-by-one): dpfl's sequential path against a plain PyTorch loop that
imports nothing from dpfl, on the toy and on examples/digits' CNN (200 users of its 8x8 digits,
cohort 100, 4 local steps of batch 8, evaluation only at the end), both on the same users' data
held in memory (dpfl reads it through ``from_arrays``). Per client the loop loads the weights
into one reused model, creates one ``torch.optim.SGD``, runs the same batches, takes the delta,
clips it flat and adds it to a sum; the server step runs once per round. Its round, verbatim:

    def plain_round(model, weights, users, cohort, work, noise):
        # One round of the plain loop: what a researcher writes without a framework.
        params = list(model.parameters())
        total = [torch.zeros_like(w) for w in weights]
        clip = work["clip-norm"]
        for u in cohort:
            x, y = users[u]
            with torch.no_grad():
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            opt = torch.optim.SGD(params, lr=work["client-lr"])
            shuffle = torch.Generator().manual_seed(int(u))
            for idx in plain_batches(len(y), work["local-steps"], work["local-epochs"],
                                     work["batch-size"], shuffle):  # fmt: skip
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                delta = [p - w for p, w in zip(params, weights, strict=True)]
                norm = torch.linalg.vector_norm(torch.stack([d.norm() for d in delta]))
                scale = min(1.0, clip / max(norm.item(), 1e-12))
                for t, d in zip(total, delta, strict=True):
                    t.add_(d, alpha=scale)
        with torch.no_grad():  # the server step, once per round
            for w, t in zip(weights, total, strict=True):
                t.add_(torch.randn(t.shape, generator=noise), alpha=work["noise-multiplier"] * clip)
                w.add_(t, alpha=work["server-lr"] / work["cohort-size"])

The same side-by-side runs dpfl vectorised and a hand-written torch.func loop for the same nets
(``func_round``: the cohort padded to its largest user, short batches masked).

Flower is configured fairly: one ClientApp worker per core (client-resources-num-cpus = 1), and
dpfl's ServerApp waits until all 1,000 nodes are connected before round 1, so every round samples
from the full population. Times are medians over rounds of the per-round wall time that each
engine records (start-up excluded: imports, Ray, process spawning, node discovery, data export).
Targets of the issue are printed as met or NOT met; nothing is asserted.

Not a test; CI does not run it. Usage:
    .venv/bin/python benchmarks/federated_speed.py [--rounds 20] [--profile] [--skip-flower]
        [--skip-pfl] [--skip-scaling] [--populations 1000,100000] [--skip-asr]
        [--one-by-one toy-mlp,conv-net] [--only-one-by-one] [--before REV]
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

import torch

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
from dpfl.simulation import simulate
summary = simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), progress=False, overwrite=True)
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
    from support import ROOT  # noqa: F401 (puts the checkout on sys.path)

    from tests.support.flower_local import (
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


def run_handwritten(values: dict) -> dict:
    """The hand-written torch.func loop (benchmarks/handwritten_vmap.py) in a fresh process."""
    t0 = time.perf_counter()
    script = Path(__file__).with_name("handwritten_vmap.py")
    res = subprocess.run(
        [sys.executable, str(script), "--workload", json.dumps(values), "--rounds",
         str(values["rounds"])],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"hand-written loop failed:\n{res.stderr[-3000:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}


PROFILE_CHILD = """
import json, sys
from dpfl.config import RunConfig
from dpfl.profiling import profiled
from dpfl.simulation import simulate
with profiled() as profile:
    simulate(RunConfig.from_mapping(json.loads(sys.argv[1])), progress=False, overwrite=True)
print(profile.table())
"""


def profile(values: dict) -> str:
    res = subprocess.run(
        [sys.executable, "-c", PROFILE_CHILD, json.dumps(values)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"profile run failed:\n{res.stderr[-3000:]}")
    return res.stdout


# ---- one client at a time: dpfl's sequential path vs a plain PyTorch loop --------------------

PLAIN_WORKLOADS = {
    "toy-mlp": {
        **{k: WORKLOAD[k] for k in ("cohort-size", "batch-size", "client-lr", "clip-norm",
                                    "noise-multiplier", "server-lr", "seed")},
        "local-epochs": 1, "local-steps": 0, "eval-every": 1,
    },
    "conv-net": {  # examples/digits' CNN on its 8x8 digits, 200 users
        "cohort-size": 100.0, "batch-size": 8, "client-lr": 0.1, "clip-norm": 0.5,
        "noise-multiplier": 1.0, "server-lr": 1.0, "seed": 0,
        "local-epochs": 0, "local-steps": 4, "eval-every": 1000,
    },
}  # fmt: skip
"""The two workloads of the side-by-side: the same cohorts, batches, clipping and server step
for dpfl (vectorize = off, then on) and the plain loop; the toy evaluates every round, the
conv net only at the end (its rounds are timed without evaluation)."""


def plain_batches(n: int, steps: int, epochs: int, batch: int, shuffle: torch.Generator):
    """Index batches: ``steps`` batches over reshuffled epochs, or ``epochs`` passes."""
    done = 0
    while True:
        perm = torch.randperm(n, generator=shuffle)
        for start in range(0, n, batch):
            yield perm[start : start + batch]
            done += 1
            if steps and done == steps:
                return
        if not steps and done >= epochs * -(-n // batch):
            return


def plain_round(model, weights, users, cohort, work, noise):
    # One round of the plain loop: what a researcher writes without a framework.
    params = list(model.parameters())
    total = [torch.zeros_like(w) for w in weights]
    clip = work["clip-norm"]
    for u in cohort:
        x, y = users[u]
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        opt = torch.optim.SGD(params, lr=work["client-lr"])
        shuffle = torch.Generator().manual_seed(int(u))
        for idx in plain_batches(len(y), work["local-steps"], work["local-epochs"],
                                 work["batch-size"], shuffle):  # fmt: skip
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            delta = [p - w for p, w in zip(params, weights, strict=True)]
            norm = torch.linalg.vector_norm(torch.stack([d.norm() for d in delta]))
            scale = min(1.0, clip / max(norm.item(), 1e-12))
            for t, d in zip(total, delta, strict=True):
                t.add_(d, alpha=scale)
    with torch.no_grad():  # the server step, once per round
        for w, t in zip(weights, total, strict=True):
            t.add_(torch.randn(t.shape, generator=noise), alpha=work["noise-multiplier"] * clip)
            w.add_(t, alpha=work["server-lr"] / work["cohort-size"])


class PlainDigitsCNN(torch.nn.Module):
    """examples/digits' DigitsCNN, restated here so the plain loop imports nothing of dpfl's
    (the example's module imports dpfl); the same layers, names and shapes."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = torch.nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def plain_model(name: str) -> torch.nn.Module:
    if name == "toy-mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )
    return PlainDigitsCNN()


def plain_child(spec: dict, step=plain_round) -> list[float]:
    """Per-round seconds of the plain loop (``step = func_round``: the hand-written torch.func
    loop); neither imports anything from dpfl."""
    import numpy as np

    name, work, rounds = spec["workload"], spec["work"], spec["rounds"]
    saved = torch.load(spec["data"], weights_only=True)
    users, test = list(zip(saved["x"], saved["y"], strict=True)), saved["test"]
    torch.manual_seed(work["seed"])
    model = plain_model(name)
    weights = [p.detach().clone() for p in model.parameters()]
    noise = torch.Generator().manual_seed(work["seed"] + 1)
    q = work["cohort-size"] / len(users)
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([work["seed"], 7, r])
        cohort = np.flatnonzero(rng.random(len(users)) < q)  # Poisson sampling
        step(model, weights, users, cohort, work, noise)
        if r % work["eval-every"] == 0 or r == rounds:
            with torch.no_grad():
                for p, w in zip(model.parameters(), weights, strict=True):
                    p.copy_(w)
                accuracy = float((model(test[0]).argmax(1) == test[1]).float().mean())
        times.append(time.perf_counter() - t0)
    print(f"{step.__name__} accuracy {accuracy:.3f}", file=sys.stderr)
    return times


def export_users(name: str, path: Path) -> None:
    """The workload's users as in-memory tensors, saved for both sides (dpfl reads them back
    with from_arrays): the toy's SyntheticClassification users, or examples/digits' 200 users."""
    import torch
    from support import ROOT

    if name == "toy-mlp":
        from dpfl.data import SyntheticClassification

        data = SyntheticClassification(num_users=WORKLOAD["population"],
                                       examples_per_user=WORKLOAD["examples-per-user"])  # fmt: skip
    else:
        sys.path.insert(0, str(ROOT / "examples" / "digits"))
        import digits

        data = digits.make_data(users=200)
    per_user = [data.user_data(u).tensors for u in range(data.num_users)]
    test = data.test_data().tensors
    torch.save({"x": [t["x"] for t in per_user], "y": [t["y"] for t in per_user],
                "test": (test["x"], test["y"])}, path)  # fmt: skip


def dpfl_child(spec: dict, vectorize: str) -> list[float]:
    """dpfl's per-round seconds on the same users, through its Python API."""
    from support import ROOT

    import dpfl
    from dpfl.data import from_arrays

    name, work = spec["workload"], spec["work"]
    saved = torch.load(spec["data"], weights_only=True)
    owner = torch.cat([torch.full((len(y),), u) for u, y in enumerate(saved["y"])])
    data = from_arrays({"x": torch.cat(saved["x"]), "y": torch.cat(saved["y"])}, users=owner,
                       test={"x": saved["test"][0], "y": saved["test"][1]})  # fmt: skip
    if name == "toy-mlp":
        from dpfl.recipes.classification import ClassificationTask

        task = ClassificationTask(hidden=(64,))
    else:
        sys.path.insert(0, str(ROOT / "examples" / "digits"))
        import digits

        task = digits.DigitsTask()
    config = {**work, "rounds": spec["rounds"], "vectorize": vectorize, "run-dir": spec["run-dir"],
              "clip-scheme": "flat", "target-epsilon": 0.0, "client-optimizer": "sgd",
              "server-optimizer": "sgd", "diagnostics": False}  # fmt: skip
    result = dpfl.simulate(task, data, config, progress=False, overwrite=True)
    print(f"dpfl ({vectorize}) accuracy {result['final']['accuracy']:.3f}", file=sys.stderr)
    return [s / 1000 for s in round_ms(Path(spec["run-dir"]))]


def one_by_one(
    workloads: list[str], rounds: int, repeat: int, tmp: Path, before: Path | None = None
) -> dict:
    """Per workload: median ms/round of the plain loop and of dpfl sequential and vectorised,
    each run ``repeat`` times in fresh processes, taking turns; with ``before`` (a checkout of
    an earlier dpfl) also that dpfl's sequential path ("before")."""
    out = {}
    for name in workloads:
        data = tmp / f"{name}.pt"
        export_users(name, data)
        modes = ("plain", "off", "on", "func", *(("before",) if before else ()))
        turns: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(repeat):
            for mode in modes:
                spec = {"workload": name, "work": PLAIN_WORKLOADS[name], "rounds": rounds,
                        "data": str(data), "run-dir": str(tmp / f"{name}-{mode}-{i}")}  # fmt: skip
                env = dict(os.environ)
                if mode == "before":  # the earlier dpfl first on the path
                    env["PYTHONPATH"] = str(before)
                child = "off" if mode == "before" else mode
                res = subprocess.run(
                    [sys.executable, __file__, "--child", child, "--spec", json.dumps(spec)],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if res.returncode != 0:
                    raise SystemExit(f"{name} {mode} failed:\n{res.stderr[-3000:]}")
                times = json.loads(res.stdout.strip().splitlines()[-1])
                warm = times[1:-1] if PLAIN_WORKLOADS[name]["eval-every"] > rounds else times[1:]
                turns[mode].append(statistics.median(warm) * 1000)
        out[name] = {m: statistics.median(v) for m, v in turns.items()} | {"turns": turns}
    return out


def func_round(model, weights, users, cohort, work, noise):
    """One round as a hand-written torch.func loop (the vectorised baseline): the cohort's
    users padded to the largest, each step's batches masked where a user's batch is short."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in model.named_parameters()]
    k, clip, batch = len(cohort), work["clip-norm"], work["batch-size"]
    if k == 0:
        return
    xs = [users[u][0] for u in cohort]
    ys = [users[u][1] for u in cohort]
    most = max(len(y) for y in ys)
    x = torch.zeros(k, most, *xs[0].shape[1:])
    y = torch.zeros(k, most, dtype=torch.long)
    for i, (a, b) in enumerate(zip(xs, ys, strict=True)):
        x[i, : len(b)], y[i, : len(b)] = a, b
    plans = [list(plain_batches(len(b), work["local-steps"], work["local-epochs"], batch,
                                torch.Generator().manual_seed(int(u))))
             for u, b in zip(cohort, ys, strict=True)]  # fmt: skip

    def loss(params, xb, yb, mb):
        out = functional_call(model, dict(zip(names, params, strict=True)), (xb,))
        each = torch.nn.functional.cross_entropy(out, yb, reduction="none")
        return (each * mb).sum() / mb.sum()

    grads = vmap(grad(loss))
    params = [w.expand(k, *w.shape).clone() for w in weights]
    rows = torch.arange(k)[:, None]
    for step in range(len(plans[0])):
        idx = torch.zeros(k, batch, dtype=torch.long)
        mask = torch.zeros(k, batch)
        for i, plan in enumerate(plans):
            idx[i, : len(plan[step])], mask[i, : len(plan[step])] = plan[step], 1.0
        g = grads(params, x[rows, idx], y[rows, idx], mask)
        params = [p - work["client-lr"] * gi for p, gi in zip(params, g, strict=True)]
    with torch.no_grad():
        delta = [p - w for p, w in zip(params, weights, strict=True)]
        norms = torch.sqrt(sum(d.reshape(k, -1).pow(2).sum(1) for d in delta))
        scale = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        for w, d in zip(weights, delta, strict=True):
            t = (d * scale.view(-1, *[1] * (d.dim() - 1))).sum(0)
            t.add_(torch.randn(t.shape, generator=noise), alpha=work["noise-multiplier"] * clip)
            w.add_(t, alpha=work["server-lr"] / work["cohort-size"])


def print_one_by_one(args) -> None:
    names = [n for n in args.one_by_one.split(",") if n]
    for name in names:
        if name not in PLAIN_WORKLOADS:
            known = ", ".join(PLAIN_WORKLOADS)
            raise SystemExit(f"--one-by-one: unknown workload {name!r} (known: {known})")
    with tempfile.TemporaryDirectory() as tmp:
        before = None
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "worktree",
                            "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)  # fmt: skip
        try:
            res = one_by_one(names, args.rounds, args.repeat, Path(tmp), before)
        finally:
            if before is not None:
                subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "worktree",
                                "remove", "--force", str(before)], capture_output=True)  # fmt: skip
    print("\none client at a time vs a plain PyTorch loop: median ms/round of rounds 2.. (round 1")
    print(f"warms up), each side run {args.repeat} times in fresh processes, taking turns")
    print(f"{'workload':<10}{'plain loop':>11}{'dpfl seq':>10}{'dpfl vec':>10}{'torch.func':>12}"
          f"{'seq/plain':>11}{'seq/vec':>9}{'vec/func':>10}")  # fmt: skip
    for name, r in res.items():
        print(f"{name:<10}{r['plain']:>11.1f}{r['off']:>10.1f}{r['on']:>10.1f}{r['func']:>12.1f}"
              f"{r['off'] / r['plain']:>10.2f}x{r['off'] / r['on']:>8.1f}x"
              f"{r['on'] / r['func']:>9.2f}x")  # fmt: skip
    if args.before:
        for name, r in res.items():
            print(f"{name}: dpfl {args.before} sequential {r['before']:.1f} ms/round, "
                  f"{r['before'] / r['plain']:.2f}x the plain loop (before); now "
                  f"{r['off'] / r['plain']:.2f}x")  # fmt: skip
    for name, r in res.items():
        seq = r["off"] / r["plain"]
        print(
            f"{name}: dpfl sequential / plain loop {seq:.2f}x (target <= 1.15x: "
            f"{'met' if seq <= 1.15 else 'NOT met'}); turns {json.dumps(r['turns'])}"
        )
        if name == "conv-net":
            vec = r["on"] / r["func"]
            print(f"conv-net: dpfl vectorised / hand-written torch.func loop {vec:.2f}x (target "
                  f"<= 1.5x: {'met' if vec <= 1.5 else 'NOT met'}); vectorised speed-up over "
                  f"sequential {r['off'] / r['on']:.1f}x")  # fmt: skip


def ratio_line(what: str, ratio: float, target: float | None = None) -> str:
    line = f"{what}: {ratio:.1f}x"
    if target is not None:
        line += f"  (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--repeat", type=int, default=3, help="invocations of each engine, taking turns"
    )
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-pfl", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-asr", action="store_true")
    parser.add_argument(
        "--populations",
        default="1000,100000,1000000,10000000",
        help="population sizes for the scaling runs (same cohort)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print dpfl's per-round time breakdowns"
    )
    parser.add_argument(
        "--one-by-one",
        default="toy-mlp,conv-net",
        help="workloads of the side-by-side with a plain PyTorch loop ('' skips it)",
    )
    parser.add_argument(
        "--only-one-by-one", action="store_true", help="run that side-by-side alone"
    )
    parser.add_argument(
        "--before", default="", help="a git revision whose sequential path the side-by-side adds"
    )
    parser.add_argument("--child", choices=("plain", "func", "off", "on"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measured process of the side-by-side
        spec = json.loads(args.spec)
        if args.child in ("plain", "func"):
            times = plain_child(spec, plain_round if args.child == "plain" else func_round)
        else:
            times = dpfl_child(spec, args.child)
        print(json.dumps(times))
        return
    if args.only_one_by_one:
        return print_one_by_one(args)
    base = {**WORKLOAD, "rounds": args.rounds}
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"workload toy-mlp: {json.dumps(base)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engines = {
            "dpfl simulator": lambda i: run_dpfl(
                {**base, "vectorize": "off", "run-dir": str(tmp / f"dpfl-{i}")}
            ),
            "dpfl simulator, vectorised": lambda i: run_dpfl(
                {**base, "vectorize": "on", "run-dir": str(tmp / f"dpfl-vec-{i}")}
            ),
            "hand-written torch.func loop": lambda i: run_handwritten(base),
        }
        if not args.skip_flower:
            engines["Flower simulation engine"] = lambda i: run_flower(
                {**base, "run-dir": str(tmp / f"flower-{i}")}, tmp
            )
        if not args.skip_pfl:
            from pfl_research import run_pfl

            engines["pfl-research"] = lambda i: run_pfl(base, args.rounds, tmp / f"pfl-{i}")
        # The engines take turns, args.repeat times, so a slow spell of the machine touches all
        # of them alike; each figure is the median of an engine's per-invocation medians.
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for i in range(args.repeat):
            for name, run in engines.items():
                runs[name].append(run(i))
        results = {}
        for name, rs in runs.items():
            times = sorted(r["median_ms"] for r in rs)
            best = min(rs, key=lambda r: abs(r["median_ms"] - statistics.median(times)))
            if name == "pfl-research" and rs[0].get("version"):
                name = f"pfl-research {rs[0]['version']}"
            results[name] = {**best, "median_ms": statistics.median(times), "range": times}
        scaling = {}
        if not args.skip_scaling:
            for population in [int(x) for x in args.populations.split(",")]:
                scaling[population] = run_dpfl(
                    {
                        **base,
                        "population": population,
                        "vectorize": "on",
                        "run-dir": str(tmp / f"pop-{population}"),
                    }
                )
        profiles = {}
        if args.profile:
            for mode in ("off", "on"):
                profiles[mode] = profile({**base, "vectorize": mode, "run-dir": str(tmp / "prof")})
    print()
    print(f"medians over rounds; each engine run {args.repeat} times, taking turns: the median of")
    print("its runs' medians, and their range")
    print(
        f"{'engine':<32}{'median ms/round':>16}{'range':>16}{'peak RSS MB':>13}{'accuracy':>10}"
        f"{'wall s':>8}"
    )
    for name, r in results.items():
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        spread = f"{r['range'][0]:.1f}-{r['range'][-1]:.1f}"
        print(
            f"{name:<32}{r['median_ms']:>16.1f}{spread:>16}{rss:>13}{r['accuracy']:>10.4f}{wall:>8}"
        )
    seq = results["dpfl simulator"]["median_ms"]
    vec = results["dpfl simulator, vectorised"]["median_ms"]
    hand = results["hand-written torch.func loop"]["median_ms"]
    print()
    if "Flower simulation engine" in results:
        flower = results["Flower simulation engine"]["median_ms"]
        print(
            ratio_line("dpfl sequential speed-up over Flower's simulation engine", flower / seq, 5)
        )
        print(
            ratio_line("dpfl vectorised speed-up over Flower's simulation engine", flower / vec, 35)
        )
    pfl = [r for name, r in results.items() if name.startswith("pfl-research")]
    if pfl:
        print(
            ratio_line("dpfl sequential speed-up over pfl-research", pfl[0]["median_ms"] / seq, 1)
        )
        print(
            ratio_line("dpfl vectorised speed-up over pfl-research", pfl[0]["median_ms"] / vec, 5)
        )
    print(ratio_line("dpfl vectorised speed-up over dpfl sequential", seq / vec))
    print(
        f"dpfl vectorised time / hand-written torch.func loop: {vec / hand:.2f}x"
        f"  (target <= 2x: {'met' if vec / hand <= 2 else 'NOT met'})"
    )
    print("peak RSS: each process's own (Flower's is spread over Ray workers; not compared)")
    if scaling:
        print("\npopulation scaling (dpfl vectorised, same expected cohort of 50):")
        print(f"{'population':>12}{'median ms/round':>17}{'peak RSS MB':>13}{'accuracy':>10}")
        for population, r in scaling.items():
            print(
                f"{population:>12,}{r['median_ms']:>17.1f}{r['peak_rss_mb']:>13.0f}"
                f"{r['accuracy']:>10.4f}"
            )
    for mode, table in profiles.items():
        name = "vectorised" if mode == "on" else "sequential"
        print(f"\nper-round breakdown, dpfl {name} (dpfl simulate --profile):\n{table}", end="")
    if args.one_by_one:
        print_one_by_one(args)
    if not args.skip_asr:
        from asr_overhead import run as asr_run

        print("\nsecond workload: tiny CTC transformer, cohort 16 (benchmarks/asr_overhead.py)")
        asr_run()


if __name__ == "__main__":
    main()
