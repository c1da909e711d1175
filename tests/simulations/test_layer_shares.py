"""Per-layer diagnostics: r_h = (|D_h| / |D|) / sqrt(d_h / d), recorded with diagnostics on."""

import json
import math

import pytest
import torch

from dpfl.config import RunConfig
from dpfl.loop.layer_shares import LayerShares, layer_ratios
from dpfl.simulation import simulate
from dpfl.tools.report import report


def test_ratios_follow_the_definition():
    # two tensors of 1 and 99 entries; norms 0.6 and 0.8 (|D| = 1)
    r = layer_ratios(torch.tensor([[0.6, 0.8], [0.0, 0.0], [3.0, 4.0]]), [1, 99])
    assert r.shape == (2, 2)  # the zero update has no shares: left out
    expected = [0.6 / math.sqrt(0.01), 0.8 / math.sqrt(0.99)]
    assert r[0].tolist() == pytest.approx(expected) and r[1].tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 tensor norms for a model of 2 tensors"):
        layer_ratios(torch.ones(1, 3), [1, 2])


def test_summary_names_the_extreme_tensors():
    names = [f"t{i}" for i in range(7)]
    shares = LayerShares(names, [1] * 7)  # equal sizes: r_h = sqrt(7) * |D_h| / |D|
    shares.add([float(i + 1) for i in range(7)])
    shares.add(torch.tensor([[float(i + 1) for i in range(7)]]))
    m = shares.metrics()
    r = [math.sqrt(7) * (i + 1) / math.sqrt(sum((j + 1) ** 2 for j in range(7))) for i in range(7)]
    assert m["diag_layer_ratio_median"] == pytest.approx(r[3])
    assert m["diag_layer_ratio_p05"] < r[1] and m["diag_layer_ratio_p95"] > r[5]
    assert list(m["diag_layer_ratio_lowest"]) == ["t0", "t1", "t2", "t3", "t4"]
    assert list(m["diag_layer_ratio_highest"]) == ["t6", "t5", "t4", "t3", "t2"]
    assert m["diag_layer_ratio_lowest"]["t0"] == pytest.approx(r[0], rel=1e-3)
    assert LayerShares(names, [1] * 7).metrics() == {}


def run(tmp_path, name, **over):
    c = RunConfig.from_mapping({
        "population": 40, "cohort-size": 10, "rounds": 2, "classification.examples-per-user": 20,
        "noise-multiplier": 0.0, "target-epsilon": 0.0, "sampling-seed": 3, "clip-norm": 0.5,
        "clip-scheme": "dim", "clip-mode": "rescale", "run-dir": str(tmp_path / name), **over,
    })  # fmt: skip
    simulate(c, progress=False)
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_runs_record_them_only_with_diagnostics_and_both_engines_agree(tmp_path):
    off = run(tmp_path, "off")
    assert not any(k.startswith("diag_layer") for r in off for k in r)
    seq = run(tmp_path, "seq", diagnostics=True, vectorize="off")
    vec = run(tmp_path, "vec", diagnostics=True, vectorize="on")
    for s, v in zip(seq[1:], vec[1:], strict=True):
        assert s["diag_layer_ratio_median"] > 0
        for key in ("p05", "median", "p95"):
            assert v[f"diag_layer_ratio_{key}"] == pytest.approx(
                s[f"diag_layer_ratio_{key}"], rel=1e-3
            )
        assert list(v["diag_layer_ratio_lowest"]) == list(s["diag_layer_ratio_lowest"])
        # the MLP has 4 tensors: every one is named, lowest first
        assert len(s["diag_layer_ratio_lowest"]) == 4
    lines, paths = report(tmp_path / "seq")
    assert any(line.startswith("per-layer ratios r_h") for line in lines)
    assert tmp_path / "seq" / "layers.png" in paths
