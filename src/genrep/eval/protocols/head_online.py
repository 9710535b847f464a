"""A head trained on features read again every epoch: each training image gets a new augmentation (flip, or random
resized crop and flip) and, with fresh noise, a new noise draw, and the frozen network reads it once per epoch,
batched on the evaluation device at the extraction precision. The test images are read once, unaugmented,
with the read-out's own noise (deterministic unless ``model.feature_noise`` is fresh).

Why not a cache of E variants (noise x flip) per image: the paper's attention head reads a 1024 x 16 x 16 map per
image, 1 MiB in float32, so ImageNet-1k's 1.28M images hold 1.3 TB per variant; reading on the fly costs one
U-Net pass (to the read-out's block) per image per epoch instead, and nothing on disk. No feature made here is
cached: the cache holds deterministic read-outs only.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ...data.augment import Augmentation, augment
from ..features import image_batches, precision_autocast
from ..metrics.heads import train_head_streamed
from .context import EvalContext

STATS_IMAGES = 10_000  # train images whose read-out standardises the head's inputs (head.standardize)
AUGMENT_SEED = 0x5EED  # apart from the shuffle's seed, so the flips are not a function of the order


def augment_batch(x: torch.Tensor, kind: str, crop_scale: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, C, H, W] on the device -> float [0, 1] with augmentation ``kind`` (none, flip, crop_flip), its
    parameters drawn from the CPU ``generator``."""
    if kind == "crop_flip":  # the crop kind is MAE's: RandomResizedCrop (bicubic) and a flip
        return augment(x, Augmentation("crop", crop_scale=crop_scale), generator)
    x = x.float().div_(255)
    if kind == "flip":
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


def fit_head_streamed(ctx: EvalContext, kind: str, s, layer: int, pool: str, *, fresh: bool) -> dict:
    """Train head ``kind`` (settings ``s``, a ``HeadSettings``) on the read-out (``layer``, ``pool``) of the training
    images, augmented with ``s.augment`` and, with ``fresh``, noised anew every epoch; JSON-ready."""
    method, device, precision = ctx.method, ctx.device, ctx.precision
    schedule = s.schedule(kind)
    images, n = ctx.train.images, len(ctx.train)
    method.eval()
    augment_gen = torch.Generator().manual_seed(ctx.ev.seed + AUGMENT_SEED)
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=schedule["epochs"] * math.ceil(n / schedule["batch_size"]), unit="batch", leave=False,
                   dynamic_ncols=True, disable=None, desc=f"{kind} head, features read every epoch")

    def read(x: torch.Tensor, draw: int | None = None) -> torch.Tensor:
        noise = method.fresh_noise(draw) if draw is not None else nullcontext()
        with torch.no_grad(), precision_autocast(device, precision), noise:
            return method.feature_sets(x, [(layer, pool)])[0].float()

    def train_batch(rows: torch.Tensor, epoch: int) -> torch.Tensor:
        x = augment_batch(images[rows].to(device, non_blocking=True), s.augment, s.crop_scale, augment_gen)
        if bar is not None:
            bar.update(1)
        return read(x, epoch if fresh else None)

    def test_batches():
        return (read(x) for x in image_batches(ctx.test.images, ctx.ev.batch_size, device))

    def stats_batches():
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.ev.seed))[:STATS_IMAGES]
        return (read(images[r].to(device, non_blocking=True).float().div_(255))
                for r in rows.split(ctx.ev.batch_size))

    in_shape = tuple(read(images[:1].to(device).float().div_(255)).shape[1:])
    try:
        r = train_head_streamed(s.spec(kind), in_shape, ctx.train.labels, ctx.test.labels, ctx.train.num_classes,
                                train_batch=train_batch, test_batches=test_batches,
                                stats_batches=stats_batches if s.standardize else None, **schedule,
                                seed=ctx.ev.seed, device=device, bf16=ctx.bf16)
    finally:
        if bar is not None:
            bar.close()
    return r.to_dict()
