"""The generation protocol: FID, KID and Inception Score of the method's samples against the training set
(sampler and steps are the method's own options, ``model.sampler`` / ``model.sample_steps``), and a grid."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ...fields import setting
from ..distributed import batch_generator, map_batches
from .context import EvalContext

EXTRACTORS = ("inception", "classifier")


@dataclass
class GenerationSettings:
    samples: int = setting(10000, min=2)
    # inception: Inception v3 (needs local weights); classifier: custom, a small CNN trained on the data set
    extractor: str = setting("inception", choices=EXTRACTORS)
    inception_weights: str = ""     # path; or the environment variable GENREP_INCEPTION_WEIGHTS


def extractor_for(ctx: EvalContext):
    from ..metrics.extractors import dataset_classifier_extractor, inception_extractor

    s = ctx.ev.generation
    if s.extractor == "inception":
        return inception_extractor(s.inception_weights or None)
    from ...data.datasets import default_data_root
    return dataset_classifier_extractor(ctx.train, ctx.test, cache_dir=default_data_root() / "extractors",
                                        seed=ctx.ev.seed, device=ctx.device)


def check(ctx: EvalContext) -> None:
    """A missing Inception weights file fails before minutes of sampling (the classifier is trained when needed)."""
    if ctx.ev.generation.extractor == "inception":
        extractor_for(ctx)


def draw(ctx: EvalContext, n: int) -> torch.Tensor:
    """``n`` samples as uint8 on the CPU, drawn in batches of ``eval.batch_size``, each from its own generator
    seeded by (``eval.seed``, the batch): under torchrun the batches are dealt out over the processes, and the
    samples are the same for any number of them."""
    bs, d = ctx.ev.batch_size, ctx.method.data

    def one(start: int, size: int) -> torch.Tensor:
        g = batch_generator(ctx.ev.seed, start, bs)
        return (ctx.method.sample(size, generator=g) * 255).round().to(torch.uint8)

    return map_batches(n, bs, one, (d.channels, d.image_size, d.image_size), torch.uint8, progress=ctx.progress,
                       desc=f"sampling {n} images")


def run(ctx: EvalContext) -> dict:
    from ...data.datasets import default_data_root
    from ..metrics.generation import generation_metrics
    from ..report.samples import display_scale, grid, save_png

    extractor = extractor_for(ctx)
    n = ctx.ev.generation.samples
    t0 = time.perf_counter()
    fake = draw(ctx, n)
    sample_seconds = time.perf_counter() - t0
    scores = generation_metrics(fake, ctx.train.images, extractor, batch_size=ctx.ev.batch_size, device=ctx.device,
                                reference_cache=default_data_root() / "fid-reference", progress=ctx.progress)
    scores["not_computed"] = scores.pop("skipped", {})  # "skipped" means a whole protocol did not apply
    path = ctx.figure("samples")
    k = min(64, n)
    save_png(grid(fake[:k].float() / 255, nrow=math.ceil(math.sqrt(k))), path, display_scale(fake.shape[-1]))
    return {**scores, "sample": ctx.method.capability_settings("sample"),
            "sampling_seconds": round(sample_seconds, 2), "reference": f"{ctx.cfg.data.name} train",
            "figures": {"samples": ctx.rel(path)}}
