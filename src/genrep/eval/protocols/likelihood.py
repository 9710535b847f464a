"""The likelihood protocol: bits/dim of test images under the method's ``nll`` (a diffusion model's bound,
over the terms its option ``model.nll_terms`` says; a colour-token model's exact likelihood of the quantized
image, whose unit the method names and the result records)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...fields import setting
from ..features import image_batches
from .context import EvalContext


UNIT = "bits/dim"


@dataclass
class LikelihoodSettings:
    n: int = setting(1000, min=1)   # test images


def nll_terms(cs: dict) -> int | str:
    """The number of terms of the bound as the method reports it (``"all"`` for the whole bound)."""
    return cs.get("terms") or "all"


@torch.no_grad()
def run(ctx: EvalContext) -> dict:
    images, _ = ctx.test_subset(ctx.ev.likelihood.n)
    ctx.method.eval()
    # one CPU generator for the whole pass, as the OOD bpd score: the same images give the same estimate
    g = torch.Generator().manual_seed(ctx.ev.seed)
    bpd = torch.cat([ctx.method.nll(x, generator=g).double().cpu()
                     for x in image_batches(images, ctx.ev.batch_size, ctx.device, progress=ctx.progress,
                                            desc="bits/dim")])
    cs = ctx.method.capability_settings("nll")
    out = {"bpd": float(bpd.mean()), "bpd_sem": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
           "n": len(bpd), "terms": nll_terms(cs), "unit": cs.get("unit", UNIT), "nll": cs}
    if "bits_per_token_factor" in cs:  # a model of quantized tokens: bits per token beside bits per sub-pixel
        out["bits_per_token"] = out["bpd"] * cs["bits_per_token_factor"]
    return out
