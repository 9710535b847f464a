"""AdamW with the usual exclusions from weight decay, and warm-up + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, extra_no_decay: set[str] = frozenset(),
                 exclusions: bool = True) -> list[dict]:
    """Norm weights, biases (every 0/1-D tensor) and the named embeddings/tokens get no decay, unless
    ``exclusions`` is off (every trainable parameter decays, as a plain ``AdamW(model.parameters())``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclusions and _spared(name, p, extra_no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _spared(name: str, p: nn.Parameter, extra_no_decay: set[str]) -> bool:
    """Whether a parameter is exempt from weight decay: a norm's weight or a bias (0/1-D), or a named embedding."""
    return p.ndim <= 1 or name in extra_no_decay


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float,
                    extra_no_decay: set[str] = frozenset(), fused: bool = False,
                    exclusions: bool = True, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (default: :func:`param_groups` of ``model``)."""
    if groups is None:
        groups = param_groups(model, weight_decay, extra_no_decay, exclusions)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def phase_start(total_steps: int, second_phase_at: float | None) -> int | None:
    """The step at which the schedule's second phase starts (None: one phase)."""
    return None if second_phase_at is None else max(1, min(total_steps - 1, round(second_phase_at * total_steps)))


def phased_lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                 second_start: int | None = None, second_lr: float | None = None) -> float:
    """``lr_at`` over one phase, or two: the first warms up and decays to ``min_lr`` at ``second_start``, then
    the second warms up again and decays from ``second_lr`` to ``min_lr`` at ``total_steps`` (GCRL, table 3 and
    10: 1.6e-3 for the generative-only half, 9.6e-4 or 4.8e-4 for the hybrid half, each with its warm-up)."""
    if second_start is None or second_lr is None:
        return lr_at(step, total_steps, warmup_steps, lr, min_lr)
    if step < second_start:
        return lr_at(step, second_start, min(warmup_steps, second_start - 1), lr, min_lr)
    rest = total_steps - second_start
    return lr_at(step - second_start, rest, min(warmup_steps, max(rest - 1, 0)), second_lr, min_lr)


def layer_decay_groups(model: nn.Module, weight_decay: float, extra_no_decay: set[str], layer_of,
                       num_layers: int, layer_decay: float) -> list[dict]:
    """MAE's ``param_groups_lrd`` (util/lr_decay.py): one group per (layer, decayed or not), each with
    ``lr_scale`` = layer_decay ** (num_layers - layer), where ``layer_of(name)`` is 0 for the embeddings,
    i + 1 for block i and ``num_layers`` (the block count + 1) for everything after the blocks; decay exclusions
    as :func:`param_groups`. A caller's schedule multiplies each group's lr by its ``lr_scale``."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        spared = _spared(name, p, extra_no_decay)
        layer = layer_of(name)
        group = groups.setdefault((layer, spared), {"params": [], "weight_decay": 0.0 if spared else weight_decay,
                                                    "lr_scale": layer_decay ** (num_layers - layer),
                                                    "layer": layer})
        group["params"].append(p)
    return list(groups.values())
