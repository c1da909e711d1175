"""The toy workload written by hand with torch.func: the baseline dpfl's vectorised simulator is
measured against ("within 2x of a hand-written vmap loop doing the same work").

Same work as dpfl's run of the workload: the same users' data (dpfl's SyntheticClassification,
generated on demand per sampled user, as dpfl does), Poisson sampling (Binomial count, then
distinct ids), the MLP 32-64-10 initialised by torch's default, every client's 1 local epoch of
batch-10 SGD from a per-client shuffle, per-client flat clipping of the delta, the sum, Gaussian
noise of std z*C on the sum, division by the expected cohort, a server SGD step. What it leaves
out is what a framework adds: input validation, the server's check of each update against the
bound, the privacy ledger and per-round epsilon, metrics files, fault handling, padding for
clients of unequal size (all users here have 50 examples, which this loop assumes). Like every
other engine in the comparison it evaluates the model on the test set after every round.

Usage (prints one JSON line): python benchmarks/handwritten_vmap.py --rounds 20 [--workload JSON]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(workload: dict, rounds: int) -> dict:
    from dpfl.data import SyntheticClassification

    population = int(workload["population"])
    n_examples = int(workload["examples-per-user"])
    q = float(workload["cohort-size"]) / population
    batch, lr = int(workload["batch-size"]), float(workload["client-lr"])
    clip, z = float(workload["clip-norm"]), float(workload["noise-multiplier"])
    server_lr, seed = float(workload["server-lr"]), int(workload["seed"])
    data = SyntheticClassification(num_users=population, examples_per_user=n_examples, seed=seed)
    torch.manual_seed(seed)
    hidden = int(workload["hidden"])
    model = torch.nn.Sequential(
        torch.nn.Linear(data.features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    grads = vmap(grad(loss))
    noise = torch.Generator().manual_seed(seed + 1)
    test = data.test_data().tensors
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, 7, r])
        users = np.sort(rng.choice(population, size=rng.binomial(population, q), replace=False))
        k = len(users)
        if k:
            xs, ys = zip(*(data.user_data(int(u)).tensors.values() for u in users), strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            perm = torch.stack(
                [
                    torch.randperm(n_examples, generator=torch.Generator().manual_seed(int(u) + r))
                    for u in users
                ]  # fmt: skip
            )
            params = {n: w.expand(k, *w.shape).clone() for n, w in weights.items()}
            rows = torch.arange(k)[:, None]
            for s in range(0, n_examples, batch):
                idx = perm[:, s : s + batch]
                g = grads(params, x[rows, idx], y[rows, idx])
                params = {n: p - lr * g[n] for n, p in params.items()}
            delta = {n: p - weights[n] for n, p in params.items()}
            norms = torch.sqrt(sum(d.reshape(k, -1).pow(2).sum(1) for d in delta.values()))
            scale = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
            total = {n: (d * scale.view(-1, *[1] * (d.dim() - 1))).sum(0) for n, d in delta.items()}
        else:
            total = {n: torch.zeros_like(w) for n, w in weights.items()}
        for n, t in total.items():
            noisy = t + torch.randn(t.shape, generator=noise) * (z * clip)
            weights[n] = weights[n] + server_lr * noisy / (q * population)
        with torch.no_grad():  # evaluated every round, as dpfl (eval-every 1), Flower and pfl
            pred = functional_call(model, weights, (test["x"],)).argmax(1)
            accuracy = float((pred == test["y"]).float().mean())
        times.append(time.perf_counter() - t0)
    return {
        "median_ms": statistics.median(times) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy": accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workload", help="the workload as JSON (default: federated_speed's)")
    args = parser.parse_args()
    if args.workload:
        workload = json.loads(args.workload)
    else:
        from federated_speed import WORKLOAD as workload
    print(json.dumps(run(workload, args.rounds)))


if __name__ == "__main__":
    main()
