"""Reading a spatial feature map [B, C, h, w] (a U-Net block's output, a ViT's patch grid) as a feature: the map
itself, or its p x p average pool, flattened."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAP_POOL = "map"


def is_map_pool(pool: str) -> bool:
    """'map', or a size p: the poolings of a feature map."""
    return pool == MAP_POOL or pool.isdigit()


def pool_feature_map(fmap: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, C, h, w] -> the map itself ('map') or its adaptive average pool to p x p, flattened [B, C*p*p]."""
    if pool == MAP_POOL:
        return fmap
    return F.adaptive_avg_pool2d(fmap, int(pool)).flatten(1)
