"""The server process is killed mid-run (SIGKILL) and restarted from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DPFL = [sys.executable, "-m", "dpfl.cli", "simulate", "--quiet"]
KEYS = [
    "--population", "1000", "--cohort-size", "100", "--rounds", "10", "--examples-per-user",
    "30", "--noise-multiplier", "0.7", "--target-epsilon", "0", "--delta", "1e-5",
    "--diagnostics", "false", "--eval-every", "5",
]  # fmt: skip


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line).get("round", 0) > 0)


def kill_after(run_dir: Path, extra: list[str], rounds: int) -> int:
    """Start a run, SIGKILL it once ``rounds`` rounds are in its metrics; rounds it had done."""
    proc = subprocess.Popen([*DPFL, *KEYS, *extra, "--run-dir", str(run_dir)])
    try:
        deadline = time.monotonic() + 300
        while rounds_done(run_dir) < rounds:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
            if time.monotonic() > deadline:
                pytest.fail("the run made no progress")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return rounds_done(run_dir)


def finish(run_dir: Path, extra: list[str], resume: bool) -> dict:
    cmd = [*DPFL, *KEYS, *extra, "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_reproducible_mode_resumes_to_the_same_model_and_epsilon(tmp_path):
    extra = ["--noise-seed", "3", "--sampling-seed", "8", "--checkpoint-every", "2"]
    reference = finish(tmp_path / "ref", extra, resume=False)
    killed_at = kill_after(tmp_path / "run", extra, 5)
    assert 5 <= killed_at < 10
    resumed = finish(tmp_path / "run", extra, resume=True)
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["privacy"]["epsilon"] == reference["privacy"]["epsilon"]
    assert resumed["final"] == reference["final"]


def test_secure_mode_charges_the_rounds_replayed_after_a_crash(tmp_path):
    extra = ["--checkpoint-every", "3"]
    killed_at = kill_after(tmp_path / "run", extra, 4)
    replayed = killed_at - 3 * (killed_at // 3)
    resumed = finish(tmp_path / "run", extra, resume=True)
    reference = finish(tmp_path / "ref", extra, resume=False)
    e_resumed = resumed["privacy"]["epsilon"]["rdp"]["epsilon"]
    e_reference = reference["privacy"]["epsilon"]["rdp"]["epsilon"]
    if replayed:
        assert e_resumed > e_reference
        assert f"T={10 + replayed}" in resumed["privacy"]["text"]
    else:
        assert e_resumed == e_reference


def test_a_truncated_checkpoint_is_reported_not_loaded(tmp_path):
    extra = ["--checkpoint-every", "2", "--noise-seed", "1"]
    kill_after(tmp_path / "run", extra, 3)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    cmd = [*DPFL, *KEYS, *extra, "--run-dir", str(tmp_path / "run"), "--resume"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0
    assert "corrupt or truncated" in out.stderr and "refusing to load" in out.stderr
