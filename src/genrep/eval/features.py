"""Batched frozen-feature extraction, cached in the run folder.

Features are a pure function of (weights, data split, layer, pool), so they are cached as
safetensors under ``RUN/cache/`` keyed by those; a cache entry records the weights' checkpoint step
and is ignored when the weights changed (a resumed run that trained further).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..io import atomic_save_safetensors
from ..methods import Method


def image_batches(images: torch.Tensor, batch_size: int, device: torch.device | str, *, progress: bool = False,
                  desc: str = "batches"):
    """uint8 [N, C, H, W] images -> float batches in [0, 1] on ``device``, with a tqdm bar when ``progress``."""
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
    for i in starts:
        yield images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)


def extract_features(method: Method, images: torch.Tensor, *, layer: int | None = None, pool: str | None = None,
                     batch_size: int = 512, device: torch.device | str = "cpu", bf16: bool = False,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 [N, D] (or maps [N, C, h, w]) on the CPU, with the method in eval mode."""
    return extract_feature_sets(method, images, [(layer, pool)], batch_size=batch_size, device=device, bf16=bf16,
                                progress=progress, desc=desc)[0]


@torch.no_grad()
def extract_feature_sets(method: Method, images: torch.Tensor, reads: list[tuple[int | None, str | None]], *,
                         batch_size: int = 512, device: torch.device | str = "cpu", bf16: bool = False, progress: bool = False,
                         desc: str = "features") -> list[torch.Tensor]:
    """Several (layer, pool) read-outs of uint8 [N, C, H, W] images from one pass per batch
    (``Method.feature_sets``), each float32 [N, ...] on the CPU."""
    method.eval()
    device = torch.device(device)
    chunks: list[list[torch.Tensor]] = [[] for _ in reads]
    for x in image_batches(images, batch_size, device, progress=progress, desc=desc):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outs = method.feature_sets(x, reads)
        for chunk, f in zip(chunks, outs):
            chunk.append(f.float().cpu())
    return [torch.cat(c) for c in chunks]


def read_cache(run: Path, key: str, version: str) -> torch.Tensor | None:
    """``RUN/cache/<key>.safetensors`` if it was made from weights ``version`` (None: absent, stale or damaged)."""
    path = Path(run) / "cache" / f"{key}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("version") == version:
                    return f.get_tensor("features")
        except (SafetensorError, OSError):
            pass  # a damaged cache is recomputed, never trusted
    return None


def write_cache(run: Path, key: str, version: str, feats: torch.Tensor) -> None:
    atomic_save_safetensors(Path(run) / "cache" / f"{key}.safetensors", {"features": feats.contiguous()},
                            {"version": version})


def cached_features(run: Path, key: str, version: str, compute) -> torch.Tensor:
    """Load ``RUN/cache/<key>.safetensors`` if it was made from weights ``version``, else compute and store."""
    feats = read_cache(run, key, version)
    if feats is None:
        feats = compute()
        write_cache(run, key, version, feats)
    return feats
