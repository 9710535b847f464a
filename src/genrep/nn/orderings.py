"""Fixed orders of an image's patches for autoregression (DARL section 4.4, appendix C).

An order is a long tensor [T] of raster indices (row * grid + col): ``order[k]`` is the patch at step k.

- raster: row by row.
- nested raster: the image cut into ``block`` x ``block``-patch blocks, the blocks in raster order, and the patches
  inside each block in raster order.
- round-robin: the same blocks; one patch from each block in turn (the first patch of every block, then the second
  of every block, ...), each block's patches in raster order.
"""

from __future__ import annotations

import torch

from ..errors import GenrepError

ORDERINGS = ("raster", "nested", "round_robin")


def _blocks(grid: int, block: int) -> torch.Tensor:
    """[blocks, patches per block] raster indices: blocks in raster order, patches in raster order inside each."""
    if block < 1 or grid % block:
        divisors = [d for d in range(1, grid + 1) if grid % d == 0]
        raise GenrepError(f"a block of {block}x{block} patches does not tile the {grid}x{grid} patch grid; choose "
                          f"a block size in {', '.join(map(str, divisors))}")
    n = grid // block
    rows = torch.arange(n).repeat_interleave(n)[:, None] * block + torch.arange(block).repeat_interleave(block)
    cols = torch.arange(n).repeat(n)[:, None] * block + torch.arange(block).repeat(block)
    return rows * grid + cols


def patch_order(kind: str, grid: int, block: int = 2) -> torch.Tensor:
    """The order ``kind`` of a ``grid`` x ``grid`` patch grid (``block``: the side of a block, in patches)."""
    if kind == "raster":
        return torch.arange(grid * grid)
    if kind == "nested":
        return _blocks(grid, block).reshape(-1)
    if kind == "round_robin":
        return _blocks(grid, block).t().reshape(-1)
    raise GenrepError(f"unknown patch ordering {kind!r}; choose one of {', '.join(ORDERINGS)}")
