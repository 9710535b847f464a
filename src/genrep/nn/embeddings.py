"""Positional and timestep embeddings."""

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] with sin on the first half and cos on the second (MAE/DiT layout)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding [grid*grid, dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.float()


class PositionEmbedding(nn.Module):
    """Added to tokens: ``learned`` (trunc-normal init, std 0.02), fixed ``sincos`` (a buffer) or ``none``
    (nothing added: positions come from RoPE, or the model does without)."""

    def __init__(self, num_tokens: int, dim: int, kind: str = "learned", grid: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
        elif kind == "sincos":
            grid = grid or round(num_tokens ** 0.5)
            if grid * grid != num_tokens:
                raise ValueError(f"sincos positions need a square grid, got {num_tokens} tokens")
            self.register_buffer("pos", sincos_2d(dim, grid)[None], persistent=False)
        elif kind != "none":
            raise ValueError(f"unknown position embedding {kind!r}; choose 'learned', 'sincos' or 'none'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.kind == "none" else x + self.pos


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] (DDPM / DiT layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP, as in DDPM and DiT."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))
