"""A plain ViT encoder (timm/DeiT layout) whose every layer can be read out for probes."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import PositionEmbedding
from .patch import PatchEmbed
from .transformer import Block

POOLS = ("cls", "mean", "last")


class ViT(nn.Module):
    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, cls_token: bool = True, pos_embed: str = "learned", drop: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.num_prefix = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = PositionEmbedding(self.patch_embed.num_patches, dim, pos_embed)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop=drop) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim, self.depth = dim, depth
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(self.patch_embed(x))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def check_layer(self, layer: int | None) -> int:
        layer = self.depth if layer is None else layer
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in 1..{self.depth}, got {layer}")
        return layer

    def forward(self, x: torch.Tensor, layer: int | None = None, scale_shifts: list | None = None) -> torch.Tensor:
        """Tokens after block ``layer`` (1-based; None or depth: the last block, then the final norm).

        ``scale_shifts``: one (scale, shift) per block to modulate it (see ``transformer.Block``), or None."""
        layer = self.check_layer(layer)
        h = self.tokens(x)
        for i, block in enumerate(self.blocks[:layer]):
            h = block(h, scale_shift=scale_shifts[i] if scale_shifts is not None else None)
        return self.norm(h) if layer == self.depth else h

    def pool(self, h: torch.Tensor, pool: str) -> torch.Tensor:
        if pool == "cls":
            if self.cls_token is None:
                raise ValueError("pool 'cls' needs a CLS token; this model has none (use 'mean')")
            return h[:, 0]
        if pool == "mean":
            return h[:, self.num_prefix:].mean(dim=1)
        if pool == "last":
            return h[:, -1]
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):  # patch embedding: initialise like a linear layer (MAE)
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        nn.init.zeros_(m.bias)
