import pytest
import torch

from dpfl.models.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    ScheduleOptions,
    make_optimizer,
    make_schedule,
)


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
    with pytest.raises(ValueError, match="unknown schedule 'cos'; known: constant, exponential"):
        make_schedule("cos", opt, 10)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.ones(1))], 0.0)


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
    assert set(SCHEDULES) >= {"constant", "step", "exponential", "linear"}


def test_server_sgd_with_lr_one_is_fedavg():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("sgd", [p], 1.0)
    average_delta = torch.tensor([0.1, -0.2, 0.3])
    p.grad = -average_delta
    opt.step()
    assert torch.allclose(p.detach(), average_delta)
