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


def reference_lars_step(params, grads, buffers, lr, momentum, weight_decay, eta, exclude):
    """LARS written out per parameter, the way the formula reads."""
    new_params, new_buffers = [], []
    for param, grad, buffer in zip(params, grads, buffers):
        update = grad.clone()
        if not exclude:
            update = update + weight_decay * param
            p_norm, u_norm = param.norm(), update.norm()
            if p_norm > 0 and u_norm > 0:
                update = update * (eta * p_norm / u_norm)
        buffer = update.clone() if buffer is None else momentum * buffer + update
        new_params.append(param - lr * buffer)
        new_buffers.append(buffer)
    return new_params, new_buffers


def test_lars_over_many_parameters_and_steps_matches_the_per_parameter_formula():
    generator = torch.Generator().manual_seed(1)
    shapes = [(8, 4), (16,), (3, 3, 2, 2), (5,), (7, 2)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]
    params[3].data.zero_()  # a zero weight: trust ratio 1 (no division by a zero norm)
    decay, excluded = [params[0], params[2], params[3]], [params[1], params[4]]
    opt = LARS([{"params": decay}, {"params": excluded, "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.3, momentum=0.9, weight_decay=0.05, eta=0.02)
    expected = {"decay": ([p.detach().clone() for p in decay], [None] * 3),
                "excluded": ([p.detach().clone() for p in excluded], [None] * 2)}
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        for name, group, exclude in (("decay", decay, False), ("excluded", excluded, True)):
            values, buffers = expected[name]
            expected[name] = reference_lars_step(values, [p.grad for p in group], buffers, 0.3, 0.9, 0.05, 0.02,
                                                 exclude)
        opt.step()
    for name, group in (("decay", decay), ("excluded", excluded)):
        for param, want in zip(group, expected[name][0]):
            assert torch.allclose(param, want, atol=1e-5)


def _one_lars_step(lr, clip_lr, trust):
    # w and g orthogonal, so ||g + wd w|| (update) and ||g|| + wd ||w|| (paper) differ
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 2))  # ||w|| = 5
    weight.grad = torch.tensor([[0.8, -0.6]], dtype=torch.float64)  # ||g|| = 1
    bias = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    bias.grad = torch.tensor([0.5], dtype=torch.float64)
    opt = LARS([{"params": [weight]}, {"params": [bias], "lars_exclude": True, "weight_decay": 0.0}],
               lr=lr, momentum=0.9, weight_decay=0.1, eta=0.02, clip_lr=clip_lr, trust=trust)
    opt.step()
    return weight.detach().view(-1).tolist(), float(bias.detach())


@pytest.mark.parametrize("trust, lr, clip_lr, expected", [
    # update = g + 0.1 w = (1.1, -0.2). paper: ratio 0.02 * 5 / (1 + 0.1 * 5) = 0.0666667
    ("paper", 0.5, False, [3 - 0.5 * 0.0666667 * 1.1, 4 + 0.5 * 0.0666667 * 0.2]),  # step lr * ratio
    ("paper", 0.5, True, [3 - 0.0666667 * 1.1, 4 + 0.0666667 * 0.2]),  # clipped: min(ratio / lr, 1) = 0.1333
    ("paper", 0.05, True, [3 - 0.05 * 1.1, 4 + 0.05 * 0.2]),  # ratio / lr = 1.33 -> 1: plain SGD at lr
    # update: ratio 0.02 * 5 / ||(1.1, -0.2)|| = 0.1 / 1.1180340 = 0.0894427
    ("update", 0.5, False, [3 - 0.5 * 0.0894427 * 1.1, 4 + 0.5 * 0.0894427 * 0.2]),
    ("update", 0.5, True, [3 - 0.0894427 * 1.1, 4 + 0.0894427 * 0.2]),
    ("update", 0.05, True, [3 - 0.05 * 1.1, 4 + 0.05 * 0.2]),
])
def test_lars_clipped_trust_ratio_on_values(trust, lr, clip_lr, expected):
    """solo-learn's LARS (solo/utils/lars.py @ 9187ea39): ratio = eta ||w|| / (||g|| + wd ||w||), with
    clip_lr ratio = min(ratio / lr, 1): the step lr * ratio * update is then min(eta ||w|| / D, lr) * update."""
    weight, bias = _one_lars_step(lr, clip_lr, trust)
    assert weight == pytest.approx(expected, abs=1e-6)
    assert bias == pytest.approx(2.0 - lr * 0.5)  # excluded: plain SGD, no decay, never scaled nor clipped


def test_lars_clip_at_lr_zero_is_finite_and_still():
    weight, bias = _one_lars_step(0.0, True, "paper")
    assert weight == [3.0, 4.0] and bias == 2.0


def test_build_optimizer_passes_the_lars_options():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer("lars", parameter_groups(model), lr=0.4, weight_decay=1e-4, lars_eta=0.02,
                          lars_clip_lr=True, lars_trust="paper")
    assert [(g["clip_lr"], g["trust"], g["eta"], g["lars_exclude"]) for g in opt.param_groups] == [
        (True, "paper", 0.02, False), (True, "paper", 0.02, True)]
    with pytest.raises(Exception, match="lars_trust"):
        build_optimizer("lars", parameter_groups(model), lr=0.4, weight_decay=0.0, lars_trust="sum")
