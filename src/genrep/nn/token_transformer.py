"""iGPT's transformer over a grid of discrete tokens (colour indices), shared by iGPT, SimCLR and GCRL.

Input k is the embedding of a token plus a 2D positional embedding (one learned vector per row plus one per
column, added after the token embedding as GCRL's section 3.2 says). An autoregressive model shifts the sequence
right by one behind a learned start token, so that the output at position k predicts token k from tokens < k
(iGPT's ``sos``). Blocks are eq. 4 of the GCRL paper (pre-LN, attention, MLP, dropout before every residual);
the attention is dense (causal or not) or GCRL's axial block (Algorithm 1), which is raster-causal by
construction. The output layer is a separate, untied linear map to the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .axial import AxialBlock, axial_attention_flops
from .flops import linear_flops, transformer_block_flops
from .kv_cache import KVCache
from .transformer import Block

ATTENTIONS = ("dense", "axial")


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int, height: int, width: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop: float = 0.1, attention: str = "dense", drop_path: float = 0.0,
                 start_token: bool = True, head: bool = True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
        self.vocab, self.height, self.width, self.dim, self.depth = vocab, height, width, dim, depth
        self.mlp_ratio = mlp_ratio
        self.attention = attention
        self.tok_embed = nn.Embedding(vocab, dim)
        self.row_embed = nn.Parameter(torch.zeros(height, dim))
        self.col_embed = nn.Parameter(torch.zeros(width, dim))
        # an encoder that predicts nothing (SimCLR's) has no start token and no output layer: a parameter
        # without a gradient would stop DDP
        self.start = nn.Parameter(torch.zeros(1, 1, dim)) if start_token else None
        if attention == "axial":
            self.blocks = nn.ModuleList(AxialBlock(dim, num_heads, mlp_ratio, drop=drop, drop_path=drop_path,
                                                   height=height, width=width) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop=drop, drop_path=drop_path)
                                        for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if head else None
        self.head = nn.Linear(dim, vocab, bias=False) if head else None  # untied from tok_embed, as iGPT
        self.apply(_init_weights)
        for p in (self.row_embed, self.col_embed, self.start):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    @property
    def length(self) -> int:
        return self.height * self.width

    def positions(self, start: int = 0, n: int | None = None) -> torch.Tensor:
        """The 2D positional embeddings of raster positions start .. start + n - 1, [n, D] (only those rows: a
        decoding step asks for one)."""
        k = torch.arange(start, start + (self.length - start if n is None else n), device=self.row_embed.device)
        return self.row_embed[k // self.width] + self.col_embed[k % self.width]

    def embed(self, tokens: torch.Tensor, shift: bool) -> torch.Tensor:
        """Long tokens [B, n] (n <= H*W, raster order from position 0) -> inputs [B, n, D]. ``shift``: input k
        holds token k-1 (the start token at 0), so an autoregressive stack predicts token k at output k."""
        h = self.tok_embed(tokens)
        return self.embed_vectors(h, shift)

    def embed_vectors(self, h: torch.Tensor, shift: bool) -> torch.Tensor:
        """As ``embed`` from token embeddings [B, n, D] already looked up (the OOD score differentiates them)."""
        if shift:
            if self.start is None:
                raise ValueError("this token transformer has no start token; build it with start_token=True")
            h = torch.cat([self.start.expand(h.shape[0], -1, -1).to(h.dtype), h[:, :-1]], dim=1)
        return h + self.positions(0, h.shape[1]).to(h.dtype)

    def run(self, h: torch.Tensor, first: int = 0, last: int | None = None, *, causal: bool = True,
            cache: list[KVCache] | None = None) -> torch.Tensor:
        """Blocks first+1 .. last (1-based, inclusive; default all) on h [B, n, D]; no final norm. ``cache``: one
        ``KVCache`` per block run (dense attention), for decoding a token at a time."""
        last = self.depth if last is None else last
        for i, block in enumerate(self.blocks[first:last]):
            h = block(h, is_causal=causal, cache=None if cache is None else cache[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, n, D] -> logits over the vocabulary [B, n, V]."""
        return self.head(self.norm(h))

    def block_flops(self) -> int:
        """Forward matmul FLOPs of one block on one image's H*W tokens (causal attention counted at its full
        square, as the FLOP counter and the nanoGPT/PaLM convention do)."""
        n = self.length
        if self.attention == "dense":
            return transformer_block_flops(n, self.dim, self.mlp_ratio)
        hidden = int(self.dim * self.mlp_ratio)
        mlp = linear_flops(n, self.dim, hidden) + linear_flops(n, hidden, self.dim)
        return axial_attention_flops(self.dim, self.height, self.width) + mlp

    def head_flops(self) -> int:
        return linear_flops(self.length, self.dim, self.vocab) if self.head is not None else 0

    def new_cache(self) -> list[KVCache]:
        if self.attention != "dense":
            raise ValueError("only dense attention keeps a key/value cache; axial attention recomputes the prefix")
        return [KVCache(self.length) for _ in self.blocks]


def _init_weights(m: nn.Module) -> None:
    # GPT-2 / iGPT: normal(0, 0.02) weights, zero biases
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
