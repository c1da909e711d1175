"""Each normalisation layer against its formula, written out here from the papers."""

import math

import pytest
import torch
from torch import nn

from dpfl.models.normalization import (
    NORMS,
    BatchChannelNorm,
    EvoNormB0,
    EvoNormS0,
    NormOptions,
    PowerNorm,
    UnifiedNorm,
    make_norm,
    project_weights,
    record_projection_norms,
    running_stat_names,
    standardize_weight,
)

EPS = 1e-5


def fixed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * 2 + 0.5


def test_registry_names_and_errors():
    assert set(NORMS) == {
        "layernorm", "rmsnorm", "batchnorm", "groupnorm", "powernorm", "unified",
        "evonorm-b0", "evonorm-s0", "bcn-ws", "nap",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown normalisation 'pn'; known: batchnorm, bcn-ws"):
        make_norm("pn", 8, "last")
    for name in ("evonorm-b0", "bcn-ws"):
        with pytest.raises(
            ValueError, match=f"{name!r} needs convolutions and does not fit the MLP"
        ):
            make_norm(name, 8, "last", model="the MLP")
    for name, e in NORMS.items():
        for layout in e.layouts:
            x = fixed(4, 8) if layout == "last" else fixed(4, 8, 3, 3)
            assert make_norm(name, 8, layout)(x).shape == x.shape, name


def test_layernorm_rmsnorm_groupnorm_formulas():
    x = fixed(3, 5, 8)  # (B, T, C)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(make_norm("layernorm", 8, "last")(x), (x - mu) / (var + EPS).sqrt())
    rms = (x.pow(2).mean(-1, keepdim=True) + EPS).sqrt()
    torch.testing.assert_close(make_norm("rmsnorm", 8, "last")(x), x / rms)
    maps = fixed(2, 8, 4, 4)
    g = maps.reshape(2, 4, -1)  # 4 groups of 2 channels
    expected = (g - g.mean(-1, keepdim=True)) / (
        g.var(-1, unbiased=False, keepdim=True) + EPS
    ).sqrt()
    torch.testing.assert_close(
        make_norm("groupnorm", 8, "channels")(maps), expected.reshape_as(maps)
    )
    # layernorm on conv maps: per position over channels
    ln = make_norm("layernorm", 8, "channels")(maps)
    mu, var = maps.mean(1, keepdim=True), maps.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln, (maps - mu) / (var + EPS).sqrt())


def test_batchnorm_train_eval_and_running_stats():
    bn = make_norm("batchnorm", 4, "last", NormOptions(momentum=0.9))
    x = fixed(6, 4)
    out = bn(x)
    mu, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(out, (x - mu) / (var + EPS).sqrt())
    layer = bn.layer
    torch.testing.assert_close(layer.running_mean, 0.1 * mu)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))
    bn.eval()
    before = layer.running_mean.clone()
    torch.testing.assert_close(bn(x), (x - layer.running_mean) / (layer.running_var + EPS).sqrt())
    assert torch.equal(layer.running_mean, before)  # eval never updates


def test_powernorm_warmup_then_running_and_approximate_backward():
    pn = PowerNorm(3, NormOptions(warmup=2, momentum=0.9))
    xs = [fixed(5, 3, 4, seed=s) for s in range(4)]
    quad = [x.pow(2).mean(dim=(0, 2)) for x in xs]
    # warm-up: the batch's own quadratic mean, no mean subtraction; running = cumulative mean
    torch.testing.assert_close(pn(xs[0]), xs[0] / (quad[0][None, :, None] + EPS).sqrt())
    pn(xs[1])
    torch.testing.assert_close(pn.running_phi, (quad[0] + quad[1]) / 2)
    # after warm-up: divide by the running value of the previous step, then update it
    phi = pn.running_phi.clone()
    nu = torch.tensor([0.5, -0.2, 0.1])
    pn.ema_gz.copy_(nu)
    x = xs[2].clone().requires_grad_(True)
    y = pn(x)
    torch.testing.assert_close(y, xs[2] / (phi[None, :, None] + EPS).sqrt())
    torch.testing.assert_close(pn.running_phi, 0.9 * phi + 0.1 * quad[2])
    # approximate backward: gx = (g - (1 - a) nu z) / sqrt(phi + eps), nu += mean(g~ z)
    grad = fixed(5, 3, 4, seed=9)
    y.backward(grad)
    z = xs[2] / (phi[None, :, None] + EPS).sqrt()
    approx = grad - 0.1 * nu[None, :, None] * z
    torch.testing.assert_close(x.grad, approx / (phi[None, :, None] + EPS).sqrt())
    torch.testing.assert_close(pn.ema_gz, nu + (approx * z).mean(dim=(0, 2)))
    torch.testing.assert_close(pn.weight.grad, (grad * z).sum(dim=(0, 2)))
    # eval: the running value; no update
    pn.eval()
    phi = pn.running_phi.clone()
    torch.testing.assert_close(pn(xs[3]), xs[3] / (phi[None, :, None] + EPS).sqrt())
    assert torch.equal(pn.running_phi, phi) and float(pn.steps) == 3


def test_unified_norm_smoothing_and_outlier_filter():
    un = UnifiedNorm(2, NormOptions(warmup=3, window=2, momentum=0.9, outlier_filter=True))
    base = fixed(8, 2, 3)
    xs = [base * (1 + 0.02 * k) for k in range(6)]  # batches of a steady scale: no outliers
    quad = [x.pow(2).mean(dim=(0, 2)) for x in xs]
    for k in range(2):  # steps 1, 2: within the window -> own statistics
        torch.testing.assert_close(un(xs[k]), xs[k] / (quad[k][None, :, None] + EPS).sqrt())
    # step 3 (>= warmup, > window, steady scale): geometric mean of the last 2 quadratic means
    out = un(xs[2])
    gm = (quad[1] * quad[2]).sqrt()
    torch.testing.assert_close(out, xs[2] / (gm[None, :, None] + EPS).sqrt())
    assert float(un.skipped) == 0
    out = un(xs[3])
    gm = (quad[2] * quad[3]).sqrt()
    torch.testing.assert_close(out, xs[3] / (gm[None, :, None] + EPS).sqrt())
    # an outlier batch (x 100): own statistics, skip counted, window keeps the running value
    running = un.running_var.clone()
    big = xs[4] * 100
    out = un(big)
    q = big.pow(2).mean(dim=(0, 2))
    torch.testing.assert_close(out, big / (q[None, :, None] + EPS).sqrt())
    assert float(un.skipped) == 1
    torch.testing.assert_close(un.window_x2[5 % 2], running)
    # eval: divide by running_var, no update (fusable: a per-channel scale)
    un.eval()
    rv = un.running_var.clone()
    torch.testing.assert_close(un(xs[5]), xs[5] / (rv[None, :, None] + EPS).sqrt())
    assert torch.equal(un.running_var, rv)


def test_evonorm_b0_and_s0_formulas():
    x = fixed(4, 6, 3, 3)
    b0 = EvoNormB0(6, NormOptions(momentum=0.9))
    with torch.no_grad():
        b0.v.copy_(torch.linspace(-1, 1, 6))
    bv = x.var(dim=(0, 2, 3), unbiased=False)
    iv = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    v = b0.v.detach()[None, :, None, None]
    den = torch.maximum((bv[None, :, None, None] + EPS).sqrt(), v * x + (iv + EPS).sqrt())
    torch.testing.assert_close(b0(x), x / den)
    torch.testing.assert_close(b0.running_var, 0.9 + 0.1 * bv)
    b0.eval()
    den = torch.maximum(
        (b0.running_var[None, :, None, None] + EPS).sqrt(), v * x + (iv + EPS).sqrt()
    )
    torch.testing.assert_close(b0(x), x / den)

    s0 = EvoNormS0(6, NormOptions(groups=3))
    g = x.reshape(4, 3, -1)
    std = (g.var(-1, unbiased=False, keepdim=True) + EPS).sqrt()
    std = std.repeat_interleave(2, dim=1).reshape(4, 6, 1, 1)
    torch.testing.assert_close(s0(x), x * torch.sigmoid(x) / std)
    s0.eval()
    torch.testing.assert_close(s0(x), x * torch.sigmoid(x) / std)  # no batch statistics


def test_bcn_micro_batch_and_weight_standardisation():
    bcn = BatchChannelNorm(4, NormOptions(momentum=0.5, groups=2, micro_batch=True))
    x = fixed(2, 4, 3, 3)
    mu, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    # running estimates first move half-way to the batch's, then normalise by them
    est_mu, est_var = 0.5 * mu, 0.5 + 0.5 * var
    b = (x - est_mu[None, :, None, None]) / (est_var[None, :, None, None] + EPS).sqrt()
    g = b.reshape(2, 2, -1)
    expected = (g - g.mean(-1, keepdim=True)) / (
        g.var(-1, unbiased=False, keepdim=True) + EPS
    ).sqrt()
    torch.testing.assert_close(bcn(x), expected.reshape_as(x))
    torch.testing.assert_close(bcn.running_mean, est_mu)
    bcn.eval()
    bcn(x)
    torch.testing.assert_close(bcn.running_mean, est_mu)  # eval never updates
    w = fixed(5, 3, 3, 3)
    ws = standardize_weight(w).reshape(5, -1)
    torch.testing.assert_close(ws.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(ws.var(1, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)


def test_normalize_and_project_keeps_weight_norms():
    from dpfl.models.mlp import MLP

    torch.manual_seed(0)
    model = MLP([6, 16, 16, 3], norm="nap")
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    norms = {n: p.norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
    assert norms == pytest.approx(model.nap_norms)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        model(fixed(8, 6)).pow(2).sum().backward()
        opt.step()
        moved = {n: p.norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
        assert moved != pytest.approx(norms)
        project_weights(model)
        after = {n: p.norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
        assert after == pytest.approx(norms, rel=1e-5)
    record_projection_norms(model)  # idempotent on a projected model
    assert model.nap_norms == pytest.approx(norms, rel=1e-5)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_gradients_flow_and_running_stats_update_only_in_training(name):
    entry = NORMS[name]
    layout = "last" if "last" in entry.layouts else "channels"
    layer = make_norm(name, 4, layout, NormOptions(warmup=1))
    x = (fixed(6, 4) if layout == "last" else fixed(6, 4, 3, 3)).requires_grad_(True)
    for _ in range(3):  # past the warm-up
        layer(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, n)
    stats = running_stat_names(layer)
    assert bool(stats) == entry.running_stats
    buffers = dict(layer.named_buffers())
    before = {n: buffers[n].clone() for n in stats}
    layer.train()
    # a new batch (some statistics move in the backward pass)
    layer((1.5 * x.detach()).requires_grad_(True)).pow(2).sum().backward()
    assert all(not torch.equal(buffers[n], before[n]) for n in stats if "skipped" not in n), name
    layer.eval()
    frozen = {n: buffers[n].clone() for n in stats}
    with torch.no_grad():
        layer(x.detach())
    assert all(torch.equal(buffers[n], frozen[n]) for n in stats), name


def test_warmup_is_a_config_value_and_behaviour_after_it_is_tested():
    # PowerNorm with the default warm-up (4000) still uses batch statistics at step 3
    pn = PowerNorm(2)
    for s in range(3):
        x = fixed(4, 2, 5, seed=s)
        torch.testing.assert_close(
            pn(x), x / (x.pow(2).mean(dim=(0, 2))[None, :, None] + EPS).sqrt()
        )
    assert math.isclose(float(pn.steps), 3)


def test_readme_compatibility_table_matches_the_registry():
    from pathlib import Path

    from dpfl.models.normalization import compatibility_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert compatibility_table() in readme
