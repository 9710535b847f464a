"""Pre-LN transformer block (ViT / GPT-2 style)."""

import torch
from torch import nn

from .attention import Attention


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)  # dropout on the branch output, before the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def modulate(x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if scale_shift is None:
        return x
    scale, shift = scale_shift
    return x * (1 + scale) + shift


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)).

    ``scale_shift`` (GenViT's timestep conditioning, eq. 21) modulates the residual stream as
    x * (1 + scale) + shift before the attention and again before the MLP. It acts on the stream, not
    only on the normalised branch input: with one scalar per token a LayerNorm right after it would
    undo both the scale and the shift.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = modulate(x, scale_shift)
        x = x + self.attn(self.norm1(x), mask=mask, causal=causal)
        x = modulate(x, scale_shift)
        return x + self.mlp(self.norm2(x))
