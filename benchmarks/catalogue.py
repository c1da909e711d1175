"""Every client optimizer and every normalisation layer on the synthetic federated task.

Each row is one `dpfl` simulation of the synthetic classification task (1,000 users x 50 points,
32 features, 10 classes; MLP 32-64-64-10; cohort 50, 1 local epoch, batch 10; server LAMB at lr
0.05; 30 rounds), run without DP and with DP (per-layer dim clipping at C = 0.5, noise
calibrated to epsilon = 8 at delta = 1e-4 under RDP). Optimizer rows use no normalisation layer;
normalisation rows use SGD. Learning rates: one common-sense value per optimizer family (below),
not tuned. Reported: final test accuracy and wall time of the run.

Not a test; CI does not run it. Usage (about 10 minutes on 2 CPU cores):
    .venv/bin/python benchmarks/catalogue.py [--rounds 30] [--out benchmarks/results/catalogue]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfl.config import RunConfig  # noqa: E402
from dpfl.models.normalization import NORMS  # noqa: E402
from dpfl.models.optimizers import OPTIMIZERS  # noqa: E402
from dpfl.simulation import simulate  # noqa: E402

# (client lr, extra keys): a usual starting point for each family, not tuned here
OPTIMIZER_SETTINGS = {
    "sgd": (0.1, {}),
    "adam": (0.003, {}),
    "adamw": (0.003, {"client-weight-decay": 0.01}),
    "adagrad": (0.05, {}),
    "rmsprop": (0.001, {}),
    "yogi": (0.003, {}),
    "adamp": (0.003, {}),
    "sgdp": (0.1, {"client-momentum": 0.9}),
    "lion": (0.0003, {"client-beta2": 0.99}),
    "diffgrad": (0.003, {}),
    "conda": (0.003, {}),
    "auon": (0.05, {"client-momentum": 0.95}),
    "auon-hybrid": (0.05, {"client-momentum": 0.95}),
    "lamb": (0.01, {}),
    "lars": (0.1, {"client-momentum": 0.9}),
}


def run(keys: dict, rounds: int, dp: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        values = {
            "population": 1000,
            "cohort-size": 50,
            "examples-per-user": 50,
            "hidden": "64,64",
            "rounds": rounds,
            "eval-every": rounds,
            "server-optimizer": "lamb",
            "server-lr": 0.05,
            "diagnostics": False,
            "run-dir": d,
            **({"target-epsilon": 8.0} if dp else {"clip-norm": 0.0, "target-epsilon": 0.0}),
            **keys,
        }
        t0 = time.perf_counter()
        summary = simulate(RunConfig.from_mapping(values), progress=False, overwrite=True)
        seconds = time.perf_counter() - t0
    eps = summary["privacy"]["epsilon"]["rdp"]["epsilon"] if dp else None
    return {"accuracy": summary["final"]["accuracy"], "seconds": seconds, "epsilon": eps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/catalogue")
    args = parser.parse_args()
    missing = set(OPTIMIZERS) - set(OPTIMIZER_SETTINGS)
    if missing:
        raise SystemExit(f"no benchmark setting for optimizers {sorted(missing)}")
    rows = []
    jobs = [
        ("optimizer", name, {"client-optimizer": name, "client-lr": lr, **extra})
        for name, (lr, extra) in OPTIMIZER_SETTINGS.items()
    ] + [
        ("norm", name, {"norm": name, "norm-warmup": 200})
        for name, e in sorted(NORMS.items())
        if "last" in e.layouts
    ]
    for kind, name, keys in jobs:
        row = {"kind": kind, "name": name, "keys": keys}
        for dp in (False, True):
            row["dp" if dp else "no_dp"] = run(keys, args.rounds, dp)
        rows.append(row)
        print(
            f"{kind:9s} {name:12s} no DP {row['no_dp']['accuracy']:.3f}"
            f" ({row['no_dp']['seconds']:.1f} s) | DP {row['dp']['accuracy']:.3f}"
            f" ({row['dp']['seconds']:.1f} s, eps {row['dp']['epsilon']:.2f})",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"rounds": args.rounds, "machine": platform.platform(), "python": sys.version.split()[0]}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Client optimizers and normalisation layers, synthetic task, {args.rounds} rounds",
        "",
        "`.venv/bin/python benchmarks/catalogue.py` (see its docstring for the setting).",
        "",
        "| kind | name | settings | accuracy, no DP | s | accuracy, DP (eps 8) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keys = ", ".join(f"{k}={v}" for k, v in r["keys"].items() if k not in ("norm",))
        lines.append(
            f"| {r['kind']} | `{r['name']}` | {keys} | {r['no_dp']['accuracy']:.3f} |"
            f" {r['no_dp']['seconds']:.1f} | {r['dp']['accuracy']:.3f} | {r['dp']['seconds']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
