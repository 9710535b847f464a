"""XLNet's two-stream attention over one stack of transformer blocks (GVP section 4.2; DARL's random order).

The content stream h encodes the tokens it may see; the query stream g predicts a token from its position alone: g's
queries read h's keys and values (of the same layer's input) through the same weights, so the two streams share every
parameter and differ only in their masks. A block runs twice per layer, once per stream; the query stream never
feeds the content stream, so reading features needs the content stream only.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformer import Block
from .vit import _init_weights, drop_path_rates


class TwoStreamTransformer(nn.Module):
    """``depth`` pre-LN blocks and a final LayerNorm, run as one stream (``content``) or two (``forward``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop=drop, drop_path=rate)
                                    for rate in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.depth = depth
        self.apply(_init_weights)

    def forward(self, h: torch.Tensor, g: torch.Tensor, *, content_mask: torch.Tensor | None = None,
                content_causal: bool = False, query_mask: torch.Tensor | None = None, rope: nn.Module | None = None,
                positions: torch.Tensor | None = None, query_positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams through every block: h [B, N, D] under ``content_mask`` (or ``content_causal``), g [B, M, D]
        under ``query_mask`` ([M, N] or [B, 1, M, N]: query row i may read content column j). ``rope`` rotates both
        streams' queries and keys at ``positions`` (the content tokens') and ``query_positions``. Returns both after
        the final norm."""
        h, g = two_streams(self.blocks, h, g, content_mask=content_mask, content_causal=content_causal,
                           query_mask=query_mask, rope=rope, positions=positions, query_positions=query_positions)
        return self.norm(h), self.norm(g)

    def content(self, h: torch.Tensor, *, mask: torch.Tensor | None = None, is_causal: bool = False,
                layer: int | None = None, hidden: list[torch.Tensor] | None = None, rope: nn.Module | None = None,
                positions: torch.Tensor | None = None, cache: list | None = None) -> torch.Tensor:
        """The content stream alone after block ``layer`` (1-based; None: all, then the final norm). ``hidden``
        collects each block's output (the last one after the norm when it is the last block); ``cache``: one
        ``KVCache`` per block, for decoding a few tokens at a time."""
        layer = self.depth if layer is None else layer
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in 1..{self.depth}, got {layer}")
        for i, block in enumerate(self.blocks[:layer]):
            h = block(h, mask=mask, is_causal=is_causal, rope=rope, positions=positions,
                      cache=None if cache is None else cache[i])
            if hidden is not None:
                hidden.append(h)
        if layer == self.depth:
            h = self.norm(h)
            if hidden is not None:
                hidden[-1] = h
        return h


def two_streams(blocks, h: torch.Tensor, g: torch.Tensor, *, content_mask: torch.Tensor | None = None,
                content_causal: bool = False, query_mask: torch.Tensor | None = None, rope: nn.Module | None = None,
                positions: torch.Tensor | None = None, query_positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams through ``blocks`` (any stack of ``Block``, e.g. a ViT's), no final norm: each block runs the
    content stream on itself and the query stream on the content stream's keys and values of the same input."""
    for block in blocks:
        h, g = (block(h, mask=content_mask, is_causal=content_causal, rope=rope, positions=positions),
                block(g, mask=query_mask, context=h, rope=rope, positions=query_positions, context_positions=positions))
    return h, g
