"""The likelihood protocol: the method's ``nll`` of test images (a diffusion model's bound in bits/dim, over the
terms its option ``model.nll_terms`` says; a colour-token model's exact likelihood of the quantized image).

Every key says its unit. A diffusion model's result holds ``bits_per_dim``. A colour-token model's ``nll``
returns bits per sub-pixel and names the factor to bits per token (``bits_per_token_factor``, its channels);
its result holds ``bits_per_token``, the GCRL paper's and iGPT's "bpd" (table 4's iGPT-S 3.0145 is image-gpt's
2.0895 nats per token / ln 2; the ImageNet32 values, 3.11, exceed log2(512) / 3 = 3.0, so they cannot be per
sub-pixel), and ``bits_per_subpixel`` beside it. ``headline`` names the key that is the paper's figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...fields import setting
from ..distributed import batch_generator, map_batches
from ..features import image_batches
from .context import EvalContext


UNIT = "bits/dim"
# each result key's unit in words: what the summary and the report print beside its number
UNITS = {"bits_per_dim": "bits/dim",
         "bits_per_token": "bits per token of the colour-quantized image (the GCRL paper's bpd)",
         "bits_per_subpixel": "bits per sub-pixel of the colour-quantized image (bits per token / channels)"}


@dataclass
class LikelihoodSettings:
    n: int = setting(1000, min=1)   # test images


def nll_terms(cs: dict) -> int | str:
    """The number of terms of the bound as the method reports it (``"all"`` for the whole bound)."""
    return cs.get("terms") or "all"


def _mean_sem(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


@torch.no_grad()
def run(ctx: EvalContext) -> dict:
    images, _ = ctx.test_subset(ctx.ev.likelihood.n)
    ctx.method.eval()
    bs = ctx.ev.batch_size

    # a generator per batch, seeded by (eval.seed, the batch): the same images give the same estimate, in one
    # process or dealt out over several
    def one(start: int, size: int) -> torch.Tensor:
        x = next(image_batches(images[start:start + size], size, ctx.device))
        return ctx.method.nll(x, generator=batch_generator(ctx.ev.seed, start, bs)).double()

    nll = map_batches(len(images), bs, one, (), torch.float64, progress=ctx.progress, desc="likelihood")
    cs = ctx.method.capability_settings("nll")
    out = {"n": len(nll), "terms": nll_terms(cs), "unit": cs.get("unit", UNIT), "nll": cs}
    if "bits_per_token_factor" in cs:  # a model of quantized tokens: bits per token first, per sub-pixel beside
        figures = {"bits_per_token": nll * cs["bits_per_token_factor"], "bits_per_subpixel": nll}
    else:
        figures = {"bits_per_dim": nll}
    for key, values in figures.items():
        out[key], out[f"{key}_sem"] = _mean_sem(values)
    out["headline"] = next(iter(figures))
    return out


def likelihood_figures(r: dict) -> list[tuple[str, float, float]]:
    """(unit in words, mean, standard error) of a likelihood result, the headline first. Files before issue 25
    held ``bpd``: bits/dim, or, beside ``bits_per_token``, bits per sub-pixel."""
    if "bpd" in r:
        if "bits_per_token" not in r:
            return [(UNITS["bits_per_dim"], r["bpd"], r["bpd_sem"])]
        factor = r["bits_per_token"] / r["bpd"] if r["bpd"] else 1.0
        return [(UNITS["bits_per_token"], r["bits_per_token"], r["bpd_sem"] * factor),
                (UNITS["bits_per_subpixel"], r["bpd"], r["bpd_sem"])]
    keys = [r["headline"]] + [k for k in UNITS if k in r and k != r["headline"]]
    return [(UNITS[k], r[k], r[f"{k}_sem"]) for k in keys]
