"""Scale-out with torchrun (gloo on CPU): N ranks train shares of each cohort, sum with an
all-reduce, share one noise draw, and end with the model of a single process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpfl.simulations.distributed import balanced_shares

BIN = Path(sys.executable).parent
SMALL = {
    "population": 400,
    "cohort-size": 40,
    "rounds": 3,
    "noise-multiplier": 1.0,
    "target-epsilon": 0,
    "clip-norm": 0.5,
    "server-optimizer": "sgd",
    "server-lr": 1.0,
    "eval-every": 3,
}


def test_balanced_shares_cover_every_client_once_and_balance_the_data():
    sizes = [50, 10, 10, 40, 30, 5, 5, 60, 20, 1]
    shares = balanced_shares(sizes, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes) // 2  # greedy: well within one big client
    assert shares == balanced_shares(sizes, 3)  # every rank computes the same split
    assert balanced_shares(sizes, 1) == [list(range(len(sizes)))]
    assert balanced_shares([], 2) == [[], []]
    with pytest.raises(ValueError):
        balanced_shares(sizes, 0)


def run(run_dir: Path, ranks: int, **extra) -> dict:
    args = ["simulate", "--quiet", "--run-dir", str(run_dir)]
    for k, v in {**SMALL, **extra}.items():
        args += [f"--{k}", str(v)]
    if ranks == 1:
        cmd = [str(BIN / "dpfl"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", "-m", "dpfl"]
        cmd += args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("run folder:") == 1  # rank 0 alone reports
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(a: Path, b: Path) -> None:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=1e-5)
    assert any(not torch.equal(wa[n], torch.zeros_like(wa[n])) for n in wa)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"vectorize": "on", "clip-scheme": "flat"},
        # one by one, per-layer clipping, with drop-outs and deadline misses to merge
        {
            "vectorize": "off",
            "clip-scheme": "dim",
            "sim-dropout-rate": 0.1,
            "sim-step-seconds": 1.0,
            "sim-speed-spread": 0.5,
            "round-timeout": 6.0,
        },
    ],
    ids=["vectorised-flat", "sequential-dim-faults"],
)
def test_two_ranks_give_the_model_of_one_process(tmp_path, extra):
    one = run(tmp_path / "one", 1, **extra, **{"noise-seed": 7})
    two = run(tmp_path / "two", 2, **extra, **{"noise-seed": 7})
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert_same_model(tmp_path / "one", tmp_path / "two")
    keys = ("accepted", "rejected", "dropped", "timed_out", "failed", "cohort", "epsilon")
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert {k: m1.get(k) for k in keys} == {k: m2.get(k) for k in keys}
        if "diag_update_norm_mean" in m1:
            assert m2["diag_update_norm_mean"] == pytest.approx(m1["diag_update_norm_mean"])
    if "sim-dropout-rate" in extra:
        assert sum(m.get("dropped", 0) for m in metrics(tmp_path / "two")) > 0
        assert sum(m.get("timed_out", 0) for m in metrics(tmp_path / "two")) > 0
    assert two["final"]["accuracy"] == pytest.approx(one["final"]["accuracy"], abs=1e-3)
    assert two["privacy"]["epsilon"] == one["privacy"]["epsilon"]


CHECK = """
import sys
import torch, torch.distributed as dist
from dpfl.simulations.distributed import Group
dist.init_process_group("gloo")
g = Group(torch.device("cpu"))
same = {"w": torch.ones(3)}
g.check_same(same)
noise = g.broadcast({"w": torch.full((3,), float(g.rank))})
assert noise["w"].tolist() == [0.0, 0.0, 0.0], noise
try:
    g.check_same({"w": torch.full((3,), float(g.rank))})
except RuntimeError as err:
    with open(f"{sys.argv[1]}/rank{g.rank}.txt", "w") as fh:
        fh.write(str(err))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_with_different_models_are_detected_and_noise_comes_from_rank_zero(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(script), tmp_path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        assert "ranks ended with different models" in (tmp_path / f"rank{rank}.txt").read_text()
