"""The LARS optimizer (genrep.eval.metrics.lars) against steps computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from genrep.eval.metrics.lars import LARS


def _step(params_and_grads, **kw) -> LARS:
    opt = LARS([p for p, _ in params_and_grads], **kw)
    for p, g in params_and_grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    return opt


def test_one_step_by_hand():
    # W = diag(3, 4): ||W|| = 5; d = grad + 0.1 W = diag(0.9, 1.2): ||d|| = 1.5; trust = 0.001 * 5 / 1.5 = 1/300;
    # mu = d / 300 = diag(0.003, 0.004); W - 2 mu = diag(2.994, 3.992)
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    # the bias: no decay, no trust ratio: mu = grad, b - 2 grad
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    _step([(w, [[0.6, 0.0], [0.0, 0.8]]), (b, [0.5, 0.25])], lr=2.0, weight_decay=0.1, momentum=0.9,
          trust_coefficient=0.001)
    torch.testing.assert_close(w, torch.tensor([[2.994, 0.0], [0.0, 3.992]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([0.0, -2.5], dtype=torch.float64))


def test_momentum_carries_the_scaled_step():
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||W|| = 5
    opt = LARS([w], lr=1.0, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.0, 2.0]], dtype=torch.float64)  # ||g|| = 2: trust 0.01 * 5 / 2 = 0.025
    opt.step()
    mu1 = [0.0, 0.05]
    w1 = [3.0, 3.95]
    torch.testing.assert_close(w, torch.tensor([w1], dtype=torch.float64))
    w.grad = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    opt.step()
    trust = 0.01 * math.hypot(*w1) / 1.0
    mu2 = [0.9 * mu1[0] + trust * 1.0, 0.9 * mu1[1]]
    torch.testing.assert_close(w, torch.tensor([[w1[0] - mu2[0], w1[1] - mu2[1]]], dtype=torch.float64))


@pytest.mark.parametrize("w0, grad", [([[0.0, 0.0]], [[1.0, -2.0]]),   # a zero weight: no trust ratio
                                      ([[1.0, 2.0]], [[0.0, 0.0]])])   # a zero step: nothing moves
def test_zero_norms_take_the_plain_step(w0, grad):
    w = torch.tensor(w0, dtype=torch.float64)
    _step([(w, grad)], lr=0.5, momentum=0.9)
    want = torch.tensor(w0, dtype=torch.float64) - 0.5 * torch.tensor(grad, dtype=torch.float64)
    torch.testing.assert_close(w, want)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="momentum < 1"):
        LARS([torch.zeros(2, 2, requires_grad=True)], lr=0.1, momentum=1.0)
