"""Scale-out with torchrun (gloo on CPU): N ranks train shares of each cohort, sum with an
all-reduce, share one noise draw, and end with the model of a single process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpfl.engines.torchrun import balanced_shares

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
    seeds = {"noise-seed": 7, "sampling-seed": 3, "diagnostics": "true"}
    one = run(tmp_path / "one", 1, **extra, **seeds)
    two = run(tmp_path / "two", 2, **extra, **seeds)
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert_same_model(tmp_path / "one", tmp_path / "two")
    keys = ("diag_accepted", "diag_rejected", "diag_dropped", "diag_timed_out", "diag_failed",
            "diag_cohort", "epsilon_rdp")  # fmt: skip
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert {k: m1.get(k) for k in keys} == {k: m2.get(k) for k in keys}
        if "diag_update_norm_mean" in m1:
            assert m2["diag_update_norm_mean"] == pytest.approx(m1["diag_update_norm_mean"])
    if "sim-dropout-rate" in extra:
        assert sum(m.get("diag_dropped", 0) for m in metrics(tmp_path / "two")) > 0
        assert sum(m.get("diag_timed_out", 0) for m in metrics(tmp_path / "two")) > 0
    assert two["final"]["accuracy"] == pytest.approx(one["final"]["accuracy"], abs=1e-3)
    assert two["privacy"]["epsilon"] == one["privacy"]["epsilon"]


CHECK = """
import sys
import torch, torch.distributed as dist
from dpfl.engines.torchrun import Group
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


RESUME = """
import json, sys
import torch.distributed as dist
from dpfl.config import RunConfig
from dpfl.simulation import simulate
from dpfl.loop import run as runs

dist.init_process_group("gloo")  # one group for both runs of this process
values = json.loads(sys.argv[1])
cfg = RunConfig.from_mapping(values)
simulate(cfg, progress=False, stop_after_round=3)  # checkpoint at 2: round 3 is replayed
ledgers = []
real = runs.FederatedRun._resume
def keep(self):
    real(self)
    ledgers.append(self.state.ledger.to_dict())
runs.FederatedRun._resume = keep
summary = simulate(cfg, progress=False, resume=True)
with open(f"{cfg.run_dir}/ledger{dist.get_rank()}.json", "w") as fh:
    json.dump(ledgers[0], fh)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_secure_torchrun_resume_shares_rank_zeros_ledger_and_cohorts(tmp_path):
    """Rank 0 alone truncates the metrics and counts the replayed rounds; every rank takes its
    ledger (they used to read the file while rank 0 rewrote it, and could disagree and hang).
    Cohorts come from rank 0's secret key: every sampled client is trained by some rank."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    values = {**SMALL, "rounds": 4, "checkpoint-every": 2, "diagnostics": True,
              "run-dir": str(tmp_path / "run")}  # fmt: skip
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(script)]
    res = subprocess.run([*cmd, json.dumps(values)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ledgers = [json.loads((tmp_path / "run" / f"ledger{r}.json").read_text()) for r in (0, 1)]
    assert ledgers[0] == ledgers[1]
    assert sum(s["steps"] for s in ledgers[0]["segments"]) == 3  # 2 kept + 1 replayed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["rounds_charged"] == 5 and summary["rounds_run"] == 4
    rows = [r for r in metrics(tmp_path / "run") if r.get("round", 0) > 0]
    assert rows and all(r["diag_accepted"] == r["diag_cohort"] for r in rows)
