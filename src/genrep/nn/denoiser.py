"""GenViT's network: a ViT that takes a diffusion step and returns an image-shaped prediction.

The step t is embedded (sinusoidal, then an MLP, as in DDPM) and mapped in every layer to a scale
and a shift of the residual stream (``transformer.Block``). The paper's public code maps it to one
scalar scale and shift per token; ``per-channel`` (one pair per channel, shared by the tokens, as
DiT does) is offered as an option. Without t (HybViT's classification pass) no modulation is applied
and the network is a plain ViT. One batch can mix the two: images without a step get a zero scale
and shift, which is exactly the untimed pass, so HybViT runs its classification and diffusion
mini-batches through one forward (half the kernel launches, twice the work per kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import TimestepEmbedder
from .flops import linear_flops
from .patch import unpatchify
from .transformer import MODULATIONS, TimeModulation
from .vit import ViT, _init_weights

__all__ = ["MODULATIONS", "DenoiserViT", "TimeModulation"]


class DenoiserViT(ViT):
    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, cls_token: bool = True, pos_embed: str = "learned", drop: float = 0.0,
                 modulation: str = "token", drop_path: float = 0.0):
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown time modulation {modulation!r}; choose one of {', '.join(MODULATIONS)}")
        # drop_path: 0 by default, as the paper's code builds HybViT's network ('difvit', stochastic_depth=0)
        super().__init__(image_size, patch_size, in_chans, dim, depth, num_heads, mlp_ratio, cls_token, pos_embed,
                         drop, drop_path=drop_path)
        tokens = self.patch_embed.num_patches + self.num_prefix
        self.time_embed = TimestepEmbedder(dim)
        self.time_embed.apply(_init_weights)
        # ViT hands modulations[i] to block i with the time embedding as ``cond``
        self.modulations = nn.ModuleList(TimeModulation(dim, tokens, dim, modulation) for _ in range(depth))
        self.to_patches = nn.Linear(dim, patch_size * patch_size * in_chans)
        nn.init.zeros_(self.to_patches.weight)  # predicts zero at first: the mean of eps (DiT)
        nn.init.zeros_(self.to_patches.bias)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor, layer: int | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after block ``layer``.

        ``t``: steps [B_t] of the *last* B_t images of the batch (B_t <= B); the images before them get
        no time input. None: no image does.
        """
        layer = self.check_layer(layer)
        return super().forward(x, layer, cond=None if t is None else self.time_embed(t))

    def hidden_states(self, x: torch.Tensor, upto: int, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Tokens after each block 1..``upto`` (``t`` as in ``forward``)."""
        return super().hidden_states(x, upto, cond=None if t is None else self.time_embed(t))

    def to_image(self, h: torch.Tensor) -> torch.Tensor:
        """Final tokens [B, prefix + N, D] -> the image-shaped prediction [B, C, H, W]."""
        return unpatchify(self.to_patches(h[:, self.num_prefix:]), self.patch_embed.patch_size, self.in_chans)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] noisy input and steps [B] -> the image-shaped prediction (eps or x0)."""
        return self.to_image(self(x_t, t=t))

    def conditioning_flops(self) -> int:
        """Forward FLOPs of the time embedding and the per-layer modulation maps (one image)."""
        mlp = self.time_embed.mlp
        return (linear_flops(1, mlp[0].in_features, mlp[0].out_features)
                + linear_flops(1, mlp[2].in_features, mlp[2].out_features)
                + sum(m.flops() for m in self.modulations))
