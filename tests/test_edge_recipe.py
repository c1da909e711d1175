"""README.md's "Deploy clients on edge GPUs" runs as written: every fenced ``bash`` block between
the ``edge-recipe`` markers, read from README.md itself, in order, on loopback (CPU). The first
block holds the settings (only ``export`` lines): it runs before every other block, and the test
changes what the README lets it change only through the variables it defines there (a scratch
folder, free ports). Blocks marked ``edge-recipe:background`` (SuperLink, SuperNodes) start in
their own process group and are stopped at the end, with everything they started.

The recipe's secured SuperLink then also shows what it refuses: a SuperNode whose key was never
registered is refused and gives up, and a SuperNode given a root certificate that did not sign
the SuperLink's cannot connect. (Which users a registry binds to which authenticated nodes, and
a registered user whose node never connects, are tested against the strategy in
tests/flower/test_strategy.py, without a deployment.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.flower_local import (
    BIN,
    ROOT,
    descendants,
    free_port,
    make_test_certs,
    run_status,
    supernode_command,
)

pytestmark = pytest.mark.slow

BEGIN, END = "<!-- edge-recipe:begin -->", "<!-- edge-recipe:end -->"
BLOCK = re.compile(
    r'(?:<!-- edge-recipe:background ready="(?P<ready>[^"]+)" -->\s*)?```bash\n(?P<body>.*?)```',
    re.S,
)


def recipe_blocks() -> list[tuple[str, str | None]]:
    """(script, readiness text or None for a foreground command) in README order."""
    text = (ROOT / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "edge-recipe markers"
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    return [(m["body"], m["ready"]) for m in BLOCK.finditer(section)]


class Background:
    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []

    def start(self, script: str, env: dict, ready: str, timeout: float = 120) -> None:
        log = self.logs / f"background-{len(self.procs)}.log"
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"background command exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {ready!r} after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        pids = [p for proc in self.procs for p in [proc.pid, *descendants(proc.pid)]]
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def background(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    bg = Background(logs)
    yield bg
    bg.stop()


def test_the_readme_edge_recipe_runs_as_written(tmp_path, background):
    blocks = recipe_blocks()
    settings, ready = blocks[0]
    assert ready is None
    lines = [x for x in settings.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    assert lines and all(x.startswith("export ") for x in lines), "settings: exports only"
    defined = set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", settings))
    overrides = {
        "DPFL_DEPLOY": str(tmp_path / "deploy"),
        "SUPERLINK_PORT": str(free_port()),
        "NODE0_PORT": str(free_port()),
        "NODE1_PORT": str(free_port()),
    }
    assert set(overrides) <= defined, "the test may only set variables the README defines"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(overrides)

    # every step of the recipe is there
    scripts = "\n".join(body for body, _ in blocks[1:])
    for step in (
        "make setup",
        "scripts/make_test_certs.py",
        "flower-superlink",
        "--enable-supernode-auth",
        "flwr supernode register",
        "--auth-supernode-private-key",
        "--root-certificates",
        "--node-config",
        "flwr run . edge",
        "dpfl report",
    ):
        assert step in scripts, f"the README recipe lost its step {step!r}"
    assert scripts.count("flower-supernode ") == 2

    outputs = []
    for body, ready in blocks[1:]:
        script = settings + "\n" + body
        if ready is not None:
            background.start(script, env, ready)
            continue
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, (body, res.stdout[-3000:], res.stderr[-3000:])
        outputs.append(res.stdout)
    assert len(outputs) + len(background.procs) == len(blocks) - 1 and len(background.procs) == 3

    # the run finished, trained both users every round, and the devices reported
    deploy = Path(overrides["DPFL_DEPLOY"])
    flwr_env = {**env, "FLWR_HOME": str(deploy / "flwr")}
    assert [r["status"] for r in run_status(flwr_env, "edge")] == ["finished:completed"]
    run_dir = deploy / "runs" / "edge"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("round", 0) > 0]
    assert [r["diag_accepted"] for r in rounds] == [2, 2, 2]
    assert all(r["diag_rejected"] == 0 and r["diag_sys_steps_per_second_min"] > 0 for r in rounds)
    assert all(
        r["diag_sys_clients_cuda"] == 0 and r["diag_sys_peak_memory_mb_max"] > 0 for r in rounds
    )
    # the report states the epsilon spent, within the default target of 8
    report = outputs[-1]
    match = re.search(r"epsilon \(actual.*\n\s+([0-9.e+-]+) under rdp", report)
    assert match, report
    assert 0 < float(match[1]) <= 8.0 * (1 + 1e-6)
    assert "diag_sys_steps_per_second_mean" in report  # the tail of metrics.jsonl

    # what the secured SuperLink refuses: an unregistered key, and a node that distrusts it
    certs, other = deploy / "certs", make_test_certs(tmp_path / "other-certs", nodes=1)
    port = int(overrides["SUPERLINK_PORT"])
    refused = {
        "unregistered": supernode_command(
            port, 0, 2, certs / "ca.crt", other / "node-0.key", max_retries=2
        ),
        "wrong-ca": supernode_command(
            port, 1, 2, certs / "wrong-ca.crt", certs / "node-1.key", max_retries=2
        ),
    }
    node_env = {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}  # as the recipe's exports
    procs = {
        name: subprocess.Popen(
            cmd,
            env=node_env,
            stdout=open(tmp_path / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        for name, cmd in refused.items()
    }
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=120) != 0, name
        assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "wrong-ca.log").read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
