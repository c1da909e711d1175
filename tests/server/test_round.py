import math

import pytest
import torch

from dpfl.privacy.clipping import CLIP_NORM_RTOL, ClipConfig
from dpfl.server.round import ServerSpec, ServerState, load_checkpoint, save_checkpoint

SHAPES = {"w": (30, 20), "b": (20,)}


def zeros():
    return {n: torch.zeros(s) for n, s in SHAPES.items()}


def spec(**kw):
    base = dict(
        sample_rate=0.1,
        population=100,
        clip=ClipConfig(1.0, "dim"),
        noise_multiplier=0.0,
        delta=1e-5,
        optimizer="sgd",
        lr=1.0,
        noise_seed=0,
    )
    base.update(kw)
    return ServerSpec(**base)


def delta(value=0.01, **over):
    d = {n: torch.full(s, value) for n, s in SHAPES.items()}
    d.update(over)
    return d


def test_average_is_divided_by_expected_cohort_not_replies():
    state = ServerState(zeros(), spec(), total_rounds=5)  # expected cohort 10
    agg = state.begin_round()
    for _ in range(3):  # only 3 replied
        assert agg.add(delta(0.01)) is None
    metrics = state.finish_round(agg)
    # server SGD with lr 1: new = old + average delta = 3 * 0.01 / 10
    assert torch.allclose(state.params["w"].detach(), torch.full((30, 20), 0.003))
    assert agg.diagnostics() == {"diag_replies": 3, "diag_accepted": 3, "diag_rejected": 0}
    assert not {"accepted", "replies", "rejected"} & set(metrics)  # exact counts: diagnostics
    assert state.ledger.segments[0].sample_rate == 0.1


def test_without_dp_it_is_plain_fedavg_over_replies():
    state = ServerState(zeros(), spec(clip=None), total_rounds=5)
    agg = state.begin_round()
    agg.add(delta(0.01))
    agg.add(delta(0.03))
    metrics = state.finish_round(agg)
    assert torch.allclose(state.params["b"].detach(), torch.full((20,), 0.02))
    assert not any(k.startswith("epsilon") for k in metrics) and state.ledger.rounds == 0


@pytest.mark.parametrize(
    "bad, reason",
    [
        (delta(float("nan")), "NaN"),
        (delta(b=torch.zeros(21)), "shape"),
        (delta(b=torch.zeros(20, dtype=torch.float64)), "dtype"),
        ({"w": torch.zeros(30, 20)}, "missing"),
        (delta(extra=torch.zeros(2)), "unexpected"),
        (delta(1.0), "exceeds the clip bound"),  # norm ~24.7 > C = 1
        ([torch.zeros(30, 20), torch.zeros(20)], "mapping"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason_and_not_summed(bad, reason, caplog):
    state = ServerState(zeros(), spec(), total_rounds=5)
    agg = state.begin_round()
    assert agg.add(delta(0.01)) is None
    with caplog.at_level("WARNING", logger="dpfl.server.round"):
        got = agg.add(bad)
    assert got is not None and reason in got
    assert any(reason in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    state.finish_round(agg)
    diag = agg.diagnostics()
    assert diag["diag_rejected"] == 1 and diag["diag_accepted"] == 1
    assert sum(diag["diag_rejected_reasons"].values()) == 1
    assert torch.allclose(state.params["w"].detach(), torch.full((30, 20), 0.001))


def test_norm_check_uses_the_shared_tolerance():
    state = ServerState(zeros(), spec(clip=ClipConfig(1.0, "flat")), total_rounds=1)
    n = math.sqrt(620)
    ok = delta(1.0 / n * (1 + 0.5 * CLIP_NORM_RTOL))
    over = delta(1.0 / n * (1 + 5 * CLIP_NORM_RTOL))
    agg = state.begin_round()
    assert agg.add({k: v.double().float() for k, v in ok.items()}) is None
    assert "exceeds" in agg.add(over)


def test_server_side_clipping_clips_before_summing():
    state = ServerState(zeros(), spec(clip_location="server", clip=ClipConfig(1.0, "flat")), 1)
    agg = state.begin_round()
    assert agg.add(delta(1.0)) is None  # unclipped, norm ~24.9: clipped by the server
    assert agg.clipped == 1 and agg.norms[0] == pytest.approx(math.sqrt(620))
    total = torch.cat([t.reshape(-1) for t in agg.total.values()])
    assert total.norm().item() == pytest.approx(1.0, rel=1e-6)


def test_noise_on_the_average_and_ledger_at_scheduled_rate():
    shapes = {"w": (500, 200)}
    weights = {"w": torch.zeros(500, 200)}
    state = ServerState(weights, spec(noise_multiplier=2.0, clip=ClipConfig(0.5)), 3)
    for _ in range(2):
        agg = state.begin_round()  # nobody replies: the noise alone moves the model
        metrics = state.finish_round(agg)
    step = state.params["w"].detach()
    # two steps of SGD(lr 1) on noise of std z*C/(qK) each
    assert step.std().item() == pytest.approx(math.sqrt(2) * 2.0 * 0.5 / 10, rel=0.01)
    assert metrics["noise_std_average"] == pytest.approx(0.1, rel=1e-5)
    assert state.ledger.rounds == 2 and state.ledger.segments[0].sample_rate == 0.1
    assert agg.accepted == 0 and math.isfinite(metrics["epsilon_rdp"])
    assert shapes  # (documenting the model shape)


def test_lamb_step_is_invariant_to_the_scale_of_the_update():
    """LAMB normalises per tensor: multiplying every delta by k (e.g. a different clip bound C
    with the same noise-to-clip ratio) leaves the first step unchanged."""
    torch.manual_seed(0)
    w0 = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    moves = []
    for k in (1.0, 100.0):
        state = ServerState(w0, spec(clip=None, optimizer="lamb", lr=0.01), 1)
        agg = state.begin_round()
        agg.add(
            {
                "w": torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * k,
                "b": torch.randn(4, generator=torch.Generator().manual_seed(2)) * k,
            }
        )
        state.finish_round(agg)
        moves.append({n: state.params[n].detach() - w0[n] for n in w0})
    for n in w0:
        assert torch.allclose(moves[0][n], moves[1][n], rtol=1e-3, atol=1e-7)
        # layer-wise: each tensor moves by lr * ||w|| (the trust ratio ||w|| / ||adam step||)
        assert moves[0][n].norm().item() == pytest.approx(0.01 * w0[n].norm().item(), rel=1e-3)


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    state = ServerState(zeros(), spec(noise_multiplier=1.0, optimizer="adam", lr=0.1), 5)
    for _ in range(2):
        agg = state.begin_round()
        agg.add(delta(0.01))
        state.finish_round(agg)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"server": state.state_dict()})
    other = ServerState(zeros(), spec(noise_multiplier=1.0, optimizer="adam", lr=0.1), 5)
    other.load_state_dict(load_checkpoint(path)["server"])
    assert other.round == 2 and other.ledger == state.ledger
    assert torch.equal(other.params["w"], state.params["w"])
    # the same next round from both (reproducible mode: the noise state was saved)
    for s in (state, other):
        agg = s.begin_round()
        agg.add(delta(0.01))
        s.finish_round(agg)
    assert torch.equal(other.params["w"], state.params["w"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    # the checksum travels in the same file, renamed into place in one step: a process killed
    # between writing data and checksum can no longer leave a mismatched pair behind
    save_checkpoint(path, {"server": state.state_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    path.write_bytes(data[data.index(b"\n") + 1 :])  # bare torch data, no header
    with pytest.raises(ValueError, match="no checksum header"):
        load_checkpoint(path)


def test_secure_mode_never_writes_the_noise_state():
    state = ServerState(zeros(), spec(noise_seed=None, noise_multiplier=1.0), 5)
    assert state.noise.secure
    assert "noise_generator" not in state.state_dict()


def stacked(rows):
    return {n: torch.stack([r[n] for r in rows]) for n in SHAPES}


@pytest.mark.parametrize("location", ["client", "server"])
def test_add_stacked_equals_adding_the_rows_one_by_one(location):
    g = torch.Generator().manual_seed(0)
    rows = [{n: torch.randn(s, generator=g) * 0.01 for n, s in SHAPES.items()} for _ in range(5)]
    rows.append(delta(1.0))  # far above the bound: rejected under client clipping
    rows.append(delta(0.01, b=torch.full((20,), math.nan)))  # non-finite: rejected
    sp = spec(clip_location=location)
    one, many = ServerState(zeros(), sp, 5).begin_round(), ServerState(zeros(), sp, 5).begin_round()
    expected = [one.add(r) for r in rows]
    reasons = many.add_stacked(stacked(rows))
    assert [r is None for r in reasons] == [e is None for e in expected]
    assert many.accepted == one.accepted == (5 if location == "client" else 6)
    assert many.rejected == one.rejected
    assert many.clipped == one.clipped
    assert many.norms == pytest.approx(one.norms)
    for n in SHAPES:
        torch.testing.assert_close(many.total[n], one.total[n], rtol=1e-5, atol=1e-7)


def test_add_stacked_without_dp_rejects_only_non_finite_rows():
    agg = ServerState(zeros(), spec(clip=None), 5).begin_round()
    rows = [delta(5.0), delta(1.0, w=torch.full((30, 20), math.inf))]
    reasons = agg.add_stacked(stacked(rows))
    assert reasons[0] is None and "NaN or Inf" in reasons[1]
    assert agg.accepted == 1 and torch.equal(agg.total["w"], torch.full((30, 20), 5.0))


def test_add_stacked_refuses_malformed_stacks():
    agg = ServerState(zeros(), spec(), 5).begin_round()
    with pytest.raises(TypeError, match="float32"):
        agg.add_stacked({n: torch.zeros(2, *s, dtype=torch.float64) for n, s in SHAPES.items()})
    with pytest.raises(ValueError, match="missing"):
        agg.add_stacked({"w": torch.zeros(2, 30, 20)})


def test_min_replies_is_decided_on_a_noisy_count_charged_with_the_sum():
    """At exactly min-replies accepted, the exact count would always pass; the noisy count
    (std z_c) passes about half the time, and every attempt is charged once at z_eff."""
    from dpfl.privacy.mechanisms import effective_noise_multiplier

    s = spec(noise_multiplier=1.0, count_noise_multiplier=4.0, noise_seed=None)
    state = ServerState(zeros(), s, total_rounds=1)

    def attempt():
        agg = state.begin_round()
        for _ in range(5):
            agg.add(delta(0.01))
        return agg

    agg = attempt()
    first = state.decide(agg, min_replies=5)
    assert state.decide(agg, min_replies=5) is first  # one noisy count per attempt, never two
    decisions = [state.decide(attempt(), min_replies=5) for _ in range(4000)]
    counts = [d.noisy_count for d in decisions]
    assert sum(d.apply for d in decisions) / 4000 == pytest.approx(0.5, abs=0.04)
    assert float(torch.tensor(counts).std()) == pytest.approx(4.0, rel=0.05)
    assert all(d.apply == (d.noisy_count >= 5) for d in decisions)
    assert state.decide(attempt(), min_replies=0).noisy_count is None  # no count released
    exact = ServerState(zeros(), spec(noise_multiplier=1.0, noise_seed=None), total_rounds=1)
    with pytest.raises(ValueError, match="needs a noisy count"):
        exact.decide(exact.begin_round(), min_replies=1)
    metrics = state.discard_round(agg, advance=False)
    assert metrics["noisy_accepted"] == first.noisy_count
    z_eff = effective_noise_multiplier(1.0, 4.0)
    assert s.charged_noise_multiplier == pytest.approx(z_eff)
    assert state.ledger.segments == (type(state.ledger.segments[0])(z_eff, 0.1, 1),)


def test_without_dp_the_decision_uses_the_exact_count():
    state = ServerState(zeros(), spec(clip=None), total_rounds=1)
    agg = state.begin_round()
    agg.add(delta(0.01))
    assert not state.decide(agg, 2).apply
    other = state.begin_round()
    other.add(delta(0.01))
    assert state.decide(other, 1).apply and other.decision.noisy_count is None
