"""Exponential moving average of weights, updated with one fused foreach kernel per step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = [p for p in self.model.parameters()]
        self._src = [p for p in model.parameters()]
        self._ema_buf = [b for b in self.model.buffers() if b.dtype.is_floating_point]
        self._src_buf = [b for b in model.buffers() if b.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._src, 1.0 - self.decay)
        if self._ema_buf:
            torch._foreach_copy_(self._ema_buf, self._src_buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
