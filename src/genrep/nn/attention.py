"""Multi-head attention through PyTorch's fused scaled_dot_product_attention (SDPA).

One module serves four uses: plain self-attention (ViT), causal self-attention with a KV cache for
sampling (iGPT), a second stream whose queries read another stream's keys and values (XLNet/GVP's
query stream, ``context=``), and rotary positions on queries and keys (``rope=``, 2D for DARL).

Which SDPA kernels a call allows (CUDA; the CPU has a fused kernel and the math path):
- no mask: flash, memory-efficient, cuDNN or math;
- ``is_causal=True`` with as many queries as keys (training, or a cache's prefill): flash and
  memory-efficient too, since the mask is never materialised;
- one new token against a cache: no mask at all (it may see every cached key), so flash again;
- several new tokens against a non-empty cache, or an explicit boolean ``mask`` (shared or per
  batch): memory-efficient or math only, since flash takes no arbitrary mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache


def causal_mask(n_queries: int, n_keys: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """[n_queries, n_keys] bool: query i sits at position offset + i and sees keys 0 .. offset + i."""
    q = torch.arange(offset, offset + n_queries, device=device)
    return torch.arange(n_keys, device=device) <= q[:, None]


def _sdpa_mask(mask: torch.Tensor | None, is_causal: bool, B: int, H: int, n_q: int, n_k: int, offset: int,
               device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The (attn_mask, is_causal) pair SDPA gets: the cheapest one that means the request."""
    if mask is not None:
        if is_causal:
            raise ValueError("pass either mask or is_causal=True, not both; fold the causal part into the mask "
                             "(see attention.causal_mask)")
        shared = mask.ndim == 2 and mask.shape == (n_q, n_k)
        batched = mask.ndim == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H) \
            and mask.shape[2:] == (n_q, n_k)
        if mask.dtype != torch.bool or not (shared or batched):
            raise ValueError(f"attention mask must be bool (True: may attend) of shape [{n_q}, {n_k}], [1, 1, "
                             f"{n_q}, {n_k}] or [{B}, 1, {n_q}, {n_k}]; got {mask.dtype} {list(mask.shape)}")
        return mask, False
    if not is_causal:
        return None, False
    if offset == 0 and n_q == n_k:
        return None, True
    if n_q == 1 and n_k == offset + 1:  # the newest token sees every cached key
        return None, False
    # SDPA's own is_causal aligns the mask to the top left, i.e. as if the queries started at position 0
    return causal_mask(n_q, n_k, offset, device), False


class Attention(nn.Module):
    """Multi-head attention with a fused q/k/v projection ``qkv`` and an output projection ``proj``.

    ``rope`` (a ``rope.RoPE1D``/``RoPE2D``, optional) rotates queries and keys after the head split; it
    may also be passed per call, which wins over the one held here. RoPE has no state, so holding one
    changes no state-dict key.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, rope: nn.Module | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, is_causal: bool = False,
                context: torch.Tensor | None = None, rope: nn.Module | None = None,
                positions: torch.Tensor | None = None, context_positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D].

        mask: bool, True where a query may attend: [N, S], [1, 1, N, S] or [B, 1, N, S] (S keys: the
        context's, plus the cached ones). is_causal: query i sees keys up to its own position (with a
        cache, positions continue from ``cache.length``). context: [B, M, D], the keys and values come
        from it (queries from x) through the same ``qkv`` weights. positions / context_positions: RoPE
        positions of x's / the context's tokens ([N] or [B, N]; [N, 2] or [B, N, 2] in 2D); by default
        consecutive from the cache offset (1D only). cache: keys and values of earlier tokens; this
        call's keys and values are appended to it and the queries attend over all of them.
        """
        if x.ndim != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"attention takes tokens [B, N, {self.qkv.in_features}], got {list(x.shape)}")
        B, N, D = x.shape
        H = self.num_heads
        if context is None:
            q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        else:
            if context.ndim != 3 or context.shape[0] != B or context.shape[2] != D:
                raise ValueError(f"context must be [B={B}, M, D={D}] like x, got {list(context.shape)}")
            q, k, v = self._two_stream_qkv(x, context)
        offset = cache.length if cache is not None else 0
        rope = self.rope if rope is None else rope
        if rope is not None:
            if positions is None:
                positions = rope.default_positions(N, offset, x.device)
            if context is None:
                context_positions = positions
            elif context_positions is None:
                context_positions = rope.default_positions(k.shape[2], offset, x.device)
            q, k = rope(q, positions), rope(k, context_positions)
        if cache is not None:
            k, v = cache.append(k, v)
        attn_mask, causal = _sdpa_mask(mask, is_causal, B, H, N, k.shape[2], offset, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))

    def _two_stream_qkv(self, x: torch.Tensor, context: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x, k and v from the context, through the rows of the fused weight (no new parameters)."""
        (B, N, D), M, H = x.shape, context.shape[1], self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:D], None if b is None else b[:D]).view(B, N, H, D // H).transpose(1, 2)
        kv = F.linear(context, w[D:], None if b is None else b[D:]).view(B, M, 2, H, D // H)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return q, k, v
