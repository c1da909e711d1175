"""``dpfl new DIR``: a Flower app project for the user's own model and data, ready to run three
ways (in process, Flower's simulation, a deployment)."""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path

from dpfl.cli.common import CliError

# The run both ways (run.toml for dpfl simulate, [tool.flwr.app.config] for flwr run) holds the
# same keys: a small user-level DP run with a budget.
RUN_KEYS = """rounds = 20
cohort-size = 5.0
clip-norm = 0.5
clip-scheme = "flat"
target-epsilon = 8.0
local-epochs = 1
batch-size = 16
client-lr = 0.1
server-optimizer = "adam"
server-lr = 0.01
eval-every = 5
checkpoint-every = 5
# "distributed": each client adds its share of the noise and the server learns only the sum
# (SecAgg+ under Flower); every released sum carries >= min-contributors shares (0: half the cohort)
dp-mode = "central"
sum-bits = 20
min-contributors = 0
"""

PYPROJECT = """# A dpfl app for Flower: `flwr run . <connection>` runs dpfl's ServerApp and
# ClientApp with your task and data ({pkg}/task.py), named by import path in the run config.
[build-system]
requires = ["setuptools>=77,<82"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "User-level DP federated learning with dpfl"
requires-python = ">=3.11,<3.13"
dependencies = ["dpfl"]

[tool.setuptools]
packages = ["{pkg}"]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "dpfl.flower:server_app"
clientapp = "dpfl.flower:client_app"

[tool.flwr.app.config]
task = "{pkg}.task:make_task"
data = "{pkg}.task:make_data"
# The ServerApp writes here: give an absolute path (it runs on the SuperLink's machine).
run-dir = "runs/flower"
overwrite = false
# After a crash of the ServerApp or the SuperLink: the same command with resume=true.
resume = false
{run_keys}
[tool.flwr.app.config.task-options]
users = 10
"""

RUN_TOML = """# dpfl simulate --config run.toml (from this folder): the same run as
# pyproject.toml's, in dpfl's in-process simulator.
task = "{pkg}.task:make_task"
data = "{pkg}.task:make_data"
run-dir = "runs/local"
{run_keys}
[task-options]
users = 10
"""

TASK_PY = '''"""Your model and your users' data: edit this file.

dpfl needs a task (``metric``, ``build_model()``, ``loss(model, batch)``, ``evaluate(model,
data)``) and a federated dataset (``num_users``, ``user_data(user)``, ``test_data()``); no base
class. ``make_data`` takes ``user``: on a SuperNode it is called with the node's user and builds
only that user's data; without it (the server, the in-process simulator) it builds the dataset
whose users are made when first asked for.

The data here is synthetic (a mixture of Gaussians, each user holding a few classes): replace
``_examples`` with your users' data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpfl import TensorData

FEATURES, CLASSES = 16, 4


class Classifier(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Task:
    metric = "accuracy"

    def __init__(self, hidden: int = 32) -> None:
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        return Classifier(self.hidden)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])  # the mean over the batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorData) -> dict[str, float]:
        model.eval()
        logits = model(data.tensors["x"])
        model.train()
        y = data.tensors["y"]
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
        }


def _examples(rng: np.random.Generator, n: int, classes: np.ndarray) -> TensorData:
    centres = np.random.default_rng(0).normal(size=(CLASSES, FEATURES))
    y = rng.choice(classes, size=n)
    x = centres[y] + rng.normal(scale=1.5, size=(n, FEATURES))
    return TensorData({"x": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(y)})


class Users:
    """``users`` users of ``examples`` examples each, made from (seed, user) when asked for;
    ``only``: the one user this node holds (asking for another is an error)."""

    def __init__(self, users: int, examples: int, seed: int, only: int | None = None) -> None:
        self.num_users, self.examples, self.seed, self.only = users, examples, seed, only

    def user_data(self, user: int) -> TensorData:
        if not 0 <= user < self.num_users:
            raise IndexError(f"user {user} is not in the population of {self.num_users}")
        if self.only is not None and user != self.only:
            raise ValueError(f"this node holds user {self.only}, not user {user}")
        rng = np.random.default_rng([self.seed, user])
        classes = rng.choice(CLASSES, size=2, replace=False)  # each user holds two classes
        return _examples(rng, self.examples, classes)

    def test_data(self) -> TensorData:
        return _examples(np.random.default_rng([self.seed, 1 << 30]), 500, np.arange(CLASSES))


def make_task(hidden: int = 32) -> Task:
    return Task(hidden)


def make_data(users: int = 10, examples: int = 40, seed: int = 0, user: int | None = None) -> Users:
    return Users(users, examples, seed, only=user)
'''

README = """# {name}

User-level differentially private federated learning of your own model with
[dpfl](https://pypi.org/project/dpfl/): `{pkg}/task.py` holds the model and the users' data
(edit it), `run.toml` and `pyproject.toml` the same run (20 rounds, 5 users per round of 10,
per-user clipping at 0.5, a budget of ε = 8).

## 1. In process (dpfl's simulator)

```bash
dpfl simulate --config run.toml          # from this folder; writes runs/local
dpfl report runs/local                   # the (ε, δ) statement and plots
```

## 2. Flower's simulation engine (one virtual SuperNode per user)

```bash
mkdir -p .flwr
printf '[superlink]\\ndefault = "local"\\n' > .flwr/config.toml
printf '[superlink.local]\\naddress = ":local:"\\n' >> .flwr/config.toml
FLWR_HOME=$PWD/.flwr flwr run . local --stream \\
    --federation-config "num-supernodes=10" --run-config "run-dir='$PWD/runs/flower'"
```

`num-supernodes` must equal `task-options.users` (one user per node). `flwr run` leaves its
local SuperLink running in the background; stop it when done.

## 3. A deployment on SuperNodes, with TLS and node authentication

On the server (certificates from your CA; dpfl's README has a script for test ones), the
SuperLink keeps its state in a database file, so a restart continues where it stopped:

```bash
flower-superlink --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.crt \\
    --ssl-keyfile certs/server.key --enable-supernode-auth --database superlink.db
# $FLWR_HOME/config.toml: [superlink.edge] address = "SERVER:8000", root-certificates = ".../ca.crt"
flwr supernode register certs/node-0.pub edge     # once per node key
```

On each node (user `u`, its own key, its own folder for what it keeps between rounds):

```bash
flower-supernode --superlink SERVER:8000 --root-certificates certs/ca.crt \\
    --auth-supernode-private-key certs/node-u.key \\
    --node-config "partition-id=u state-dir='/var/lib/{pkg}'"
```

Then, on the server:

```bash
flwr run . edge --stream --run-config "run-dir='/srv/runs/{pkg}'"
# after a crash of the ServerApp or the SuperLink (restarted on its --database):
flwr run . edge --stream --run-config "run-dir='/srv/runs/{pkg}' resume=true"
```

A node builds only its own user's data (`make_data(..., user=u)`). Bind users to authenticated
nodes with `node-registry` (see dpfl's README).
"""


def _package_name(name: str) -> str:
    pkg = re.sub(r"\W+", "_", name.lower()).strip("_") or "app"
    if pkg[0].isdigit() or keyword.iskeyword(pkg):
        pkg = "app_" + pkg
    return pkg


def write_project(folder: str | Path, name: str | None = None) -> list[Path]:
    """Write the project into ``folder`` (created; refused when it holds anything); the files
    written."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder: choose a new one")
    name = name or folder.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"project name {name!r}: use letters, digits, '.', '_' and '-' (a Python package "
            "name is made from it)"
        )
    pkg = _package_name(name)
    values = {
        "name": name,
        "pkg": pkg,
        "publisher": re.sub(r"[^a-z0-9-]", "-", name.lower()),
        "run_keys": RUN_KEYS,
    }
    files = {
        "pyproject.toml": PYPROJECT.format(**values),
        "run.toml": RUN_TOML.format(**values),
        "README.md": README.format(**values),
        f"{pkg}/__init__.py": f'"""{name}: a dpfl app."""\n',
        f"{pkg}/task.py": TASK_PY,
    }
    written = []
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _add_new(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "new",
        help="write a Flower app project for your own model and data",
        description="Write a ready Flower app project into DIR: pyproject.toml naming dpfl's "
        "ServerApp and ClientApp and your task and data by import path, run.toml (the same run "
        "for dpfl simulate), a task.py with a small model and data function to edit, and a "
        "README with the commands to run it in process, in Flower's simulation and on "
        "SuperNodes.",
    )
    p.add_argument("dir", help="the project folder (new, or empty)")
    p.add_argument("--name", help="the project's name (default: the folder's name)")
    p.set_defaults(func=_cmd_new)


def _cmd_new(args: argparse.Namespace) -> int:
    try:
        files = write_project(args.dir, args.name)
    except ValueError as err:
        raise CliError(str(err)) from None
    for path in files:
        print(f"wrote {path}")
    print(f"next: cd {args.dir} && dpfl simulate --config run.toml (see README.md)")
    return 0
