import math

import numpy as np
import pytest
import torch

from trainers.optim import LARS, build_optimizer, clip_gradients, cosine_schedule, parameter_groups


def test_cosine_schedule_with_warmup():
    schedule = cosine_schedule(1.0, 0.1, total_steps=110, warmup_steps=10)
    assert len(schedule) == 110
    assert np.allclose(schedule[:10], np.arange(10) / 10)  # linear from 0
    assert schedule[10] == pytest.approx(1.0)
    assert schedule[-1] == pytest.approx(0.1)
    middle = 10 + 99 // 2
    assert schedule[middle] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (99 // 2) / 99)))
    assert np.all(np.diff(schedule[10:]) <= 1e-12)
    rising = cosine_schedule(0.996, 1.0, 50)  # teacher momentum goes up to 1
    assert rising[0] == pytest.approx(0.996) and rising[-1] == pytest.approx(1.0)


def test_parameter_groups_exempt_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    decay, no_decay = parameter_groups(model)
    assert {tuple(p.shape) for p in decay["params"]} == {(8, 4), (2, 8)}
    assert len(no_decay["params"]) == 4  # two biases + BN weight and bias
    opt = build_optimizer("sgd", parameter_groups(model), lr=0.1, weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    bias = torch.nn.Parameter(torch.randn(5))
    weight.grad, bias.grad = torch.randn(5, 3), torch.randn(5)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    opt = LARS([{"params": [weight]}, {"params": [bias], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=0.01, eta=0.02)
    opt.step()
    update = gw + 0.01 * w0
    trust = 0.02 * w0.norm() / update.norm()
    assert torch.allclose(weight, w0 - 0.5 * trust * update, atol=1e-6)
    assert torch.allclose(bias, b0 - 0.5 * gb, atol=1e-6)  # excluded: plain SGD, no decay


@pytest.mark.parametrize("mode", ["global", "per_parameter"])
def test_gradient_clipping(mode):
    params = [torch.nn.Parameter(torch.zeros(10)) for _ in range(3)]
    for scale, p in zip((0.5, 10.0, 100.0), params):
        p.grad = torch.full((10,), scale)
    clip_gradients(params, 3.0, mode)
    norms = torch.stack([p.grad.norm() for p in params])
    if mode == "global":
        assert norms.norm() == pytest.approx(3.0, rel=1e-4)
        assert norms[2] / norms[0] == pytest.approx(200.0, rel=1e-4)  # directions kept
    else:
        assert torch.allclose(norms, torch.tensor([0.5 * math.sqrt(10), 3.0, 3.0]), atol=1e-4)
