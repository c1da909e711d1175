"""The toy-mlp speed workload run in pfl-research (Apple's ``pfl`` package), for comparison with
dpfl's simulator in benchmarks/federated_speed.py, which imports :func:`run_pfl` from here.

The pfl virtual environment
---------------------------
``pfl`` pins ``dp-accounting<0.6`` and dpfl needs 0.6, so pfl cannot be installed into dpfl's
venv. :func:`ensure_pfl_venv` makes a separate venv (default ``.bench/pfl-venv``, git-ignored):

1. ``python -m venv`` from the interpreter running this file (dpfl's venv, so the same base
   Python: compiled packages shared below must match its ABI).
2. ``pip install pfl==<PFL_VERSION>`` *without* the ``[pytorch]`` extra, so pip installs pfl's own
   dependencies only (dp-accounting 0.5.x, absl-py 1.x, prv-accountant, multiprocess, scipy,
   ...), with numpy and scipy pinned to the versions in dpfl's venv (the torch imported in the
   pfl venv then runs against the numpy it runs against in dpfl's venv). The ``[pytorch]`` extra
   would reinstall torch (minutes, gigabytes) although pfl accepts any ``torch>=2.0.1,<3``.
3. Only after pip has finished, a file ``zzz_dpfl_shared_torch.pth`` in the pfl venv's
   site-packages names dpfl's site-packages (where torch lives). ``site`` appends a path from a
   ``.pth`` file *after* the venv's own site-packages, so every package the pfl venv has
   (dp-accounting 0.5, numpy, ...) wins and only what it lacks (torch and its dependencies) is
   found in dpfl's venv; nested ``.pth`` files there (dpfl's editable install) are not run, so
   dpfl itself is not importable in the pfl venv. The ``.pth`` file is written after pip on
   purpose: a pip that could see dpfl's site-packages would "upgrade" dp-accounting by
   uninstalling dpfl's copy.
4. A check in the new venv imports dp_accounting, pfl, torch and numpy, requires dp-accounting and
   pfl from the pfl venv, torch from dpfl's venv, and torch's version within pfl's own
   requirement for its ``[pytorch]`` extra; it then writes a marker file recording the versions.
   A venv without the marker (an interrupted build) is deleted and rebuilt; a lock file keeps
   two benchmarks from building it at once. Delete ``.bench/pfl-venv`` to force a rebuild.

The workload in pfl
-------------------
The child script (:data:`CHILD`, run by the pfl venv's python; it does not import dpfl) uses pfl's
in-process simulation: ``FederatedDataset`` over users held in memory, ``FederatedAveraging``
with ``SimulatedBackend``, ``PyTorchModel`` (MLP with ReLU; local ``torch.optim.SGD``; central
``torch.optim.SGD`` at the server learning rate, which pfl applies to the averaged model delta
as a negative gradient), and user-level central DP as
``CentrallyAppliedPrivacyMechanism(GaussianMechanism(C, z))``: each user's model delta is clipped
to l2 norm C (flat, all layers together), the clipped deltas are summed, Gaussian noise of std
z*C is added to the sum, and FedAvg divides by the summed weights (1 per user), i.e. by the
cohort size. A central evaluation callback evaluates the model on the test set after every
round, as dpfl does with eval-every 1. Data are dpfl's own: the parent generates every user of
``dpfl.data.SyntheticClassification`` and its test set and writes them to an .npz.

What is timed: the child's per-round time is the wall time between consecutive calls of a
callback placed after the evaluation callback, i.e. one full iteration of pfl's training loop
(cohort sampling, local training of the cohort, clipping, summing, noise, server update, test
evaluation). The median is over rounds 2..N: round 1 also evaluates every user's local model
before and after training (pfl's ``do_evaluation`` is always on in iteration 0) and includes
warm-up. Start-up (imports, data loading, the evaluation before training) is excluded. Peak RSS
is the child's ``ru_maxrss``.

Differences from dpfl's workload, all small for a speed comparison: the cohort is exactly 50
users drawn uniformly without replacement each round (dpfl: Poisson sampling with rate 0.05,
mean 50, noisy sum divided by the expected 50); no privacy accounting runs (the noise multiplier
is fixed and dpfl's target-epsilon is 0, so neither stops early); user data are preloaded
tensors (dpfl generates a sampled user's data on demand inside the round); pfl computes its own
per-user metrics (norms, clipping fractions) inside the round, which is part of its cost.

Not a test; CI does not run it. Usage:
    .venv/bin/python benchmarks/pfl_research.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PFL_VERSION = "0.6.0"
"""The pfl release this benchmark was written against (its API is read from that source)."""
MARKER = ".dpfl-bench-ready"
PTH_NAME = "zzz_dpfl_shared_torch.pth"

# Runs in the new venv after the .pth file is in place; prints what is actually imported.
CHECK = r"""
import importlib.metadata as md, json, sys
from pathlib import Path
import dp_accounting, numpy, pfl, torch
from packaging.requirements import Requirement
from packaging.version import Version
venv, shared = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
info = {
    "pfl": md.version("pfl"), "dp_accounting": md.version("dp-accounting"),
    "torch": torch.__version__, "numpy": numpy.__version__,
    "files": {m.__name__: m.__file__ for m in (pfl, dp_accounting, torch, numpy)},
}
problems = []
for mod in (pfl, dp_accounting, numpy):
    if not Path(mod.__file__).resolve().is_relative_to(venv):
        problems.append(f"{mod.__name__} is not imported from {venv}: {mod.__file__}")
if not Path(torch.__file__).resolve().is_relative_to(shared):
    problems.append(f"torch is not imported from {shared}: {torch.__file__}")
for line in md.requires("pfl") or []:
    req = Requirement(line)
    if req.name in ("dp-accounting", "torch") and not req.specifier.contains(
        Version(info["torch" if req.name == "torch" else "dp_accounting"]), prereleases=True
    ):
        problems.append(f"pfl requires {line}, got {info[req.name.replace('-', '_')]}")
info["problems"] = problems
print(json.dumps(info))
"""

CHILD = r'''
"""The toy-mlp workload in pfl's simulator; argv: data.npz, JSON config. Prints one JSON line."""
import json, resource, statistics, sys, time

t_start = time.perf_counter()
import numpy as np
import torch
from torch import nn

import pfl
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.callback.central_evaluation import CentralEvaluationCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

cfg = json.loads(sys.argv[2])
np.random.seed(cfg["seed"])  # pfl draws its central seeds (DP noise, ...) from numpy
torch.manual_seed(cfg["seed"])  # the initial model and the local shuffles

with np.load(sys.argv[1]) as f:
    X, Y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])  # [users, examples, ...]
    test = Dataset((torch.from_numpy(f["test_x"]), torch.from_numpy(f["test_y"])))
num_users, per_user = Y.shape


class MLP(nn.Sequential):
    """Linear layers with ReLU between them, plus the loss/metrics methods pfl calls."""

    def __init__(self, sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)

    def loss(self, x, y):
        self.train()
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y):
        self.eval()
        logits = self(x)
        n = len(y)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(dim=1) == y).sum().item()
        return {"loss": Weighted(loss, n), "accuracy": Weighted(correct, n)}


class CohortSampler:
    """pfl calls a user sampler once per cohort member; this hands out, round after round,
    ``cohort`` distinct users drawn uniformly without replacement from the population."""

    def __init__(self, num_users, cohort, seed):
        self.rng, self.num_users, self.cohort, self.pending = (
            np.random.default_rng(seed), num_users, cohort, [])

    def __call__(self):
        if not self.pending:
            self.pending = self.rng.choice(self.num_users, self.cohort, replace=False).tolist()
        return self.pending.pop()


shuffle = torch.Generator().manual_seed(cfg["seed"] + 1)


def make_user(user):
    # a fresh order every time the user is sampled, like dpfl's shuffled epoch
    perm = torch.randperm(per_user, generator=shuffle)
    return Dataset((X[user][perm], Y[user][perm]), user_id=user)


class RoundTimer(TrainingProcessCallback):
    """Wall time between consecutive ends of pfl's central iterations."""

    def on_train_begin(self, *, model):
        self.laps, self.t = [], time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        self.laps.append(now - self.t)
        self.t = now
        return False, Metrics()


cohort = cfg["cohort"]
train_data = FederatedDataset(make_user, CohortSampler(num_users, cohort, cfg["seed"]))
mechanism = CentrallyAppliedPrivacyMechanism(
    GaussianMechanism(clipping_bound=cfg["clip"], relative_noise_stddev=cfg["noise"])
)
backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[mechanism])
net = MLP(cfg["sizes"])
model = PyTorchModel(
    model=net,
    local_optimizer_create=torch.optim.SGD,
    central_optimizer=torch.optim.SGD(net.parameters(), lr=cfg["server_lr"]),
)
eval_params = NNEvalHyperParams(local_batch_size=4096)
timer = RoundTimer()
t_train = time.perf_counter()
FederatedAveraging().run(
    algorithm_params=NNAlgorithmParams(
        central_num_iterations=cfg["rounds"],
        # per-user evaluation before/after local training: only in iteration 0 (unavoidable)
        evaluation_frequency=cfg["rounds"] + 1,
        train_cohort_size=cohort,
        val_cohort_size=None,
    ),
    backend=backend,
    model=model,
    model_train_params=NNTrainHyperParams(
        local_num_epochs=cfg["epochs"],
        local_learning_rate=cfg["client_lr"],
        local_batch_size=cfg["batch"],
    ),
    model_eval_params=eval_params,
    callbacks=[CentralEvaluationCallback(test, model_eval_params=eval_params), timer],
    send_metrics_to_platform=False,  # pfl would print ~30 metric lines per round to stdout
)
t_end = time.perf_counter()
final = model.evaluate(test, eval_params=eval_params)  # the model the last round evaluated
final = {str(k): v.overall_value for k, v in final}
round_ms = [s * 1000 for s in timer.laps]
print(json.dumps({
    "pfl_version": pfl.__version__,
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "round_ms": round_ms,
    "median_ms": statistics.median(round_ms[1:] or round_ms),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "accuracy": final["accuracy"],
    "loss": final["loss"],
    "startup_s": t_train - t_start,
    "train_s": t_end - t_train,
}))
'''


def _clean_env() -> dict[str, str]:
    """The environment for the pfl venv's python: nothing that would add dpfl's paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _shared_site_packages() -> Path:
    """dpfl's site-packages: the folder torch is imported from in this interpreter."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SystemExit("torch is not installed in this interpreter; run with dpfl's .venv")
    return Path(spec.origin).resolve().parent.parent


def _run(cmd: list, what: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    if res.returncode != 0:
        raise SystemExit(
            f"{what} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        )
    return res


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(python), "-c", code], "locating the pfl venv").stdout.strip())


def _build(path: Path, shared: Path) -> dict:
    _run([sys.executable, "-m", "venv", str(path)], "python -m venv")
    python = _python(path)
    pins = [
        f"{name}=={importlib.metadata.version(name)}"
        for name in ("numpy", "scipy")
        if importlib.util.find_spec(name) is not None
    ]
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    res = subprocess.run(
        [*pip, f"pfl=={PFL_VERSION}", *pins], capture_output=True, text=True, env=_clean_env()
    )
    if res.returncode != 0:  # the pins conflict with pfl's requirements: let pip choose
        print(f"pip could not install pfl with {pins}; retrying unpinned", file=sys.stderr)
        _run([*pip, f"pfl=={PFL_VERSION}"], "pip install pfl")
    (_site_packages(python) / PTH_NAME).write_text(f"{shared}\n")
    res = _run([str(python), "-c", CHECK, str(path), str(shared)], "importing pfl in its venv")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if info["problems"]:
        raise SystemExit("the pfl venv is not usable:\n  " + "\n  ".join(info["problems"]))
    return info


def ensure_pfl_venv(path: Path = ROOT / ".bench/pfl-venv") -> Path:
    """Create the pfl venv at ``path`` if it is not there (see the module docstring) and return
    its python. Safe to call concurrently and after an interrupted build."""
    path = Path(path).absolute()
    shared = _shared_site_packages()
    wanted = {
        "pfl": PFL_VERSION,
        "shared": str(shared),
        "shared_torch": importlib.metadata.version("torch"),
        "python": sys.version.split()[0],
    }
    marker = path / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            with contextlib.suppress(ValueError):
                if {k: json.loads(marker.read_text()).get(k) for k in wanted} == wanted:
                    return _python(path)
        if path.exists():
            if not (path / "pyvenv.cfg").exists():
                raise SystemExit(f"{path} exists and is not a venv; refusing to replace it")
            shutil.rmtree(path)  # an interrupted build or one for another pfl/torch
        try:
            info = _build(path, shared)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        marker.write_text(json.dumps({**wanted, **info}, indent=1) + "\n")
    return _python(path)


def write_data(workload: dict, out: Path) -> Path:
    """dpfl's synthetic users and test set, as arrays x [users, examples, features], y [users,
    examples], test_x, test_y."""
    import numpy as np

    from dpfl.data import SyntheticClassification

    ds = SyntheticClassification(
        num_users=workload["population"],
        examples_per_user=workload["examples-per-user"],
        features=32,
        classes=10,
        seed=workload["seed"],
    )
    users = [ds.user_data(u).tensors for u in range(ds.num_users)]
    test = ds.test_data().tensors
    np.savez(
        out,
        x=np.stack([u["x"].numpy() for u in users]).astype(np.float32),
        y=np.stack([u["y"].numpy() for u in users]).astype(np.int64),
        test_x=test["x"].numpy().astype(np.float32),
        test_y=test["y"].numpy().astype(np.int64),
    )
    return out


def child_config(workload: dict, rounds: int) -> dict:
    for key, supported in (
        ("client-optimizer", "sgd"),
        ("server-optimizer", "sgd"),
        ("clip-scheme", "flat"),
    ):
        if workload.get(key, supported) != supported:
            raise SystemExit(f"the pfl comparison supports {key}={supported} only")
    hidden = [int(h) for h in str(workload.get("hidden", "64")).split(",") if h.strip()]
    return {
        "rounds": rounds,
        "sizes": [32, *hidden, 10],
        "cohort": round(workload["cohort-size"]),
        "epochs": workload.get("local-epochs", 1),
        "batch": workload["batch-size"],
        "client_lr": workload["client-lr"],
        "clip": workload["clip-norm"],
        "noise": workload["noise-multiplier"],
        "server_lr": workload["server-lr"],
        "seed": workload["seed"],
    }


def run_pfl(workload: dict, rounds: int, workdir: Path) -> dict:
    """Run ``workload`` (federated_speed.WORKLOAD) for ``rounds`` rounds in pfl. wall_s is the
    child process alone (start-up, data loading, training, evaluation), not the venv build or
    the data export."""
    python = ensure_pfl_venv()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_data(workload, workdir / "pfl-data.npz")
    script = workdir / "pfl_child.py"
    script.write_text(CHILD)
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(python), str(script), str(data), json.dumps(child_config(workload, rounds))],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"pfl run failed:\n{res.stderr[-3000:]}")
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        raise SystemExit(f"pfl run printed no result:\n{tail}") from None
    return {
        "median_ms": out["median_ms"],
        "peak_rss_mb": out["peak_rss_mb"],
        "accuracy": out["accuracy"],
        "wall_s": wall,
        "version": out["pfl_version"] or PFL_VERSION,
    }


def main() -> None:
    from federated_speed import WORKLOAD  # benchmarks/ is on sys.path when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    t0 = time.perf_counter()
    python = ensure_pfl_venv()
    print(f"pfl venv: {python} (ready in {time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_pfl(WORKLOAD, args.rounds, Path(tmp))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
