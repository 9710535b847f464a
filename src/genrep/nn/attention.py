"""Multi-head self-attention through PyTorch's fused scaled_dot_product_attention.

SDPA picks flash or memory-efficient kernels on CUDA when the mask allows it (no mask, or
``is_causal``); an explicit boolean mask falls back to the math or efficient kernel.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x: [B, N, D]. mask: bool, True where attention is allowed, broadcastable to [B, H, N, N]."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))
