"""Schedules of main_moco on both sides against values worked out by hand."""
import math

import paddle
import pytest
import torch

from paddle_impl import schedules as psched
from torch_ref import schedules as tsched

SIDES = [pytest.param(tsched, id='torch'), pytest.param(psched, id='paddle')]


@pytest.mark.parametrize('S', SIDES)
def test_scaled_lr(S):
    assert S.scaled_lr(0.6, 4096) == pytest.approx(9.6, rel=1e-15)        # R-50 recipe
    assert S.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-15)  # ViT recipe
    assert S.scaled_lr(0.1, 256) == 0.1
    assert S.scaled_lr(0.8, 32) == pytest.approx(0.1, rel=1e-15)


@pytest.mark.parametrize('S', SIDES)
def test_lr_at_by_hand(S):
    lr, w, E = 1.0, 10, 100
    assert S.lr_at(0, lr, w, E) == 0.0                               # first iteration: 0
    assert S.lr_at(0.75, 2.0, 1, 4) == pytest.approx(1.5, rel=1e-15)  # 3/4 through a 1-epoch warm-up
    assert S.lr_at(5, lr, w, E) == pytest.approx(0.5, rel=1e-15)     # middle of warm-up
    assert S.lr_at(10 - 1e-9, lr, w, E) == pytest.approx(1.0, rel=1e-9)  # last warm-up iteration
    assert S.lr_at(10, lr, w, E) == 1.0                              # end of warm-up: cos(0) = 1
    assert S.lr_at(55, lr, w, E) == pytest.approx(0.5, rel=1e-15)    # half-way through the cosine
    assert S.lr_at(32.5, lr, w, E) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    # last iteration of 100 epochs x 1250 iterations: e - w = 90 - 1/1250; lr = (1 - cos d) / 2 ~ d^2 / 4
    d = math.pi * (1 / 1250) / 90
    assert S.lr_at(99 + 1249 / 1250, lr, w, E) == pytest.approx(d * d / 4, rel=1e-6)
    assert S.lr_at(E, lr, w, E) == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize('S', SIDES)
def test_moco_momentum_by_hand(S):
    assert S.adjust_moco_momentum(0, 0.99, 100) == pytest.approx(0.99, rel=1e-15)
    assert S.adjust_moco_momentum(50, 0.99, 100) == pytest.approx(0.995, rel=1e-15)
    assert S.adjust_moco_momentum(25, 0.99, 100) == pytest.approx(1 - 0.5 * (1 + math.sqrt(0.5)) * 0.01, rel=1e-15)
    assert S.adjust_moco_momentum(100, 0.99, 100) == 1.0
    assert S.adjust_moco_momentum(1 / 1250, 0.996, 300) > 0.996


def test_both_sides_identical_on_a_grid():
    for e in [i / 7 for i in range(0, 7 * 12)]:
        assert tsched.lr_at(e, 2.4e-3, 2, 12) == psched.lr_at(e, 2.4e-3, 2, 12)
        assert tsched.adjust_moco_momentum(e, 0.99, 12) == psched.adjust_moco_momentum(e, 0.99, 12)


def test_adjust_learning_rate_sets_the_optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    topt = torch.optim.SGD([{'params': [a]}, {'params': [b], 'lr': 7.0}], lr=1.0)
    lr = tsched.adjust_learning_rate(topt, 5, 1.0, 10, 100)
    assert lr == pytest.approx(0.5) and all(g['lr'] == lr for g in topt.param_groups)

    p = paddle.create_parameter([2], 'float32')
    popt = paddle.optimizer.SGD(learning_rate=1.0, parameters=[p])
    lr = psched.adjust_learning_rate(popt, 55, 1.0, 10, 100)
    assert lr == pytest.approx(0.5) and popt.get_lr() == pytest.approx(0.5, rel=1e-15)
