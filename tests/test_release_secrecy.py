"""What a secure run writes and sends gives nobody the noise or the cohorts.

A 3-round run through the Flower strategy, with an in-process grid whose nodes run dpfl's
ClientApp body, then a scan of everything it wrote (config, metrics, summary, checkpoint),
every log record at DEBUG level and every message sent to a node, for the sampling and noise
keys and for every cohort that was drawn. With ``sampling-seed`` the cohorts are rebuilt
exactly from the run folder, and the report says INSECURE.
"""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import (
    MessageType,
)
from flwr.supercore.task_identity import TaskIdentity

from dpfl.config import RunConfig
from dpfl.flower.strategy import DPFedAvg
from dpfl.server.sampling import CohortSampler
from dpfl.tools.report import statement_lines
from tests.support.grid import NODE
from tests.support.grid import InProcessGrid as _Grid

POPULATION = 40
BASE = {
    "population": POPULATION, "cohort-size": 8.0, "rounds": 3, "examples-per-user": 10,
    "noise-multiplier": 1.0, "target-epsilon": 0.0, "checkpoint-every": 1, "eval-every": 1,
}  # fmt: skip


def InProcessGrid(failing: frozenset[int] = frozenset()) -> _Grid:
    return _Grid(POPULATION, failing)


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def flower_run(tmp_path, monkeypatch, **over):
    """Run through the strategy; returns (cfg, grid, drawn cohorts, samplers, noise sources)."""
    drawn, samplers = [], []
    real = CohortSampler.cohort

    def recording(self, *args, **kwargs):
        samplers.append(self)
        cohort = real(self, *args, **kwargs)
        drawn.append(cohort.copy())
        return cohort

    monkeypatch.setattr(CohortSampler, "cohort", recording)
    cfg = RunConfig.from_mapping({**BASE, "run-dir": str(tmp_path / "run"), **over})
    grid = InProcessGrid(failing=frozenset(range(0, POPULATION, 3)))
    from dpfl.flower.nodes import discover_users
    from dpfl.recipes import resolve

    made_of = resolve(cfg)
    strategy = DPFedAvg(
        made_of.cfg,
        discover_users(grid, POPULATION, 5, population=POPULATION),
        task=made_of.task,
        dataset=made_of.dataset,
    )
    from dpfl.loop import run as runs

    made = []
    real_init = runs.FederatedRun.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(runs.FederatedRun, "__init__", keep)
    strategy.start(grid)
    return cfg, grid, drawn, samplers[0], made[0].state.noise


def encodings(key: bytes) -> list[bytes]:
    """Ways a key could be written down."""
    as_int = int.from_bytes(key, "little")
    return [
        key,
        key.hex().encode(),
        base64.b64encode(key),
        str(as_int).encode(),
        str(int.from_bytes(key, "big")).encode(),
        repr(key).encode(),
    ]


def cohort_encodings(cohort: np.ndarray) -> list[bytes]:
    ids = [int(u) for u in cohort]
    return [
        json.dumps(ids).encode(),
        str(ids).encode(),
        " ".join(map(str, ids)).encode(),
        str(cohort).encode(),
        np.asarray(cohort, dtype=np.int64).tobytes(),
        ",".join(map(str, ids)).encode(),
    ]


def test_a_secure_run_writes_and_sends_neither_keys_nor_cohorts(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    cfg, grid, drawn, sampler, noise = flower_run(tmp_path, monkeypatch)
    assert sampler.secure and noise.secure
    assert len(drawn) == 3 and all(len(c) >= 3 for c in drawn)
    run = tmp_path / "run"
    files = sorted(p for p in run.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "model.pt"
    }  # fmt: skip
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["logs"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    for i, msg in enumerate(grid.sent):
        if msg.metadata.message_type == MessageType.TRAIN:
            blobs[f"message {i}"] = json.dumps(dict(msg.content["config"])).encode()
    secrets = encodings(sampler._streams._key) + encodings(noise._streams._key)
    for where, blob in blobs.items():
        for secret in secrets:
            assert secret not in blob, f"a key in {where}"
        for cohort in drawn:
            for enc in cohort_encodings(cohort):
                assert enc not in blob, f"cohort {cohort.tolist()} in {where}"
    # failures were logged (the first only, diagnostics being off) without naming the user
    failures = [r.getMessage() for r in caplog.records if "failed in round" in r.getMessage()]
    assert len(failures) == 1 and "a sampled client failed" in failures[0]
    assert not any(re.search(r"\buser \d+", r.getMessage()) for r in caplog.records)
    # a node learns only that it is asked to train: one message per sampled user, no list
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert sorted(m.metadata.dst_node_id - NODE for m in train) == sorted(
        int(u) for c in drawn for u in c
    )
    assert all("sampling-seed" not in dict(m.content["config"]) for m in train)
    # with diagnostics off (the default) no exact count is in the metrics
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("diag_") for r in rows for k in r)
    summary = json.loads((run / "summary.json").read_text())
    assert "secret" in summary["privacy"]["cohort_source"]
    assert "INSECURE" not in summary["privacy"]["text"]


def test_with_a_sampling_seed_the_cohorts_are_rebuilt_from_the_run_folder(tmp_path, monkeypatch):
    cfg, grid, drawn, sampler, _ = flower_run(tmp_path, monkeypatch, **{"sampling-seed": 77})
    monkeypatch.undo()  # stop recording: the rebuild below draws cohorts too
    assert not sampler.secure and len(drawn) == 3
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    rebuilt = CohortSampler.from_seed(saved["sampling-seed"])
    for r, cohort in enumerate(drawn, start=1):
        again = rebuilt.cohort(saved["population"], saved["cohort-size"] / saved["population"], r)
        assert np.array_equal(again, cohort)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "INSECURE" in summary["privacy"]["text"]
    lines = statement_lines(saved, summary)
    assert any(line.startswith("cohorts:") and "INSECURE" in line for line in lines)
    # the seed still never reaches a node
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert train and all("sampling-seed" not in dict(m.content["config"]) for m in train)


def test_the_simulator_writes_no_cohort_either(tmp_path, monkeypatch, caplog):
    from dpfl.simulation import simulate

    drawn = []
    real = CohortSampler.cohort

    def recording(self, *args, **kwargs):
        drawn.append(real(self, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(CohortSampler, "cohort", recording)
    over = {"sim-failure-rate": 0.3, "diagnostics": True}  # every failure logged, unnamed
    cfg = RunConfig.from_mapping({**BASE, **over, "run-dir": str(tmp_path / "sim")})
    with caplog.at_level(logging.DEBUG):
        simulate(cfg, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("a sampled client failed" in m for m in messages) > 1
    assert not any(re.search(r"\buser \d+", m) for m in messages)
    blobs = [p.read_bytes() for p in (tmp_path / "sim").rglob("*") if p.is_file()]
    for cohort in drawn:
        for enc in cohort_encodings(cohort):
            assert not any(enc in b for b in blobs)
    assert torch.load(tmp_path / "sim" / "model.pt", weights_only=True)
