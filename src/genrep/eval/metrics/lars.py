"""LARS (You et al., 2017) as MAE's linear probe runs it (facebookresearch/mae ``util/lars.py``, from MoCo v3).

For a parameter with more than one dimension (a weight matrix) one step is

    d  = grad + weight_decay * p
    q  = trust_coefficient * ||p|| / ||d||      (1 where ||p|| or ||d|| is 0)
    mu = momentum * mu + q * d                  (mu starts at 0)
    p  = p - lr * mu

and for a 1-D parameter (a bias, a norm's scale) the same without weight decay and with q = 1: plain SGD with
momentum. The norms are whole-tensor Frobenius norms. ``torch.where`` keeps the step free of host syncs.
"""

from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, *, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if not lr >= 0 or not weight_decay >= 0 or not 0 <= momentum < 1 or not trust_coefficient > 0:
            raise ValueError(f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; "
                             f"got {lr}, {weight_decay}, {momentum}, {trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((p_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
