"""The energy protocol: the classifier's energy of the method's own samples, per class (the HybViT paper's
appendix C.1, figures 10 and 11, after JEM).

The paper generates 10,000 images with HybViT, feeds them back to its classifier head, assigns each the
class the head prefers and plots, per class, a histogram of E(x) = logsumexp(logits) (its code,
``Task/quality_analysis.py``: 50 bins, oriented horizontally, axes shared) with the best and worst samples
by energy. The images are classified as the sampler returns them (floats, not rounded to 8 bits), as there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ...fields import setting
from ..distributed import batch_generator, map_batch_sets
from .context import EvalContext


@dataclass
class EnergySettings:
    n: int = setting(10000, min=1)           # samples (the paper's 10,000), drawn by the model's sample options
    bins: int = setting(50, min=1)           # histogram bins, shared by every class (the paper's code: 50)
    classes_shown: int = setting(10, min=1)  # classes in the figures (the first, by index); the numbers cover all
    per_class: int = setting(8, min=1)       # best and worst samples shown per class


def sample_and_classify(ctx: EvalContext, n: int) -> tuple[Tensor, Tensor]:
    """``n`` samples (uint8 on the CPU, for the figure) and their float32 logits, drawn in batches of
    ``eval.batch_size``, each from its own generator (the generation protocol's draws, same seed): under torchrun
    the batches are dealt out over the processes and gathered, the same for any number of them."""
    bs, d = ctx.ev.batch_size, ctx.method.data
    ctx.method.eval()

    def one(start: int, size: int) -> list[Tensor]:
        x = ctx.method.sample(size, generator=batch_generator(ctx.ev.seed, start, bs))
        with torch.no_grad():
            logits = ctx.method.logits(x).float()
        return [(x * 255).round().to(torch.uint8), logits]

    images, logits = map_batch_sets(n, bs, one, [((d.channels, d.image_size, d.image_size), torch.uint8),
                                                 ((d.num_classes,), torch.float32)],
                                    progress=ctx.progress, desc=f"sampling {n} images")
    return images, logits


def class_statistics(logits: Tensor, classes: list[str], bins: int) -> dict:
    """Per predicted class: count, energy mean and std (population), mean confidence max p(y|x), and the
    histogram of energies over bins shared by all classes (the figure's numbers)."""
    energy = torch.logsumexp(logits.double(), dim=1)
    pred = logits.argmax(dim=1)
    conf = torch.softmax(logits.double(), dim=1).max(dim=1).values
    lo, hi = float(energy.min()), float(energy.max())
    if hi - lo < 1e-9:  # one value: give the histogram a width
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    per_class, counts = {}, {}
    for y, name in enumerate(classes):
        e = energy[pred == y]
        per_class[name] = {"count": len(e),
                           "energy_mean": float(e.mean()) if len(e) else None,
                           "energy_std": float(e.std(correction=0)) if len(e) else None,
                           "confidence_mean": float(conf[pred == y].mean()) if len(e) else None}
        counts[name] = torch.histogram(e, bins=edges).hist.long().tolist()
    overall = {"mean": float(energy.mean()), "std": float(energy.std(correction=0)), "min": float(energy.min()),
               "max": float(energy.max())}
    return {"energy": overall, "per_class": per_class, "histogram": {"edges": edges.tolist(), "counts": counts}}


def run(ctx: EvalContext) -> dict:
    from ..report.figures import energy_histograms
    from ..report.samples import class_rows, display_scale, grid, save_png

    s = ctx.ev.energy
    t0 = time.perf_counter()
    images, logits = sample_and_classify(ctx, s.n)
    seconds = time.perf_counter() - t0
    classes = ctx.train.classes
    stats = class_statistics(logits, classes, s.bins)
    shown = min(s.classes_shown, len(classes))
    hist = energy_histograms(stats["histogram"], ctx.figure("energy-histograms"), classes=classes[:shown],
                             title=f"E(x) = logsumexp(logits) of {s.n} samples, by predicted class")

    # the best and worst samples of each shown class, by energy (figure 10); only those classes' images as floats
    pred = logits.argmax(dim=1)
    keep = pred < shown
    energy = torch.logsumexp(logits[keep], dim=1)
    cells = class_rows(images[keep].float() / 255, pred[keep], energy, shown, s.per_class)
    ranked = save_png(grid(cells, nrow=2 * s.per_class + 1), ctx.figure("energy-best-worst"),
                      display_scale(images.shape[-1]))
    return {**stats, "n": s.n, "classes_shown": shown, "sample": ctx.method.capability_settings("sample"),
            "sampling_seconds": round(seconds, 2),
            "figures": {"energy by class": ctx.rel(hist), "best and worst samples by energy": ctx.rel(ranked)}}
