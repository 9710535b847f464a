"""Reading a spatial feature map [B, C, h, w] (a U-Net block's output, a ViT's patch grid) as a feature: the map
itself ('map'), the map average-pooled to at most s x s and kept a map ('maps': what the attention head reads, so
its cache holds 8x8 maps, not 16x16), or its p x p average pool, flattened ('p')."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAP_POOL = "map"


def bounded_map_side(pool: str) -> int | None:
    """s of a pooling 'maps' (the map pooled to at most s x s), else None."""
    side = pool[len(MAP_POOL):]
    return int(side) if pool.startswith(MAP_POOL) and side.isdigit() and int(side) >= 1 else None


def is_map_pool(pool: str) -> bool:
    """'map', 'maps' or a size p: the poolings of a feature map."""
    return pool == MAP_POOL or pool.isdigit() or bounded_map_side(pool) is not None


def reads_map(pool: str) -> bool:
    """Whether a pooling gives a map [B, C, h, w] ('map', 'maps'), not a vector."""
    return pool == MAP_POOL or bounded_map_side(pool) is not None


def pool_feature_map(fmap: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, C, h, w] -> the map itself ('map'), its adaptive average pool to min(h, s) x min(w, s) ('maps'), or to
    p x p, flattened [B, C*p*p] ('p')."""
    if pool == MAP_POOL:
        return fmap
    side = bounded_map_side(pool)
    if side is not None:
        return F.adaptive_avg_pool2d(fmap, (min(fmap.shape[-2], side), min(fmap.shape[-1], side)))
    return F.adaptive_avg_pool2d(fmap, int(pool)).flatten(1)
