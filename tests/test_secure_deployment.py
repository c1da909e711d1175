"""A secured deployment on loopback: TLS (test-only certificates from scripts/make_test_certs.py)
and SuperNode authentication. An authorised node trains; a node whose key is not registered is
refused by the SuperLink and never submits an update; a node given the wrong root certificate
cannot connect. Every process a test starts is stopped by its process group."""

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
    deployment_home,
    flwr_run,
    free_port,
    make_test_certs,
    run_status,
    superlink_command,
    supernode_command,
)

pytestmark = pytest.mark.slow


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=open(self.logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def procs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Processes(logs)
    yield p
    p.stop()


def test_tls_and_supernode_authentication_on_loopback(tmp_path, procs):
    certs = make_test_certs(tmp_path / "certs", nodes=2)
    port = free_port()
    env = deployment_home(tmp_path / "flwr", "secure", port, certs / "ca.crt")
    procs.start("superlink", superlink_command(port, certs, node_auth=True), env)
    wait_until(lambda: "Uvicorn running on https" in procs.log("superlink"), 120, "SuperLink")

    # register node 0's public key only
    reg = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(certs / "node-0.pub"), "secure"],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

    def supernode(name: str, key: str, root: str, partition: int) -> subprocess.Popen:
        cmd = supernode_command(port, partition, 2, certs / root, certs / key, max_retries=2)
        return procs.start(name, cmd, env)

    authorised = supernode("authorised", "node-0.key", "ca.crt", 0)
    unregistered = supernode("unregistered", "node-1.key", "ca.crt", 1)
    wrong_ca = supernode("wrong-ca", "node-0.key", "wrong-ca.crt", 0)

    # the node without a registered key is refused by the SuperLink and gives up
    assert unregistered.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in procs.log("unregistered")
    # the node that does not trust the SuperLink's certificate cannot connect
    assert wrong_ca.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in procs.log("wrong-ca")
    wait_until(lambda: "SuperNode ID" in procs.log("authorised"), 120, "the authorised node")
    assert authorised.poll() is None

    # the operator binds the authenticated node (the id it logged) to user 0
    node_id = re.search(r"SuperNode ID: (\d+)", procs.log("authorised")).group(1)
    registry = tmp_path / "nodes.toml"
    registry.write_text(f'[nodes]\n"{node_id}" = 0\n')
    run_dir = tmp_path / "run"
    values = {
        "node-registry": str(registry),
        "diagnostics": True,
        "population": 2,
        "cohort-size": 2.0,  # q = 1: both users are asked every round
        "rounds": 2,
        "target-epsilon": 0.0,
        "noise-multiplier": 1.0,
        "round-timeout": 120.0,
        "run-dir": str(run_dir),
    }
    res = flwr_run("secure", values, env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    statuses = [r["status"] for r in run_status(env, "secure")]
    assert statuses == ["finished:completed"], (statuses, procs.log("superlink")[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("round", 0) > 0]
    assert len(rounds) == 2
    for r in rounds:
        # only the authorised node's update arrived; user 1 has no connected node
        assert r["diag_accepted"] == 1 and r["diag_unreachable"] == 1 and r["diag_rejected"] == 0
