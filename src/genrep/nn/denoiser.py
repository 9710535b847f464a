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
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedder
from .flops import linear_flops
from .patch import unpatchify
from .vit import ViT, _init_weights

MODULATIONS = ("token", "channel")


class TimeModulation(nn.Module):
    """Time embedding [B, E] -> (scale, shift), each [B, tokens, 1] (token) or [B, 1, dim] (channel)."""

    def __init__(self, emb_dim: int, tokens: int, dim: int, per: str):
        super().__init__()
        self.per = per
        self.proj = nn.Linear(emb_dim, 2 * (tokens if per == "token" else dim))
        # zero: every layer starts as the plain ViT and learns how much time to let in (DiT's adaLN-zero habit)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.proj(nn.functional.silu(emb)).chunk(2, dim=-1)
        if self.per == "token":
            return scale.unsqueeze(-1), shift.unsqueeze(-1)
        return scale.unsqueeze(1), shift.unsqueeze(1)

    def flops(self) -> int:
        return linear_flops(1, self.proj.in_features, self.proj.out_features)


class DenoiserViT(ViT):
    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, cls_token: bool = True, pos_embed: str = "learned", drop: float = 0.0,
                 modulation: str = "token"):
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown time modulation {modulation!r}; choose one of {', '.join(MODULATIONS)}")
        super().__init__(image_size, patch_size, in_chans, dim, depth, num_heads, mlp_ratio, cls_token, pos_embed,
                         drop)
        tokens = self.patch_embed.num_patches + self.num_prefix
        self.time_embed = TimestepEmbedder(dim)
        self.time_embed.apply(_init_weights)
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
        if t is None:
            return super().forward(x, layer)
        emb = self.time_embed(t)
        untimed = x.shape[0] - t.shape[0]
        scale_shifts = []
        for mod in self.modulations[:layer]:
            scale_shift = mod(emb)
            if untimed:  # zero scale and shift in front: x * (1 + 0) + 0 is the untimed pass
                scale_shift = tuple(F.pad(v, (0, 0, 0, 0, untimed, 0)) for v in scale_shift)
            scale_shifts.append(scale_shift)
        return super().forward(x, layer, scale_shifts)

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
