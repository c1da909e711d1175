import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfl.privacy.clipping import (
    CLIP_NORM_RTOL,
    ClipConfig,
    clip_update,
    layer_bounds,
    norm_violation,
    sensitivity_bound,
    within_bound,
)


def norm64(ts) -> float:
    """Independent reference: one float64 vector of all entries, scaled to avoid overflow."""
    v = np.concatenate([t.detach().reshape(-1).double().numpy() for t in ts])
    m = np.abs(v).max()
    return 0.0 if m == 0 else float(m * np.linalg.norm(v / m))


def expected_bounds(numels, c, scheme):
    if scheme == "uniform":
        return [c / math.sqrt(len(numels))] * len(numels)
    return [c * math.sqrt(d / sum(numels)) for d in numels]


# --- exact numbers ----------------------------------------------------------------------------


def test_flat_clip_scales_whole_update():
    u = [torch.tensor([3.0]), torch.tensor([4.0])]
    out, stats = clip_update(u, ClipConfig(1.0))
    assert torch.allclose(torch.cat(out), torch.tensor([0.6, 0.8]))
    assert stats.norm == pytest.approx(5.0)
    assert stats.layer_norms == pytest.approx((3.0, 4.0))
    assert stats.clipped and stats.layers_clipped == 2
    assert stats.scales == pytest.approx((0.2, 0.2))
    assert stats.norm_after == pytest.approx(1.0)


def test_flat_clip_leaves_small_update_unchanged():
    u = [torch.tensor([0.3, 0.4])]
    out, stats = clip_update(u, ClipConfig(1.0))
    assert torch.equal(out[0], u[0])
    assert not stats.clipped and stats.layers_clipped == 0
    assert stats.norm_after == pytest.approx(0.5)


def test_flat_normalize_scales_up_to_bound():
    out, stats = clip_update([torch.tensor([0.3, 0.4])], ClipConfig(2.0, mode="normalize"))
    assert torch.allclose(out[0], torch.tensor([1.2, 1.6]))
    assert not stats.clipped  # below the bound: normalised up, not clipped


def test_uniform_and_dim_bounds():
    assert layer_bounds([5, 7, 9, 11], 2.0, "uniform") == pytest.approx([1.0] * 4)
    assert layer_bounds([1, 3], 2.0, "dim") == pytest.approx([1.0, math.sqrt(3.0)])
    for scheme in ("uniform", "dim"):
        b = layer_bounds([3, 100, 1, 4096], 0.01, scheme)
        assert math.sqrt(sum(x * x for x in b)) == pytest.approx(0.01, rel=1e-12)


def test_per_layer_clip_each_tensor_to_its_own_bound():
    # dim bounds for numels (1, 3) and C = 2: C_0 = 1, C_1 = sqrt(3).
    u = {"a": torch.tensor([10.0]), "b": torch.tensor([0.1, 0.1, 0.1])}
    out, stats = clip_update(u, ClipConfig(2.0, scheme="dim"))
    assert list(out) == ["a", "b"]
    assert out["a"].item() == pytest.approx(1.0)
    assert torch.equal(out["b"], u["b"])  # under its bound: untouched
    assert stats.clipped and stats.layers_clipped == 1
    assert stats.scales == pytest.approx((0.1, 1.0))


def test_per_layer_normalize_keeps_zero_layers_zero():
    u = [torch.zeros(4), torch.tensor([1e-3, 0.0]), torch.tensor([5.0, 5.0, 5.0])]
    out, stats = clip_update(u, ClipConfig(3.0, scheme="uniform", mode="normalize"))
    assert torch.equal(out[0], torch.zeros(4))  # a layer that did not train stays zero
    assert out[1].norm().item() == pytest.approx(math.sqrt(3.0), rel=1e-6)
    assert out[2].norm().item() == pytest.approx(math.sqrt(3.0), rel=1e-6)
    assert stats.scales[0] == 0.0
    assert stats.layers_clipped == 1  # only the third tensor was above its bound


def test_input_is_not_modified_and_structure_kept():
    u = {"w": torch.full((2, 2), 10.0), "b": torch.full((2,), 10.0)}
    before = {k: v.clone() for k, v in u.items()}
    out, _ = clip_update(u, ClipConfig(1.0, scheme="dim"))
    assert isinstance(out, dict) and list(out) == ["w", "b"]
    for k in u:
        assert torch.equal(u[k], before[k])
        assert out[k].shape == u[k].shape and out[k].dtype == u[k].dtype


def test_huge_float64_values_do_not_overflow_the_norm():
    u = [torch.tensor([1e200, 1e200], dtype=torch.float64)]
    out, stats = clip_update(u, ClipConfig(1.0))
    assert stats.norm == pytest.approx(math.sqrt(2) * 1e200)
    assert out[0].norm().item() == pytest.approx(1.0)


def test_update_whose_norm_overflows_float64_is_rejected_not_passed_through():
    u = [torch.tensor([1.7e308, 1.7e308], dtype=torch.float64)]
    for scheme in ("flat", "dim"):
        for mode in ("clip", "normalize"):
            with pytest.raises(ValueError, match="exceeds the float64 range"):
                clip_update(u, ClipConfig(1.0, scheme, mode))
    two = [torch.tensor([1.5e308], dtype=torch.float64)] * 2  # each finite, together not
    with pytest.raises(ValueError, match="exceeds the float64 range"):
        clip_update(two, ClipConfig(1.0))


def test_clipping_a_huge_float64_update_to_a_tiny_bound_stays_within_tolerance():
    u = [torch.tensor([2.5e307], dtype=torch.float64)]
    out, _ = clip_update(u, ClipConfig(1e-12))
    assert norm64(out) <= 1e-12 * (1 + CLIP_NORM_RTOL)
    assert norm64(out) == pytest.approx(1e-12, rel=1e-12)


def test_normalize_tiny_float32_update_without_overflow():
    u = [torch.tensor([1e-40, 0.0], dtype=torch.float32)]  # subnormal
    out, _ = clip_update(u, ClipConfig(1e6, mode="normalize"))
    assert torch.isfinite(out[0]).all()
    assert out[0].double().norm().item() == pytest.approx(1e6, rel=1e-6)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "update, exc, match",
    [
        ([], ValueError, "empty"),
        ({}, ValueError, "empty"),
        ([torch.tensor([1.0, float("nan")])], ValueError, "NaN or Inf"),
        ({"w": torch.tensor([float("inf")])}, ValueError, "w contains NaN or Inf"),
        ([torch.tensor([1, 2])], TypeError, "dtype torch.int64"),
        ([torch.tensor([1.0], dtype=torch.float16)], TypeError, "float32 or float64"),
        ([[1.0, 2.0]], TypeError, "not a torch.Tensor"),
        (torch.tensor([1.0]), TypeError, "list of tensors"),
    ],
)
def test_bad_updates_raise_clear_errors(update, exc, match):
    with pytest.raises(exc, match=match):
        clip_update(update, ClipConfig(1.0, scheme="dim"))


def test_shape_mismatch_against_model():
    with pytest.raises(ValueError, match=r"layer\[1\] has shape \(3,\), the model expects \(4,\)"):
        clip_update([torch.ones(2), torch.ones(3)], ClipConfig(1.0), reference=[(2,), (4,)])
    with pytest.raises(ValueError, match="has 1 tensors, the model has 2"):
        clip_update([torch.ones(2)], ClipConfig(1.0), reference=[(2,), (4,)])
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        clip_update({"a": torch.ones(2)}, ClipConfig(1.0), reference={"a": (2,), "b": (3,)})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"clip_norm": 1e-13}, r"clip_norm must be a number in \[1e-12, 1e\+12\]"),
        ({"clip_norm": 1e13}, "clip_norm"),
        ({"clip_norm": 1.0, "scheme": "layer"}, "scheme must be one of flat, uniform, dim"),
        ({"clip_norm": 1.0, "mode": "scale"}, "mode must be one of clip, normalize, rescale"),
        ({"clip_norm": 1.0, "mode": "rescale"}, "with scheme 'flat' is mode 'clip'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClipConfig(**kwargs)


# --- the sensitivity bound, for any update (property tests) ----------------------------------


@st.composite
def updates(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    width = 32 if dtype == np.float32 else 64
    scales = [1e-30, 1e-6, 1.0, 1e3, 1e30]
    if dtype == np.float64:
        scales += [1e-300, 1e290]  # near float64's limits; elements go up to 1e6
    scale = draw(st.sampled_from(scales))
    tensors = []
    for _ in range(draw(st.integers(1, 5))):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
        zero = draw(st.booleans()) and draw(st.booleans())  # ~1 in 4 layers did not train
        elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=width)
        arr = np.zeros(shape, dtype) if zero else draw(hnp.arrays(dtype, shape, elements=elements))
        tensors.append(torch.from_numpy(arr) * scale)
    return tensors


clip_norms = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e-12, 1e12]
)
configs = (
    st.tuples(
        clip_norms,
        st.sampled_from(["flat", "uniform", "dim"]),
        st.sampled_from(["clip", "normalize", "rescale"]),
    )
    .filter(lambda c: not (c[1] == "flat" and c[2] == "rescale"))  # refused: it is "clip"
    .map(lambda c: ClipConfig(*c))
)


@given(updates(), configs)
def test_clipped_norm_never_exceeds_bound(u, cfg):
    out, stats = clip_update(u, cfg)
    tol = 1 + CLIP_NORM_RTOL
    assert norm64(out) <= cfg.clip_norm * tol
    assert all(torch.isfinite(t).all() for t in out)
    if cfg.per_layer and (cfg.mode != "rescale" or stats.clipped):
        bounds = expected_bounds([t.numel() for t in u], cfg.clip_norm, cfg.scheme)
        for t, b in zip(out, bounds, strict=True):
            assert norm64([t]) <= b * tol
    # the server's check accepts every honestly clipped update
    assert norm_violation(out, cfg, [t.shape for t in u]) is None
    assert stats.norm == pytest.approx(norm64(u), rel=1e-9)


def unit(ts) -> np.ndarray:
    v = np.concatenate([t.detach().reshape(-1).double().numpy() for t in ts])
    m = np.abs(v).max()
    return v if m == 0 else (v / m) / np.linalg.norm(v / m)


@given(updates(), configs)
def test_clip_preserves_direction_and_normalize_hits_bound(u, cfg):
    out, stats = clip_update(u, cfg)
    # flat: one common factor, so the whole update keeps its direction; per-layer: each tensor
    groups = [(u, out)] if not cfg.per_layer else [([t], [o]) for t, o in zip(u, out, strict=True)]
    for before, after in groups:
        assert np.allclose(unit(after), unit(before), rtol=0, atol=1e-6)
        if cfg.mode == "clip":
            assert norm64(after) <= norm64(before) * (1 + 1e-6)
    rescaled = cfg.mode == "rescale" and norm64(u) >= cfg.clip_norm * (1 - 1e-9)
    if cfg.mode == "rescale" and norm64(u) < cfg.clip_norm * (1 - 1e-9):
        for t, o in zip(u, out, strict=True):
            assert torch.equal(o, t)  # below C: unchanged, whatever a tensor's own C_h
    if cfg.mode == "normalize" or rescaled:
        if not cfg.per_layer:
            if norm64(u) > 0:
                assert norm64(out) == pytest.approx(cfg.clip_norm, rel=1e-6)
        else:
            bounds = expected_bounds([t.numel() for t in u], cfg.clip_norm, cfg.scheme)
            for t, o, b in zip(u, out, bounds, strict=True):
                expected = b if norm64([t]) > 0 else 0.0
                assert norm64([o]) == pytest.approx(expected, rel=1e-6)
    assert stats.norm_after == pytest.approx(norm64(out), rel=1e-5)


@given(updates(), configs, st.floats(2 * CLIP_NORM_RTOL, 10.0))
def test_server_rejects_anything_above_the_tolerance(u, cfg, excess):
    out, _ = clip_update(u, ClipConfig(cfg.clip_norm, cfg.scheme, "normalize"))
    if norm64(out) == 0:
        return  # an all-zero update cannot be pushed over the bound by scaling
    # Scale in float64 so the test measures the check, not the rounding of the scaling.
    inflated = [t.double() * (1 + excess) for t in out]
    if cfg.mode == "rescale":  # only the whole update's bound C is checked: exceed that
        inflated = [t / norm64(out) * cfg.clip_norm for t in inflated]
    reason = norm_violation(inflated, cfg, [t.shape for t in u])
    assert reason is not None and "bound" in reason


def test_server_rejects_one_layer_over_its_bound_even_if_total_is_within():
    cfg = ClipConfig(2.0, scheme="uniform")  # C_h = 1 each for two layers
    u = [torch.tensor([1.5]), torch.tensor([0.1])]  # total 1.503 < 2, layer 0 > 1
    assert "layer[0] has norm 1.5" in norm_violation(u, cfg, [(1,), (1,)])
    assert norm_violation([torch.tensor([float("nan")])], cfg, [(1,)]).endswith("rejected")
    # a small update shaped to be broadcast into a large parameter is not "within bounds"
    assert "shape" in norm_violation([torch.tensor([0.99])], ClipConfig(1.0), [(1000,)])
    sparse = torch.tensor([[0.0, 0.5]]).to_sparse()
    assert "dense tensor" in norm_violation([sparse], ClipConfig(1.0), [(1, 2)])
    huge = [torch.tensor([1.7e308, 1.7e308], dtype=torch.float64)]
    assert "float64 range" in norm_violation(huge, ClipConfig(1.0), [(2,)])


def test_rescale_is_the_papers_code_and_the_server_checks_only_c():
    """ml-pfl4asr's clip_layer_grads: below C nothing changes; above, every tensor to its C_h."""
    cfg = ClipConfig(1.0, scheme="dim", mode="rescale")  # C_h = sqrt(d_h / d)
    shapes = [(1,), (99,)]  # C_0 = 0.1, C_1 = sqrt(0.99)
    u = [torch.tensor([0.2]), torch.full((99,), math.sqrt(0.81 - 0.04) / math.sqrt(99))]
    assert norm64(u) == pytest.approx(0.9) and norm64(u[:1]) == pytest.approx(2 * 0.1)
    out, stats = clip_update(u, cfg, shapes)
    assert all(torch.equal(o, t) for o, t in zip(out, u, strict=True)) and not stats.clipped
    assert norm_violation(out, cfg, shapes) is None  # accepted unchanged
    assert norm_violation(u, ClipConfig(1.0, "dim", "clip"), shapes) is not None  # clip: no
    over = [t * (1.01 / 0.9) for t in u]  # an unrescaled 1.01 C
    assert "exceeds the clip bound" in norm_violation(over, cfg, shapes)
    out, stats = clip_update(over, cfg, shapes)
    assert stats.clipped and stats.layers_clipped == 1
    assert [norm64([o]) for o in out] == pytest.approx([0.1, math.sqrt(0.99)])
    assert float(out[1].norm()) > float(over[1].norm())  # the small-share tensor scaled up
    zero = [torch.tensor([2.0]), torch.zeros(99)]
    out, _ = clip_update(zero, cfg, shapes)
    assert norm64(out[:1]) == pytest.approx(0.1) and torch.equal(out[1], torch.zeros(99))


def test_tolerance_helpers():
    assert within_bound(1.0 + 0.5 * CLIP_NORM_RTOL, 1.0)
    assert not within_bound(1.0 + 2 * CLIP_NORM_RTOL, 1.0)
    assert sensitivity_bound(2.0) == pytest.approx(2.0 * (1 + CLIP_NORM_RTOL), rel=1e-15)


# --- stacks of updates (vectorised cohorts) -----------------------------------------------------

STACK_SHAPES = {"w": (6, 5), "b": (5,), "s": (1,)}


def stack_rows(rows):
    return {n: torch.stack([r[n] for r in rows]) for n in STACK_SHAPES}


def varied_rows(seed=0):
    """Rows that exercise every branch: clipped, under the bound, zero, near-zero (normalise
    factor beyond float32's range), one layer zero, one layer huge."""
    g = torch.Generator().manual_seed(seed)
    rows = [{n: torch.randn(s, generator=g) * scale for n, s in STACK_SHAPES.items()}
            for scale in (3.0, 0.05, 1.0)]  # fmt: skip
    rows.append({n: torch.zeros(s) for n, s in STACK_SHAPES.items()})
    rows.append({n: torch.full(s, 1e-38) for n, s in STACK_SHAPES.items()})
    rows.append({**rows[0], "b": torch.zeros(5)})
    rows.append({**rows[1], "w": torch.full((6, 5), 1e3)})
    # below C = 0.7 as a whole, one tensor above its own bound (rescale leaves it unchanged)
    rows.append({"w": torch.zeros(6, 5), "b": torch.zeros(5), "s": torch.tensor([0.6])})
    return rows


@pytest.mark.parametrize("scheme", ["flat", "uniform", "dim"])
@pytest.mark.parametrize("mode", ["clip", "normalize", "rescale"])
def test_clip_stacked_equals_clip_update_row_by_row(scheme, mode):
    from dpfl.privacy.stacked import clip_stacked

    if (scheme, mode) == ("flat", "rescale"):
        pytest.skip("refused: flat rescale is clip")
    config = ClipConfig(0.7, scheme, mode)
    rows = varied_rows()
    out, stats = clip_stacked(stack_rows(rows), config, STACK_SHAPES)
    assert stats.finite.all()
    for k, row in enumerate(rows):
        expected, one = clip_update(row, config, STACK_SHAPES)
        for n in STACK_SHAPES:
            torch.testing.assert_close(out[n][k], expected[n], rtol=1e-6, atol=0)
        assert stats.norms[k].item() == pytest.approx(one.norm, rel=1e-12, abs=1e-300)
        assert bool(stats.clipped[k]) == one.clipped
        assert int(stats.layers_clipped[k]) == one.layers_clipped
        assert stats.scales[k].tolist() == pytest.approx(list(one.scales), rel=1e-12)
        assert stats.norm_after[k].item() == pytest.approx(one.norm_after, rel=1e-9, abs=1e-300)
        assert norm_violation({n: out[n][k] for n in STACK_SHAPES}, config, STACK_SHAPES) is None


def test_clip_stacked_zeroes_non_finite_rows_and_flags_them():
    from dpfl.privacy.stacked import clip_stacked

    rows = varied_rows()[:3]
    rows[1] = {**rows[1], "b": torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0])}
    rows[2] = {**rows[2], "s": torch.tensor([math.inf])}
    out, stats = clip_stacked(stack_rows(rows), ClipConfig(0.5), STACK_SHAPES)
    assert stats.finite.tolist() == [True, False, False]
    for n in STACK_SHAPES:
        assert torch.isfinite(out[n]).all()
        assert (out[n][1:] == 0).all()


def test_stacked_violations_match_norm_violation():
    from dpfl.privacy.stacked import stacked_violations

    for scheme, mode in (("flat", "clip"), ("dim", "clip"), ("dim", "rescale")):
        config = ClipConfig(1.0, scheme, mode)
        rows = varied_rows(1)
        # one row exactly at the tolerance's edge, one just beyond it
        base = {n: torch.full(s, 1.0) for n, s in STACK_SHAPES.items()}
        norm = norm64(base.values())
        rows.append({n: t / norm for n, t in base.items()})
        rows.append({n: t / norm * (1 + 10 * CLIP_NORM_RTOL) for n, t in base.items()})
        rows.append({**rows[1], "s": torch.tensor([math.nan])})
        reasons = stacked_violations(stack_rows(rows), config, STACK_SHAPES)
        expected = [norm_violation(r, config, STACK_SHAPES) for r in rows]
        assert [r is None for r in reasons] == [e is None for e in expected]
        assert sum(r is None for r in reasons) >= 3  # the small rows pass
        assert reasons == expected


def test_stacks_with_wrong_layout_raise():
    from dpfl.privacy.stacked import clip_stacked

    good = stack_rows(varied_rows()[:2])
    with pytest.raises(ValueError, match="missing"):
        clip_stacked({k: v for k, v in good.items() if k != "b"}, ClipConfig(1.0), STACK_SHAPES)
    with pytest.raises(ValueError, match="per row"):
        clip_stacked({**good, "b": torch.zeros(2, 4)}, ClipConfig(1.0), STACK_SHAPES)
    with pytest.raises(ValueError, match="leading"):
        clip_stacked({**good, "b": torch.zeros(3, 5)}, ClipConfig(1.0), STACK_SHAPES)
    with pytest.raises(TypeError, match="dtype"):
        clip_stacked({**good, "b": good["b"].half()}, ClipConfig(1.0), STACK_SHAPES)
