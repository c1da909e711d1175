"""Every optimizer against its published update rule, written out here from the paper's
equations (plain torch arithmetic on float64), never by calling the optimizer's own code."""

import math

import pytest
import torch

from dpfl.models.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    OptimizerOptions,
    ScheduleOptions,
    make_optimizer,
    make_schedule,
)

F64 = torch.float64

# A fixed problem: a 2x3 weight and a 3-vector bias, two steps with fixed gradients.
W0 = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]
B0 = [0.1, -0.2, 0.3]
GW = [[[0.3, -0.6, 0.9], [-0.2, 0.4, 0.1]], [[-0.1, 0.2, 0.7], [0.4, -0.3, 0.05]]]
GB = [[0.5, -0.25, 0.125], [-0.3, 0.6, 0.2]]


def t(x):
    return torch.tensor(x, dtype=F64)


def run(name, lr, options, w0=W0, b0=B0, gw=GW, gb=GB):
    """(weight, bias) after each step of optimizer ``name`` fed the fixed gradients."""
    w = torch.nn.Parameter(t(w0))
    b = torch.nn.Parameter(t(b0))
    opt = make_optimizer(name, [w, b], lr, options)
    out = []
    for g_w, g_b in zip(gw, gb, strict=True):
        w.grad, b.grad = t(g_w), t(g_b)  # fresh tensors: LARS overwrites p.grad
        opt.step()
        out.append((w.detach().clone(), b.detach().clone()))
    return out


def expected(rule, w0=W0, b0=B0, gw=GW, gb=GB, states=None, **hp):
    """(weight, bias) after each step of ``rule(p, g, state, t, **hp)``, one state per tensor
    (``states``: a list to receive the two states)."""
    params, out = [t(w0), t(b0)], []
    states = [] if states is None else states
    states[:] = [{}, {}]
    for step, grads in enumerate(zip(gw, gb, strict=True), start=1):
        params = [
            rule(p, t(g), s, step, **hp) for p, g, s in zip(params, grads, states, strict=True)
        ]
        out.append(tuple(p.clone() for p in params))
    return out


def assert_steps(actual, want, atol=1e-9, rtol=1e-7):
    assert len(actual) == len(want)
    for (w, b), (ew, eb) in zip(actual, want, strict=True):
        torch.testing.assert_close(w, ew, atol=atol, rtol=rtol)
        torch.testing.assert_close(b, eb, atol=atol, rtol=rtol)


def zeros(p):
    return torch.zeros_like(p)


# --- the published rules -------------------------------------------------------------------


def sgd_rule(p, g, s, t, lr, mu, wd):
    """Heavy-ball SGD (Sutskever et al. 2013, torch's form): b = mu b + (g + wd p)."""
    g = g + wd * p
    s["b"] = g if t == 1 else mu * s["b"] + g
    return p - lr * s["b"]


def adam_rule(p, g, s, t, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """Adam (Kingma & Ba 2015, Alg. 1); AdamW (Loshchilov & Hutter 2019, Alg. 2) if decoupled."""
    if decoupled:
        p = p - lr * wd * p
    else:
        g = g + wd * p
    s["m"] = b1 * s.get("m", zeros(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", zeros(p)) + (1 - b2) * g * g
    m_hat, v_hat = s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps)


def adagrad_rule(p, g, s, t, lr, eps):
    """Adagrad (Duchi et al. 2011): G = sum of g^2, step lr g / (sqrt(G) + eps)."""
    s["G"] = s.get("G", zeros(p)) + g * g
    return p - lr * g / (s["G"].sqrt() + eps)


def rmsprop_rule(p, g, s, t, lr, alpha, eps, mu):
    """RMSprop (Hinton 2012) with momentum on the normalised gradient (torch, Graves 2013)."""
    s["v"] = alpha * s.get("v", zeros(p)) + (1 - alpha) * g * g
    s["b"] = mu * s.get("b", zeros(p)) + g / (s["v"].sqrt() + eps)
    return p - lr * s["b"]


def lion_rule(p, g, s, t, lr, b1, b2, wd):
    """Lion (Chen et al. 2023, Alg. 2): c = b1 m + (1-b1) g, x -= lr (sign(c) + wd x),
    m = b2 m + (1-b2) g."""
    m = s.get("m", zeros(p))
    c = b1 * m + (1 - b1) * g
    p = p - lr * (torch.sign(c) + wd * p)
    s["m"] = b2 * m + (1 - b2) * g
    return p


def diffgrad_rule(p, g, s, t, lr, b1, b2, eps, wd):
    """diffGrad (Dubey et al. 2020): Adam step times xi = sigmoid(|g_{t-1} - g_t|), g_0 = 0;
    L2 weight decay added to the gradient (the paper's code)."""
    g = g + wd * p
    xi = 1 / (1 + torch.exp(-(s.get("prev", zeros(p)) - g).abs()))
    s["prev"] = g
    s["m"] = b1 * s.get("m", zeros(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", zeros(p)) + (1 - b2) * g * g
    m_hat, v_hat = s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)
    return p - lr * xi * m_hat / (v_hat.sqrt() + eps)


def project(w, g, update, delta):
    """AdamP/SGDP's projection (Heo et al. 2021, Alg. 1-2): if the gradient is near-orthogonal
    to the weight, per output channel (every row's |cos| < delta/sqrt(row size)) or else over
    the whole tensor (|cos| < delta/sqrt(numel)), remove the update's radial component."""
    for rows in (w.shape[0], 1):
        wv, gv, uv = w.reshape(rows, -1), g.reshape(rows, -1), update.reshape(rows, -1)
        cos = (wv * gv).sum(1).abs() / (wv.norm(dim=1) * gv.norm(dim=1))
        if cos.max() < delta / math.sqrt(wv.shape[1]):
            unit = wv / wv.norm(dim=1, keepdim=True)
            uv = uv - unit * (unit * uv).sum(1, keepdim=True)
            return uv.reshape(w.shape), True
    return update, False


def adamp_rule(p, g, s, t, lr, b1, b2, eps, wd, delta=0.1, wd_ratio=0.1):
    s["m"] = b1 * s.get("m", zeros(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", zeros(p)) + (1 - b2) * g * g
    step = (s["m"] / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps)
    ratio = 1.0
    if p.ndim > 1:
        step, projected = project(p, g, step, delta)
        s.setdefault("projected", []).append(projected)
        ratio = wd_ratio if projected else 1.0
    return p * (1 - lr * wd * ratio) - lr * step


def sgdp_rule(p, g, s, t, lr, mu, wd, delta=0.1, wd_ratio=0.1):
    s["b"] = mu * s.get("b", zeros(p)) + g
    step, ratio = s["b"], 1.0
    if p.ndim > 1:
        step, projected = project(p, g, step, delta)
        s.setdefault("projected", []).append(projected)
        ratio = wd_ratio if projected else 1.0
    # the reference code's decoupled decay, scaled by 1/(1 - momentum)
    return p * (1 - lr * wd * ratio / (1 - mu)) - lr * step


def conda_rule(p, g, s, t, lr, b1, b2, eps, wd):
    """Conda (Wang et al. 2025): m as Adam; on a matrix, P = the singular vectors of m on the
    smaller side (computed at the first step, kept until the refresh every 2000 steps);
    v = b2 v + (1-b2) (P^T g)^2; step P (P^T m_hat) / (sqrt(v_hat) + eps); decoupled weight
    decay after the step (the reference code)."""
    s["m"] = b1 * s.get("m", zeros(p)) + (1 - b1) * g
    rotate = back = lambda x: x  # noqa: E731
    if p.ndim == 2:
        rows, cols = p.shape
        if "P" not in s:
            u, _, vh = torch.linalg.svd(s["m"], full_matrices=False)
            s["P"] = u if rows < cols else vh.T
        P = s["P"]
        if rows < cols:
            rotate, back = (lambda x: P.T @ x), (lambda x: P @ x)
        else:
            rotate, back = (lambda x: x @ P), (lambda x: x @ P.T)
    gp, mp = rotate(g), rotate(s["m"])
    s["v"] = b2 * s.get("v", zeros(gp)) + (1 - b2) * gp * gp
    step = back((mp / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps))
    p = p - lr * step
    return p - lr * wd * p


def newton_schulz_once(x):
    """One quintic Newton-Schulz step, on the wide orientation (Muon; Jordan et al. 2024)."""
    if x.shape[0] > x.shape[1]:
        return newton_schulz_once(x.T).T
    a = x @ x.T
    return 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x


def auon_rule(p, g, s, t, lr, mu, wd, b1, b2, eps, hybrid=False):
    """AuON (Maity 2025): M = mu M + (1-mu) G; Nesterov G' = mu M + (1-mu) G;
    X = G'/(||G'||_F + 1e-7) [Hybrid: one Newton-Schulz step on X];
    U = X / (sqrt(mean(cosh(X)^2)) + 1e-8); W = (1 - lr wd) W - lr sqrt(max(1, m/n)) U.
    Vectors: AdamW at lr / 10."""
    if p.ndim < 2:
        return adam_rule(p, g, s, t, lr / 10, b1, b2, eps, wd, decoupled=True)
    s["M"] = mu * s.get("M", zeros(p)) + (1 - mu) * g
    nesterov = mu * s["M"] + (1 - mu) * g
    x = nesterov / (torch.sqrt((nesterov**2).sum()) + 1e-7)
    if hybrid:
        x = newton_schulz_once(x)
    u = x / (torch.sqrt(torch.mean(torch.cosh(x) ** 2)) + 1e-8)
    s.setdefault("u", []).append(u)
    rows, cols = p.shape
    return (1 - lr * wd) * p - lr * math.sqrt(max(1.0, rows / cols)) * u


def lamb_rule(p, g, s, t, lr, b1, b2, eps):
    """LAMB (You et al. 2020, Alg. 2, weight decay 0): r = m_hat / (sqrt(v_hat) + eps),
    x -= lr min(||x||, 10) r / ||r||."""
    s["m"] = b1 * s.get("m", zeros(p)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", zeros(p)) + (1 - b2) * g * g
    r = (s["m"] / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps)
    return p - lr * min(p.norm().item(), 10.0) / r.norm() * r


def lars_rule(p, g, s, t, lr, mu, wd, eta):
    """LARS (You et al. 2017, Alg. 1): local lr = eta ||w|| / (||g|| + wd ||w||),
    v = mu v + lr local (g + wd w), w -= v; vectors: plain momentum SGD (library)."""
    if p.ndim > 1:
        g = eta * p.norm() / (g.norm() + wd * p.norm()) * (g + wd * p)
    s["b"] = mu * s.get("b", zeros(p)) + g
    return p - lr * s["b"]


# --- the optimizers against the rules --------------------------------------------------------


def test_registry_lists_the_catalogue():
    names = {
        "sgd", "adam", "adamw", "adagrad", "rmsprop", "yogi", "adamp", "sgdp", "lion",
        "diffgrad", "conda", "auon", "auon-hybrid", "lamb", "lars",
    }  # fmt: skip
    assert set(OPTIMIZERS) == names
    for name in names:
        w, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))
        opt = make_optimizer(name, [w, b], 0.1)
        assert isinstance(opt, torch.optim.Optimizer)
        assert OPTIMIZERS[name].description
    layerwise = {n for n, e in OPTIMIZERS.items() if e.layerwise}
    assert layerwise == {"lamb", "lars", "auon", "auon-hybrid"}


def test_sgd_momentum():
    o = OptimizerOptions(momentum=0.9, weight_decay=0.01)
    assert_steps(run("sgd", 0.1, o), expected(sgd_rule, lr=0.1, mu=0.9, wd=0.01))


def test_adam():
    o = OptimizerOptions(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)
    want = expected(adam_rule, lr=0.01, b1=0.9, b2=0.99, eps=1e-8, wd=0.01)
    assert_steps(run("adam", 0.01, o), want)


def test_adamw_decouples_weight_decay():
    o = OptimizerOptions(beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1)
    hp = dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-8, wd=0.1)
    want = expected(adam_rule, decoupled=True, **hp)
    assert_steps(run("adamw", 0.01, o), want)
    coupled = expected(adam_rule, **hp)
    assert not torch.allclose(want[-1][0], coupled[-1][0])


def test_adagrad():
    o = OptimizerOptions(eps=1e-8)
    assert_steps(run("adagrad", 0.1, o), expected(adagrad_rule, lr=0.1, eps=1e-8))


def test_rmsprop():
    o = OptimizerOptions(beta2=0.9, eps=1e-8, momentum=0.5)
    want = expected(rmsprop_rule, lr=0.01, alpha=0.9, eps=1e-8, mu=0.5)
    assert_steps(run("rmsprop", 0.01, o), want)


# AdamP/SGDP: rows of W_P are orthogonal to G_ORTH's rows (the projection triggers), and
# G_ALIGNED's rows point along them (cosine ~0.97 and ~0.8: it does not).
W_P = [[1.0, 1.0, 1.0], [1.0, -1.0, 0.5]]
G_ORTH = [[2.0, -1.0, -1.0], [0.5, 1.5, 2.0]]
G_ALIGNED = [[0.3, 0.2, 0.4], [0.5, -0.4, 0.3]]


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_adamp_sgdp_projection_triggers_on_orthogonal_gradients(name):
    if name == "adamp":
        rule, lr = adamp_rule, 0.01
        hp = dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.1)
        o = OptimizerOptions(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    else:
        rule, lr = sgdp_rule, 0.05
        hp = dict(lr=lr, mu=0.9, wd=0.01)
        o = OptimizerOptions(momentum=0.9, eps=1e-8, weight_decay=0.01)
    # the second gradient: orthogonal to the rows of the weight after the first step
    w1 = expected(rule, w0=W_P, gw=[G_ORTH], gb=GB[:1], **hp)[0][0]
    h = t([[0.3, -0.6, 0.9], [-0.2, 0.4, 0.1]])
    unit = w1 / w1.norm(dim=1, keepdim=True)
    g2 = (h - unit * (unit * h).sum(1, keepdim=True)).tolist()
    gw, states = [G_ORTH, g2], []
    want = expected(rule, w0=W_P, gw=gw, states=states, **hp)
    assert states[0]["projected"] == [True, True]
    # pytorch-optimizer adds eps to sqrt(v) before AdamP's bias correction (eps 1/sqrt(1 -
    # beta2^t) times larger than the paper's): a ~3e-8 difference here, hence atol 1e-7.
    assert_steps(run(name, lr, o, w0=W_P, gw=gw), want, atol=1e-7)
    # projected: the step has no radial part along the (pre-step) weight rows
    w_before = t(W_P)
    ratio = 0.1 / (1 - 0.9) if name == "sgdp" else 0.1
    wd = hp["wd"]
    step = want[0][0] - w_before * (1 - lr * wd * ratio)
    radial = (step * w_before).sum(1)
    torch.testing.assert_close(radial, torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_adamp_sgdp_no_projection_on_aligned_gradients(name):
    gw, states = [G_ALIGNED, G_ALIGNED], []
    if name == "adamp":
        hp = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1)
        o = OptimizerOptions(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        want = expected(adamp_rule, w0=W_P, gw=gw, states=states, **hp)
        # no projection: it is AdamW
        plain = expected(adam_rule, w0=W_P, gw=gw, decoupled=True, **hp)
    else:
        hp = dict(lr=0.05, mu=0.9, wd=0.01)
        o = OptimizerOptions(momentum=0.9, eps=1e-8, weight_decay=0.01)
        want = expected(sgdp_rule, w0=W_P, gw=gw, states=states, **hp)
        plain = None
    assert states[0]["projected"] == [False, False]
    assert_steps(run(name, hp["lr"], o, w0=W_P, gw=gw), want, atol=1e-7)  # eps: see above
    if plain is not None:
        assert_steps(want, plain)


def test_lion():
    o = OptimizerOptions(beta1=0.9, beta2=0.99, weight_decay=0.1)
    want = expected(lion_rule, lr=0.001, b1=0.9, b2=0.99, wd=0.1)
    assert_steps(run("lion", 0.001, o), want)
    # a sign step: every entry moves by exactly lr besides the decay
    w1 = want[0][0]
    torch.testing.assert_close(
        (w1 - t(W0) * (1 - 0.001 * 0.1)).abs(), torch.full((2, 3), 0.001, dtype=F64)
    )
    # the momentum carries over: after g_1 = 10, g_2 = -0.5 the step still goes down (up the
    # weight), since c_2 = 0.9 * m_1 + 0.1 * g_2 = 0.9 * 0.1 - 0.05 > 0 with m_1 = 0.01 * 10
    p = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    opt = make_optimizer("lion", [p], 0.001, OptimizerOptions(beta1=0.9, beta2=0.99))
    for g in (10.0, -0.5):
        p.grad = torch.tensor([g], dtype=F64)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.002], dtype=F64))


def test_diffgrad_friction():
    o = OptimizerOptions(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    want = expected(diffgrad_rule, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
    assert_steps(run("diffgrad", 0.01, o), want)
    adam = expected(adam_rule, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
    # friction in [0.5, 1): diffGrad moves less than Adam, at least half as far
    for (w, _), (aw, _) in zip(want[:1], adam[:1], strict=True):
        dw, da = (w - t(W0)).abs(), (aw - t(W0)).abs()
        assert torch.all(dw < da) and torch.all(dw >= 0.5 * da - 1e-12)


@pytest.mark.parametrize("transpose", [False, True])
def test_conda(transpose):
    w0 = t(W0).T.tolist() if transpose else W0
    gw = [t(g).T.tolist() for g in GW] if transpose else GW
    o = OptimizerOptions(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    want = expected(conda_rule, w0=w0, gw=gw, lr=0.01, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
    assert_steps(run("conda", 0.01, o, w0=w0, gw=gw), want, atol=1e-7, rtol=1e-6)
    # not plain AdamW on the matrix (the rotation matters for the second moment)
    adamw = expected(adam_rule, w0=w0, gw=gw, lr=0.01, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
    assert not torch.allclose(want[-1][0], adamw[-1][0], atol=1e-6)


@pytest.mark.parametrize("name", ["auon", "auon-hybrid"])
@pytest.mark.parametrize("transpose", [False, True])
def test_auon(name, transpose):
    w0 = t(W0).T.tolist() if transpose else W0
    gw = [t(g).T.tolist() for g in GW] if transpose else GW
    o = OptimizerOptions(momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    hp = dict(lr=0.1, mu=0.9, wd=0.01, b1=0.9, b2=0.999, eps=1e-8, hybrid=name != "auon")
    states = []
    want = expected(auon_rule, w0=w0, gw=gw, states=states, **hp)
    assert_steps(run(name, 0.1, o, w0=w0, gw=gw), want)
    for u in states[0]["u"]:
        if name == "auon":  # unit Frobenius norm, shortened by the cosh brake r >= 1
            assert 0.5 < u.norm() < 1.0
    # the two variants differ
    other = expected(auon_rule, w0=w0, gw=gw, **{**hp, "hybrid": not hp["hybrid"]})
    assert not torch.allclose(want[0][0], other[0][0])


def test_auon_is_invariant_to_the_gradient_scale():
    def final(scale):
        w = torch.nn.Parameter(t(W0))
        opt = make_optimizer("auon", [w], 0.1, OptimizerOptions(momentum=0.9))
        for g in GW:
            w.grad = scale * t(g)
            opt.step()
        return w.detach()

    torch.testing.assert_close(final(1.0), final(1000.0))


def test_lamb_trust_ratio():
    o = OptimizerOptions(beta1=0.9, beta2=0.999, eps=1e-10)
    want = expected(lamb_rule, lr=0.1, b1=0.9, b2=0.999, eps=1e-10)
    assert_steps(run("lamb", 0.1, o), want, atol=1e-8, rtol=1e-6)
    # each tensor moves by exactly lr * ||w|| (the trust ratio)
    torch.testing.assert_close((want[0][0] - t(W0)).norm(), 0.1 * t(W0).norm())


def test_lars():
    o = OptimizerOptions(momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    want = expected(lars_rule, lr=0.5, mu=0.9, wd=0.01, eta=0.02)
    assert_steps(run("lars", 0.5, o), want)


def test_server_optimizers_are_registered():
    for name in ("sgd", "adam", "yogi", "adagrad", "lamb", "lars"):
        opt = make_optimizer(name, [torch.nn.Parameter(torch.ones(3))], 0.1)
        assert isinstance(opt, torch.optim.Optimizer)
    assert OPTIMIZERS["lamb"].layerwise and OPTIMIZERS["lars"].layerwise
    assert not OPTIMIZERS["adam"].layerwise


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'; known: adagrad, adam, "):
        make_optimizer("adamm", [torch.nn.Parameter(torch.ones(1))], 0.1)
    opt = make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 0.1)
    with pytest.raises(
        ValueError, match="unknown schedule 'cos'; known: constant, cosine, exponential"
    ):
        make_schedule("cos", opt, 10)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 0.0)


# --- schedules -------------------------------------------------------------------------------


def lrs(name, total, **kw):
    opt = make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 1.0)
    sched = make_schedule(name, opt, total, ScheduleOptions(**kw))
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert lrs("constant", 4) == [1.0] * 4
    # the paper's: constant to step 750, then x0.6 every 750 (here scaled down to 3)
    assert lrs("step", 9, step_size=3, gamma=0.6) == pytest.approx(
        [1, 1, 1, 0.6, 0.6, 0.6, 0.36, 0.36, 0.36]
    )
    assert lrs("exponential", 3, gamma=0.5) == pytest.approx([1, 0.5, 0.25])
    assert lrs("linear", 4) == pytest.approx([1, 0.75, 0.5, 0.25])
    assert lrs("linear", 6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25])
    assert set(SCHEDULES) == {"constant", "warmup", "cosine", "step", "exponential", "linear"}
    assert "Defazio" in SCHEDULES["linear"][1]


def test_cosine_schedule():
    c = (1 + math.cos(math.pi / 4)) / 2  # 0.8536
    assert lrs("cosine", 4) == pytest.approx([1, c, 0.5, 1 - c])
    # after a warm-up the half-cosine spans the remaining steps
    assert lrs("cosine", 6, warmup_steps=2) == pytest.approx([0.5, 1, 1, c, 0.5, 1 - c])
    assert lrs("cosine", 3) == pytest.approx([1, 0.75, 0.25])


def test_warmup_schedule():
    assert lrs("warmup", 5, warmup_steps=3) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    # the same warm-up in front of another schedule
    assert lrs("constant", 5, warmup_steps=3) == lrs("warmup", 5, warmup_steps=3)
    opt = make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 1.0)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        make_schedule("warmup", opt, 5)


def test_server_sgd_with_lr_one_is_fedavg():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("sgd", [p], 1.0)
    average_delta = torch.tensor([0.1, -0.2, 0.3])
    p.grad = -average_delta
    opt.step()
    assert torch.allclose(p.detach(), average_delta)


def test_client_optimizer_keys_reach_the_options():
    """client-beta1/-beta2/-eps/-weight-decay: TOML/Flower values and CLI strings."""
    from dpfl.cli import _config_from_args, build_parser
    from dpfl.config import RunConfig

    assert RunConfig().client_options() == OptimizerOptions(eps=1e-8)
    cfg = RunConfig.from_mapping(
        {"client-beta1": 0.8, "client-beta2": 0.99, "client-eps": 1e-7, "client-weight-decay": 0}
    )
    assert cfg.client_options() == OptimizerOptions(
        beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.0
    )
    args = build_parser().parse_args(
        ["simulate", "--client-optimizer", "lion", "--client-beta1", "0.95", "--client-beta2",
         "0.98", "--client-weight-decay", "0.1", "--client-momentum", "0.5"]
    )  # fmt: skip
    options = _config_from_args(args).client_options()
    assert (options.beta1, options.beta2, options.weight_decay) == (0.95, 0.98, 0.1)
    assert options.momentum == 0.5
    with pytest.raises(ValueError, match="client-weight-decay"):
        RunConfig.from_mapping({"client-weight-decay": -0.1})
