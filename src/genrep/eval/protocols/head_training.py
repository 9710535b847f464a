"""The classification heads of the diffusion-features paper (appendix A) as the probes and the sweep train them:
their settings (a nested ``head`` section) and the glue from cached features to ``metrics.heads``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import GenrepError
from ...fields import setting
from ...methods.base import MAP_POOL
from ..metrics.heads import MAP_HEADS, HeadSpec, train_head
from .context import methods_where


@dataclass
class HeadSettings:
    """The paper's schedule (VISSL's linear protocol): Adam, 28 epochs, the rate times 0.1 every 8."""
    epochs: int = setting(28, min=1, max=10000)
    lr: float = setting(1e-3, above=0)
    step_every: int = setting(8, min=1)
    gamma: float = setting(0.1, above=0, max=1)
    batch_size: int = setting(256, min=1)
    weight_decay: float = setting(0.0, min=0)
    mlp_hidden: list[int] = setting([2048], min=1, nonempty=True)    # MLP-4k-2k: one hidden layer of 2048
    cnn_channels: list[int] = setting([256, 256], min=1)            # CNN-1k-256-256: two convolutions' outputs
    attention_blocks: int = setting(1, min=1, max=64)              # Attention-1K-1

    def validate(self, section: str) -> None:
        if len(self.cnn_channels) != 2:
            raise GenrepError(f"{section}.cnn_channels needs the output channels of the two convolutions (e.g. "
                              f"256,256), got {len(self.cnn_channels)} values")

    def spec(self, kind: str) -> HeadSpec:
        return HeadSpec(kind=kind, hidden=tuple(self.mlp_hidden), channels=tuple(self.cnn_channels),
                        blocks=self.attention_blocks)


def head_pool(kind: str, pool: str) -> str:
    """The read-out a head trains on: map heads take the whole map, the others the pooled vector."""
    return MAP_POOL if kind in MAP_HEADS else pool


def check_head_features(method, kind: str, what: str) -> None:
    """A map head on a method whose features are vectors: one line before any work."""
    if kind in MAP_HEADS and not method.feature_maps:
        maps = ", ".join(methods_where(lambda cls: cls.feature_maps))
        raise GenrepError(f"{what}: the {kind} head needs feature maps, and {method.name}'s features are vectors; "
                          f"use the linear or mlp head, or a method with maps ({maps})")


def fit_head(ctx, kind: str, s: HeadSettings, xtr: torch.Tensor, xte: torch.Tensor) -> dict:
    """Train head ``kind`` on cached train features, score it on the test features; JSON-ready."""
    r = train_head(s.spec(kind), xtr, ctx.train.labels, xte, ctx.test.labels, ctx.train.num_classes,
                   epochs=s.epochs, lr=s.lr, step_every=s.step_every, gamma=s.gamma, batch_size=s.batch_size,
                   weight_decay=s.weight_decay, seed=ctx.ev.seed, device=ctx.device, bf16=ctx.bf16)
    return r.to_dict()
