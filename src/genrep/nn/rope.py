"""Rotary position embeddings (RoPE, Su et al.) for attention's queries and keys, in 1D and in 2D.

Convention: rotate-half (the GPT-NeoX / LLaMA layout). Channel i of a head pairs with channel i + d/2,
and the pair turns by the angle ``pos * base ** (-2i / d)``: as a complex number,
``x[i] + 1j * x[i + d/2]`` is multiplied by ``exp(1j * pos * theta_i)``. A query at position m and a
key at position n then score ``Re(sum q_i conj(k_i) exp(1j * (m - n) * theta_i))``, a function of m - n
only.

2D RoPE is decomposed by axis: the first half of each head's channels is a 1D RoPE of the row, the
second half a 1D RoPE of the column (each half in its own rotate-half layout), so a head dim must be
divisible by 4.

Token layout of a ViT (``token_positions``): in 1D, token i (prefix tokens included) sits at position i.
In 2D, prefix tokens (CLS) sit at (0, 0), which is the identity rotation, i.e. they are left unrotated,
and patch (r, c) sits at (r + 1, c + 1), one step past the prefix on both axes so that no patch
shares the prefix's position.

The angles are computed on the fly in float32 from the positions (no buffers: nothing enters a
state dict, and ``module.to(bfloat16)`` cannot round the frequencies); the rotation runs in float32
and is cast back to the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

ROPES = ("1d", "2d")


def _frequencies(dim: int, base: float, device: torch.device) -> torch.Tensor:
    """theta_i = base ** (-2i / dim) for the dim / 2 pairs, float32."""
    return base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE of x [..., N, d] at positions [..., N] (broadcastable against x without its last dim)."""
    theta = positions.float()[..., None] * _frequencies(x.shape[-1], base, x.device)
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class _RoPE(nn.Module):
    ndim: int

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def interpolate(self, positions: torch.Tensor, trained_grid: int, grid: int) -> torch.Tensor:
        """``positions`` of a ``grid`` x ``grid`` patch layout scaled into the range of the ``trained_grid`` one
        (position interpolation: weights trained on one image size read another, DARL section 3.4). A 2D
        position scales with the side; a 1D one, a place in the sequence, with the side's square."""
        if not trained_grid or trained_grid == grid:
            return positions
        scale = trained_grid / grid
        return positions * (scale if self.ndim == 2 else scale ** 2)

    def _check(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """positions -> [N, ...] or [B, 1, N, ...], broadcastable against x [B, H, N, Dh]."""
        if x.ndim != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE rotates [B, heads, N, {self.head_dim}] queries or keys, got {list(x.shape)}")
        B, N = x.shape[0], x.shape[2]
        pairs = self.ndim == 2
        lead = positions.shape[:-1] if pairs else positions.shape
        if (pairs and (positions.ndim == 0 or positions.shape[-1] != 2)) or len(lead) not in (1, 2) \
                or lead[-1] != N or (len(lead) == 2 and lead[0] not in (1, B)):
            want = "[N, 2] or [B, N, 2] (row, col)" if pairs else "[N] or [B, N]"
            raise ValueError(f"{self.ndim}D RoPE positions must be {want} with N={N}, B={B}; "
                             f"got {list(positions.shape)}")
        return positions[:, None] if len(lead) == 2 else positions


class RoPE1D(_RoPE):
    """1D RoPE over the whole head: ``rope(x [B, H, N, Dh], positions [N] or [B, N]) -> x rotated``."""

    ndim = 1

    def __init__(self, head_dim: int, base: float = 10000.0):
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"1D RoPE rotates channel pairs: the head dim must be even, got {head_dim}")
        super().__init__(head_dim, base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, self._check(x, positions), self.base)

    def default_positions(self, n: int, offset: int, device: torch.device) -> torch.Tensor:
        """Consecutive positions offset .. offset + n - 1 (a cache's new tokens follow the cached ones)."""
        return torch.arange(offset, offset + n, device=device)

    @staticmethod
    def token_positions(grid: int, num_prefix: int, device: torch.device | None = None) -> torch.Tensor:
        """[num_prefix + grid^2]: token i at position i, patches in raster order after the prefix."""
        return torch.arange(num_prefix + grid * grid, device=device)


class RoPE2D(_RoPE):
    """Axial 2D RoPE: ``rope(x [B, H, N, Dh], positions [N, 2] or [B, N, 2] as (row, col)) -> x rotated``.

    Channels [0, Dh/2) turn with the row, [Dh/2, Dh) with the column."""

    ndim = 2

    def __init__(self, head_dim: int, base: float = 10000.0):
        if head_dim <= 0 or head_dim % 4:
            raise ValueError(f"2D RoPE splits each head into a row half and a column half of channel pairs: "
                             f"the head dim must be divisible by 4, got {head_dim}")
        super().__init__(head_dim, base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        positions = self._check(x, positions)
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([rotate(rows, positions[..., 0], self.base),
                          rotate(cols, positions[..., 1], self.base)], dim=-1)

    def default_positions(self, n: int, offset: int, device: torch.device) -> torch.Tensor:
        raise ValueError("2D RoPE needs (row, col) positions: pass positions=[N, 2] (see RoPE2D.token_positions)")

    @staticmethod
    def token_positions(grid: int, num_prefix: int, device: torch.device | None = None) -> torch.Tensor:
        """[num_prefix + grid^2, 2]: prefix tokens at (0, 0) (unrotated), patch (r, c) at (r + 1, c + 1)."""
        coords = torch.arange(1, grid + 1, device=device)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")
        patches = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        return torch.cat([patches.new_zeros(num_prefix, 2), patches])


def make_rope(kind: str | None, head_dim: int, base: float = 10000.0) -> _RoPE | None:
    """``None`` -> None, ``"1d"`` -> RoPE1D, ``"2d"`` -> RoPE2D."""
    if kind is None:
        return None
    if kind == "1d":
        return RoPE1D(head_dim, base)
    if kind == "2d":
        return RoPE2D(head_dim, base)
    raise ValueError(f"unknown RoPE {kind!r}; choose None or one of {', '.join(ROPES)}")
