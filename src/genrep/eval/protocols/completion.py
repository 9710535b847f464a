"""The completion protocol: the method's ``complete`` on held-out images with part of each image hidden.

As iGPT and GCRL show it: given the top half of a test image, the model samples the bottom half; the figure
has one row per image: what the model was given (hidden pixels grey), ``samples`` completions, the original.
As GVP's reconstruction at mask ratio 0.75 (its appendix F) needs it: ``random_patches`` hides a random
``ratio`` of the ``patch`` x ``patch`` blocks of each image (exactly round(ratio * blocks) of them, at
positions drawn per image from ``eval.seed``, MAE's fixed-count masking).

Numbers: the error on the filled-in pixels only, images in [0, 1]: per completion the MSE over its hidden
pixels (all channels) and PSNR = 10 log10(1 / MSE) dB (MSE floored at 1e-10, so at most 100 dB), each
averaged over every completion (``n`` images x ``samples``). Completions are measured as the method returns
them (floats, not rounded to 8 bits); the originals are the 8-bit test images. The method is given the image
with its hidden pixels set to 0, so it cannot read them; given pixels are pasted back into what is recorded,
and how far the method moved them (0 under the contract) is recorded as ``given_pixels_max_change``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import GenrepError
from ...fields import setting
from ..distributed import all_max, batch_generator, map_batches
from .context import EvalContext

MASKS = ("top_half", "random_patches")
MAX_FIGURE_ROWS = 32   # images shown in the figure; the numbers cover all n
MIN_MSE = 1e-10        # PSNR of an exact completion: 100 dB, not inf (JSON has no inf)
HIDDEN_GREY = 0.5      # how the figure shows a hidden pixel
FIGURE = "given, completions, original"  # the figure's caption, its key in the results


@dataclass
class CompletionSettings:
    n: int = setting(16, min=1)             # held-out test images (autoregressive sampling is slow on a CPU)
    samples: int = setting(3, min=1)        # completions per image
    # top_half: the top half given, the bottom half sampled (iGPT, GCRL); random_patches: a random `ratio`
    # of `patch` x `patch` blocks hidden (GVP's reconstruction)
    mask: str = setting("top_half", choices=MASKS)
    ratio: float = setting(0.75, above=0, below=1)  # random_patches: the fraction of blocks hidden (GVP: 0.75)
    patch: int = setting(4, min=1)                  # random_patches: the block side in pixels


def hidden_blocks(size: int, patch: int, ratio: float) -> tuple[int, int]:
    """(blocks hidden per image, blocks per image) of ``random_patches`` on ``size`` x ``size`` images."""
    total = (size // patch) ** 2
    return int(round(ratio * total)), total


def check_mask(s: CompletionSettings, height: int, width: int) -> None:
    """What the image size decides: a patch that tiles the image, and a mask that hides some pixels and
    gives some."""
    if s.mask == "top_half":
        if height < 2:
            raise GenrepError(f"eval.completion.mask top_half needs images at least 2 pixels tall, got {height}x{width}")
        return
    if height != width:
        raise GenrepError(f"eval.completion.mask random_patches needs square images, got {height}x{width}; "
                          f"use --eval.completion.mask top_half")
    if s.patch > height or height % s.patch:
        divisors = [p for p in range(1, height) if height % p == 0]
        raise GenrepError(f"eval.completion.patch {s.patch} does not divide the {height}x{width} images into blocks; "
                          f"choose one of {', '.join(map(str, divisors)) or 'none (the image is 1 pixel)'}")
    hidden, total = hidden_blocks(height, s.patch, s.ratio)
    if not 0 < hidden < total:
        what = "hides none" if hidden == 0 else "hides all"
        raise GenrepError(f"eval.completion.ratio {s.ratio:g} of {total} blocks of {s.patch}x{s.patch} pixels {what} "
                          f"of them; choose a smaller eval.completion.patch or a ratio that leaves blocks both given "
                          f"and hidden")


def check(ctx: EvalContext) -> None:
    size = ctx.test.images.shape[-2:]
    check_mask(ctx.ev.completion, int(size[0]), int(size[1]))


def make_keep(n: int, height: int, width: int, s: CompletionSettings, generator: torch.Generator) -> Tensor:
    """bool [n, 1, H, W], True = given: the top half (rows < H // 2), or all but a random ``ratio`` of the
    ``patch`` x ``patch`` blocks of each image (the positions drawn from ``generator``)."""
    if s.mask == "top_half":
        keep = torch.zeros(n, 1, height, width, dtype=torch.bool)
        keep[:, :, :height // 2] = True
        return keep
    hidden, total = hidden_blocks(height, s.patch, s.ratio)
    side = height // s.patch
    # float64 keys: ties (and so a kernel-dependent order) are practically impossible
    order = torch.rand(n, total, generator=generator, dtype=torch.float64).argsort(dim=1)
    blocks = torch.ones(n, total, dtype=torch.bool)
    blocks.scatter_(1, order[:, :hidden], False)
    blocks = blocks.view(n, 1, side, side)
    return blocks.repeat_interleave(s.patch, dim=2).repeat_interleave(s.patch, dim=3)


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from their MSE (floored at ``MIN_MSE``: at most 100 dB)."""
    return 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))


def errors(completed: Tensor, original: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE [N], PSNR in dB [N]) over the hidden pixels (all channels) of each image, float64; images in [0, 1]."""
    hidden = (~keep).expand_as(original).double()
    sq = (completed.double() - original.double()) ** 2 * hidden
    mse = sq.sum(dim=(1, 2, 3)) / hidden.sum(dim=(1, 2, 3))
    return mse, psnr(mse)


def complete(ctx: EvalContext, x: Tensor, keep: Tensor, seed: int) -> tuple[Tensor, float]:
    """The method's completions of ``x`` [N, C, H, W] (float in [0, 1], CPU) in batches of ``eval.batch_size``,
    each batch drawing from its own generator seeded by (``seed``, the batch), so under torchrun the batches are
    dealt out over the processes; hidden pixels zeroed before the method sees them and given pixels pasted back;
    and the largest change the method made to a given pixel."""
    bs = ctx.ev.batch_size
    moved = [0.0]
    ctx.method.eval()

    def one(i: int, size: int) -> Tensor:
        xb, kb = x[i:i + size].to(ctx.device), keep[i:i + size].to(ctx.device)
        y = ctx.method.complete(xb * kb, kb, generator=batch_generator(seed, i, bs)).float()
        k = kb.expand_as(y)
        if k.any():
            moved[0] = max(moved[0], float((y - xb)[k].abs().max()))
        return torch.where(k, xb, y)

    with torch.no_grad():
        out = map_batches(len(x), bs, one, tuple(x.shape[1:]), torch.float32, progress=ctx.progress,
                          desc=f"completing {len(x)} images")
    return out, all_max(moved[0])


def figure_cells(originals: Tensor, keep: Tensor, completions: Tensor, samples: int) -> Tensor:
    """One row per image: given (hidden pixels grey), its ``samples`` completions, the original."""
    cells = []
    for i, (x, k) in enumerate(zip(originals, keep)):
        cells.append(torch.where(k.expand_as(x), x, torch.full_like(x, HIDDEN_GREY)))
        cells += list(completions[i * samples:(i + 1) * samples])
        cells.append(x)
    return torch.stack(cells)


def completions(ctx: EvalContext) -> tuple[Tensor, Tensor, Tensor, float]:
    """(originals [n, C, H, W], keep [n, 1, H, W], completions [n * samples, C, H, W], the largest change the
    method made to a given pixel); the completions of image i are rows i * samples ... (i + 1) * samples - 1.
    A generator seeded by ``eval.seed`` draws the masks; each batch of completions draws from its own."""
    s = ctx.ev.completion
    images, _ = ctx.test_subset(s.n)
    x = images.float() / 255
    g = torch.Generator().manual_seed(ctx.ev.seed)
    keep = make_keep(len(x), x.shape[2], x.shape[3], s, g)  # one mask per image, shared by its completions
    completed, moved = complete(ctx, x.repeat_interleave(s.samples, 0), keep.repeat_interleave(s.samples, 0),
                                ctx.ev.seed)
    return x, keep, completed, moved


def mask_text(s: CompletionSettings, height: int) -> str:
    if s.mask == "top_half":
        return f"top {height // 2} of {height} rows given"
    hidden, total = hidden_blocks(height, s.patch, s.ratio)
    return f"{hidden} of {total} blocks of {s.patch}x{s.patch} hidden"


def run(ctx: EvalContext) -> dict:
    from ..report.samples import display_scale, grid, save_png

    s = ctx.ev.completion
    t0 = time.perf_counter()
    x, keep, completed, moved = completions(ctx)
    seconds = time.perf_counter() - t0
    n, _, height, width = x.shape
    mse, db = errors(completed, x.repeat_interleave(s.samples, 0), keep.repeat_interleave(s.samples, 0))
    m = len(mse)

    def sem(v: Tensor) -> float:
        return float(v.std() / math.sqrt(m)) if m > 1 else 0.0

    best = mse.view(n, s.samples).min(dim=1).values  # each image's closest completion
    path = ctx.figure("completion")
    rows = min(n, MAX_FIGURE_ROWS)
    cells = figure_cells(x[:rows], keep[:rows], completed[:rows * s.samples], s.samples)
    save_png(grid(cells, nrow=s.samples + 2), path, display_scale(max(height, width)))
    return {"mse": float(mse.mean()), "mse_sem": sem(mse), "psnr": float(db.mean()), "psnr_sem": sem(db),
            "best_of_samples": {"mse": float(best.mean()), "psnr": float(psnr(best).mean())},
            "n": n, "samples": s.samples, "completions": m, "mask": s.mask, "mask_text": mask_text(s, height),
            "hidden_fraction": 1 - float(keep.double().mean()), "given_pixels_max_change": moved,
            "complete": ctx.method.capability_settings("complete"), "completion_seconds": round(seconds, 2),
            "figures": {FIGURE: ctx.rel(path)}}
