"""What the benchmarks promise about themselves (they are not run here: speed lives in them, never
in tests): federated_speed.py quotes its plain PyTorch loop verbatim, and that loop and the
hand-written torch.func loop import nothing from dpfl and train the same users alike."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from tests.support.flower_local import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(BENCHMARKS))
    import federated_speed

    yield federated_speed
    sys.path.remove(str(BENCHMARKS))


def test_the_docstring_quotes_the_plain_loop_verbatim(speed):
    source = inspect.getsource(speed.plain_round).strip("\n")
    quoted = "\n".join(("    " + line) if line else "" for line in source.splitlines())
    assert quoted in speed.__doc__


def test_the_plain_loops_import_nothing_from_dpfl(tmp_path, speed):
    # data written by the parent (with dpfl); the loops themselves run in a process that fails
    # on any import of dpfl
    data = tmp_path / "toy.pt"
    torch.manual_seed(0)
    users = [(torch.randn(12, 32), torch.randint(0, 10, (12,))) for _ in range(20)]
    torch.save({"x": [u[0] for u in users], "y": [u[1] for u in users],
                "test": (torch.randn(30, 32), torch.randint(0, 10, (30,)))}, data)  # fmt: skip
    work = {**speed.PLAIN_WORKLOADS["toy-mlp"], "cohort-size": 6.0}
    code = f"""
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "dpfl" or name.startswith("dpfl."):
            raise ImportError("the plain loop imported " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(BENCHMARKS)!r})
import federated_speed as fs
spec = {{"workload": "toy-mlp", "work": json.loads(sys.argv[1]), "rounds": 2, "data": sys.argv[2]}}
out = {{}}
for name, step in (("plain", fs.plain_round), ("func", fs.func_round)):
    out[name] = fs.plain_child(spec, step)
print(json.dumps(out))
"""
    import json

    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(work), str(data)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    times = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(times["plain"]) == len(times["func"]) == 2


def test_the_two_loops_compute_the_same_round(speed):
    """The hand-written torch.func loop is the vectorised form of the plain loop: one round from
    the same weights on the same users gives the same model."""
    torch.manual_seed(1)
    users = [(torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))) for n in (5, 9, 7, 8)]
    work = {**speed.PLAIN_WORKLOADS["conv-net"], "noise-multiplier": 0.0}
    model = speed.plain_model("conv-net")
    start = [p.detach().clone() for p in model.parameters()]
    out = {}
    for name, step in (("plain", speed.plain_round), ("func", speed.func_round)):
        weights = [w.clone() for w in start]
        step(model, weights, users, [0, 1, 2, 3], work, torch.Generator().manual_seed(0))
        out[name] = weights
    for a, b in zip(out["plain"], out["func"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert any((a - s).abs().max() > 1e-3 for a, s in zip(out["plain"], start, strict=True))
