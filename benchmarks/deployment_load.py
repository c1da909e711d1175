"""Load on a real deployment: one SuperLink and N SuperNodes on loopback, R rounds of dpfl.

Starts `flower-superlink` (TLS with test-only certificates from scripts/make_test_certs.py) and
N `flower-supernode` processes (one user each), runs `flwr run` with every user in every round
(q = 1), and reports: rounds completed, replies accepted per round against those expected (no
lost replies), wall time per round (from the run's metrics), the whole run's wall time, and the
peak memory (PSS) of all Flower processes together (SuperLink, SuperNodes, SuperExecs and the
per-message ClientApp processes; sampled every 0.5 s from /proc).

Not a test; CI does not run it. Usage (about 3 minutes for 24 nodes on 2 CPU cores):
    .venv/bin/python benchmarks/deployment_load.py [--nodes 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.flower_local import (  # noqa: E402
    deployment_home,
    flwr_run,
    free_port,
    make_test_certs,
    run_status,
    superlink_command,
    supernode_command,
)


def flower_memory_mib() -> float:
    """Memory of every process whose command line mentions flower/flwr (MiB), as the sum of
    their proportional set sizes (PSS: a page shared by k processes counts 1/k to each), so the
    torch libraries mapped by every ClientApp process are not counted once per process."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"flower-" not in cmd and b"flwr" not in cmd:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dpfl-load-"))
    certs = make_test_certs(tmp / "certs")
    port = free_port()
    env = deployment_home(tmp / "flwr", "load", port, certs / "ca.crt")
    procs: list[subprocess.Popen] = []
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], flower_memory_mib())
            time.sleep(0.5)

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=open(tmp / log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(p)
        return p

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_start = time.perf_counter()
    try:
        start(superlink_command(port, certs), "superlink.log")
        deadline = time.monotonic() + 120
        while "Uvicorn running on https" not in (tmp / "superlink.log").read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the SuperLink did not start")
            time.sleep(0.5)
        for i in range(args.nodes):
            start(supernode_command(port, i, args.nodes, certs / "ca.crt"), f"supernode-{i}.log")
        idle = flower_memory_mib()
        t_run = time.perf_counter()
        run_dir = tmp / "run"
        values = {
            "diagnostics": True,  # lost replies are read from the exact counts (diag_*)
            "population": args.nodes,
            "cohort-size": float(args.nodes),
            "rounds": args.rounds,
            "target-epsilon": 0.0,
            "noise-multiplier": 1.0,
            "round-timeout": 600.0,
            "eval-every": args.rounds,
            "run-dir": str(run_dir),
        }
        res = flwr_run("load", values, env, timeout=1800)
        run_seconds = time.perf_counter() - t_run
        status = [r["status"] for r in run_status(env, "load")]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    rounds = [r for r in rows if r.get("round", 0) > 0]
    result = {
        "nodes": args.nodes,
        "rounds_completed": len(rounds),
        "flwr_run_rc": res.returncode,
        "status": status,
        "accepted_per_round": [r["diag_accepted"] for r in rounds],
        "expected_per_round": [r["diag_cohort"] for r in rounds],
        "lost_replies": sum(r["diag_cohort"] - r["diag_accepted"] for r in rounds),
        "round_seconds": [round(r["seconds"], 2) for r in rounds],
        "run_wall_seconds": round(run_seconds, 1),
        "total_wall_seconds": round(time.perf_counter() - t_start, 1),
        "flower_pss_mib_idle": round(idle, 1),
        "flower_pss_mib_peak": round(peak[0], 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = res.returncode == 0 and status == ["finished:completed"] and result["lost_replies"] == 0
    print("OK: no lost replies" if ok else f"FAILED (logs in {tmp})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
