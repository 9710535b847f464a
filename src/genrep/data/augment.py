"""Batched image augmentations that run on the batch's own device.

Each augmentation reproduces, per sample, what the torchvision transform it names does to one float image,
but for a whole batch at once with vectorised ops only (no Python loop over samples), so that it keeps up with
batches of thousands of images on a GPU.

Random parameters are drawn on the CPU from a caller-owned generator, `total` rows at a time, one row per
sample, and rows [start : start + B] are used. A global batch split across processes therefore gets exactly
the augmentation it would get in one process, and the parameters do not depend on the device.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from genrep.errors import GenrepError

AUGMENTATIONS = ("none", "weak", "strong", "classifier", "crop")

# The classifier kind's options as the HybViT paper's code sets them (see classifier_augment.py).
CLASSIFIER_POLICY = "cifar10"
CLASSIFIER_ERASE_PROB = 0.25
# the strong and crop kinds' smallest crop area, as a fraction of the image (table 2's RandomResizedCrop scale
# (0.2, 1.0); GCRL's table 9 "weak augmentation" raises it to 0.8)
DEFAULT_CROP_SCALE = 0.2


@dataclass(frozen=True)
class Augmentation:
    """A view's augmentation with its options, for ``Method.views()`` where the kind's defaults do not do:
    the classifier kind's AutoAugment policy and random-erasing probability, and the strong and crop kinds'
    ``crop_scale`` (the lower bound of RandomResizedCrop's area range; GCRL's table 9 raises it to 0.8), from
    the method's config."""

    kind: str
    policy: str = CLASSIFIER_POLICY
    erase_prob: float = CLASSIFIER_ERASE_PROB
    crop_scale: float = DEFAULT_CROP_SCALE


def augmentation_kind(aug: str | Augmentation) -> str:
    return aug.kind if isinstance(aug, Augmentation) else aug

# torchvision's grayscale weights (rgb_to_grayscale, v1 and v2). ITU-R 601-2 and PIL say 0.299 for red,
# torchvision says 0.2989; we follow torchvision, so contrast, saturation and grayscale match it to 1e-6.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# SimCLR's CIFAR recipe; the crop's scale and ratio and the flip are also MAE's (main_pretrain.py:
# RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3) with the default ratio, RandomHorizontalFlip()).
CROP_SCALE = (DEFAULT_CROP_SCALE, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10  # torchvision's RandomResizedCrop gives up after 10 rejected boxes and takes a central crop
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue as in ColorJitter(0.4, 0.4, 0.4, 0.1)
P_FLIP, P_JITTER, P_GRAY = 0.5, 0.8, 0.2
# strong resizes its crop bilinearly (SimCLR, torchvision's default); crop bicubically, as MAE does
# (interpolation=3).
STRONG_INTERPOLATION, CROP_INTERPOLATION = "bilinear", "bicubic"

# Uniforms drawn per sample: (area, log ratio) per crop try, crop top, crop left, flip (the crop kind's
# columns); then, for strong, jitter on, 4 jitter factors, 4 keys whose argsort is the jitter order,
# grayscale on.
CROP_COLUMNS = 2 * CROP_TRIES + 3
STRONG_COLUMNS = CROP_COLUMNS + 10


def augment(
    x: torch.Tensor,
    kind: str | Augmentation,
    generator: torch.Generator,
    *,
    start: int = 0,
    total: int | None = None,
    pad: int = 4,
) -> torch.Tensor:
    """x: uint8 [B, C, H, W] (C = 1 or 3) on any device. Returns float32 in [0, 1], same shape, same device.

    kind: "none" (x / 255), "weak" (reflect-padded random crop + horizontal flip), "strong" (SimCLR CIFAR:
    random resized crop of scale (crop_scale, 1), 0.2 by default, flip, colour jitter, random grayscale), "classifier" (the HybViT code's classifier
    training: flip, zero-padded crop, AutoAugment, random erasing; an ``Augmentation`` sets its policy and
    erasing probability) or "crop" (MAE's and GVP's pretraining: strong's random resized crop, scale 0.2-1,
    resized bicubically, and flip; no colour change; an ``Augmentation`` sets crop_scale as for strong). Random parameters are drawn on the CPU from `generator`
    (a CPU torch.Generator) for `total` samples (default B) and rows [start : start + B] of them are used, so
    that a global batch split across processes gets exactly the augmentation it would get in one process.
    Then moved to x.device.
    """
    options = kind if isinstance(kind, Augmentation) else Augmentation(str(kind))
    kind = options.kind
    if kind not in AUGMENTATIONS:
        raise GenrepError(f"unknown augmentation {kind!r}; expected one of {', '.join(AUGMENTATIONS)}")
    scale = options.crop_scale
    if kind in ("strong", "crop") and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                       or not 0 < scale <= CROP_SCALE[1]):
        raise GenrepError(f"{kind} augmentation crop_scale={scale!r} must be in (0, 1] (the smallest fraction of "
                          f"the image's area a crop keeps)")
    total = _check_inputs(x, generator, start, total)
    if kind == "none":
        return x.float() / 255
    if kind == "classifier":
        # imported here because it builds on this module's colour ops and parameter transfer
        from .classifier_augment import COLUMNS, check_options, classifier

        check_options(options.policy, options.erase_prob)
        if pad < 0:
            raise GenrepError(f"classifier augmentation pad={pad} must be >= 0")
        return classifier(x, _draw(generator, total, start, x.shape[0], COLUMNS), options.policy,
                          options.erase_prob, pad)
    if kind == "weak":
        _, _, h, w = x.shape
        if not 0 <= pad < min(h, w):
            raise GenrepError(f"weak augmentation pad={pad} must be >= 0 and below the image size {h}x{w}")
        return _weak(x, _draw(generator, total, start, x.shape[0], 3), pad)
    if kind == "crop":
        return _crop(x, _draw(generator, total, start, x.shape[0], CROP_COLUMNS), scale)
    return _strong(x, _draw(generator, total, start, x.shape[0], STRONG_COLUMNS), scale)


def _check_inputs(x, generator, start, total) -> int:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise GenrepError(f"augment expects a uint8 tensor [B, C, H, W] with C = 1 or 3, got {got}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise GenrepError("augment needs a CPU torch.Generator (torch.Generator() or torch.Generator('cpu'))")
    total = x.shape[0] if total is None else total
    if start < 0 or start + x.shape[0] > total:
        rows = f"[{start}, {start + x.shape[0]})"
        raise GenrepError(f"augment rows [start, start + B) = {rows} must lie within [0, total={total})")
    return total


def _draw(generator, total, start, batch, columns) -> torch.Tensor:
    # Always draw the whole global batch, so a sample's parameters depend only on its global row.
    return torch.rand(total, columns, generator=generator, dtype=torch.float64)[start : start + batch]


# ----------------------------------------------------------------------------------------------------
# weak: RandomCrop(size, padding=pad, padding_mode="reflect") + RandomHorizontalFlip(0.5)


def _weak(x, u, pad):
    b, c, h, w = x.shape
    top = (u[:, 0] * (2 * pad + 1)).floor().long()  # uniform over all 2 * pad + 1 offsets, like randint
    left = (u[:, 1] * (2 * pad + 1)).floor().long()
    flip = u[:, 2] < P_FLIP
    # Instead of padding the batch, map each output pixel to its source pixel and gather once, in uint8.
    rows = _reflect(top[:, None] - pad + torch.arange(h), h)
    out_cols = torch.arange(w).expand(b, w)
    cols = _reflect(left[:, None] - pad + torch.where(flip[:, None], w - 1 - out_cols, out_cols), w)
    rows, cols = _to_device([rows, cols], x.device)
    batch_idx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan_idx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    out = x[batch_idx, chan_idx, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    return out.float() / 255


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move a step's per-sample parameters ([B, ...] each) to the device in one copy.

    They are packed as float32 columns (indices, 0/1 flags and small integers are exact there), so a
    step pays one host-to-device transfer instead of one per tensor. On CUDA the packed block is pinned
    first: a copy from pageable memory makes CUDA wait for the stream to drain before it starts, which
    would stall every training step, while from pinned memory it is queued behind the step's work.
    """
    b = len(tensors[0])
    packed = torch.cat([t.reshape(b, -1).to(torch.float32) for t in tensors], dim=1)
    packed = packed.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else packed.to(device)
    out, col = [], 0
    for t in tensors:
        width = t[0].numel()
        out.append(packed[:, col:col + width].reshape(t.shape).to(t.dtype if t.dtype != torch.float64
                                                                    else torch.float32))
        col += width
    return out


def _reflect(idx, n):
    """Index into a reflect-padded axis (pad < n, edge pixel not repeated) -> index into the original axis."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


# ----------------------------------------------------------------------------------------------------
# crop: RandomResizedCrop(scale=(0.2, 1.0), interpolation=BICUBIC) + RandomHorizontalFlip(0.5), as MAE
# strong: RandomResizedCrop + RandomHorizontalFlip + RandomApply(ColorJitter, 0.8) + RandomGrayscale(0.2)
# Both draw the crop box and flip with _crop_params from their first CROP_COLUMNS uniforms, and apply them
# with _resized_crop.


class CropParams(NamedTuple):
    """Per-sample parameters of a random resized crop and flip, one row per sample (see _crop_params)."""

    top: torch.Tensor  # crop box in pixels (floats holding integers)
    left: torch.Tensor
    crop_h: torch.Tensor
    crop_w: torch.Tensor
    flip: torch.Tensor  # bool


class StrongParams(NamedTuple):
    """Per-sample parameters of the strong augmentation, one row per sample (see _strong_params): the crop
    and flip's (CropParams' fields, in its order), then the colour ops'."""

    top: torch.Tensor
    left: torch.Tensor
    crop_h: torch.Tensor
    crop_w: torch.Tensor
    flip: torch.Tensor
    jitter_on: torch.Tensor  # bool: RandomApply(ColorJitter) fired
    factors: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue
    order: torch.Tensor  # [B, 4] op ids 0..3 (same order as factors) in the order they are applied
    gray_on: torch.Tensor  # bool


def _crop_params(u, h, w, scale=CROP_SCALE[0]) -> CropParams:
    """The crop box and flip from a sample's first CROP_COLUMNS uniforms (further columns are ignored); the
    box's area is drawn from (scale, 1) of the image's."""
    t = CROP_TRIES
    box = _resized_crop_params(u[:, :t], u[:, t : 2 * t], u[:, 2 * t], u[:, 2 * t + 1], h, w, scale)
    return CropParams(*box, flip=u[:, 2 * t + 2] < P_FLIP)


def _strong_params(u, h, w, scale=CROP_SCALE[0]) -> StrongParams:
    c = CROP_COLUMNS
    lo = torch.tensor([1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3]], dtype=torch.float64)
    hi = torch.tensor([1 + JITTER[0], 1 + JITTER[1], 1 + JITTER[2], JITTER[3]], dtype=torch.float64)
    return StrongParams(
        *_crop_params(u, h, w, scale),
        jitter_on=u[:, c] < P_JITTER,
        factors=lo + (hi - lo) * u[:, c + 1 : c + 5],
        order=u[:, c + 5 : c + 9].argsort(dim=1),  # argsort of iid uniforms: a uniform permutation
        gray_on=u[:, c + 9] < P_GRAY,
    )


def _crop(x, u, scale=CROP_SCALE[0]):
    p = CropParams(*_to_device(list(_crop_params(u, x.shape[2], x.shape[3], scale)), x.device))
    return _resized_crop(x.float() / 255, *p, interpolation=CROP_INTERPOLATION)


def _strong(x, u, scale=CROP_SCALE[0]):
    # float32 on the device: boxes are small integers (exact), and some accelerators have no float64.
    params = _strong_params(u, x.shape[2], x.shape[3], scale)
    p = StrongParams(*_to_device(list(params), x.device))
    out = _resized_crop(x.float() / 255, p.top, p.left, p.crop_h, p.crop_w, p.flip,
                        interpolation=STRONG_INTERPOLATION)
    out = _color_jitter(out, p.factors, p.order, p.jitter_on)
    if x.shape[1] == 3:  # torchvision's grayscale of a 1-channel image is the image itself
        out = torch.where(p.gray_on.view(-1, 1, 1, 1), rgb_to_grayscale(out).expand_as(out), out)
    return out


def _resized_crop_params(u_scale, u_log_ratio, u_top, u_left, h, w, scale=CROP_SCALE[0]):
    """torchvision's RandomResizedCrop.get_params with scale (scale, 1) for every row at once -> float64 (top,
    left, height, width).

    Each row tries CROP_TRIES (area, log aspect ratio) draws and keeps the first box that fits in the image;
    a row with none falls back to the whole image, cut to the nearest allowed aspect ratio, centred.
    """
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    area = h * w * (scale + (CROP_SCALE[1] - scale) * u_scale)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_log_ratio)
    tries_w = torch.round(torch.sqrt(area * aspect))  # half to even, like Python's round in torchvision
    tries_h = torch.round(torch.sqrt(area / aspect))
    fits = (tries_w > 0) & (tries_w <= w) & (tries_h > 0) & (tries_h <= h)
    first = fits.double().argmax(dim=1, keepdim=True)  # argmax returns the first maximum, i.e. the first fit
    found = fits.any(dim=1)

    if w / h < CROP_RATIO[0]:
        fallback_h, fallback_w = round(w / CROP_RATIO[0]), w
    elif w / h > CROP_RATIO[1]:
        fallback_h, fallback_w = h, round(h * CROP_RATIO[1])
    else:
        fallback_h, fallback_w = h, w
    crop_h = torch.where(found, tries_h.gather(1, first).squeeze(1), float(fallback_h))
    crop_w = torch.where(found, tries_w.gather(1, first).squeeze(1), float(fallback_w))
    top = torch.where(found, (u_top * (h - crop_h + 1)).floor(), float((h - fallback_h) // 2))
    left = torch.where(found, (u_left * (w - crop_w + 1)).floor(), float((w - fallback_w) // 2))
    return top, left, crop_h, crop_w


def _resized_crop(x, top, left, crop_h, crop_w, flip, interpolation="bilinear"):
    """Resize each sample's box to the full size, as torchvision's resized_crop (antialias=True, its
    default) with this interpolation, "bilinear" or "bicubic"; then flip some.

    Boxes are never larger than the image, so this only upsamples. For bilinear, torchvision's antialias is
    then a no-op; for bicubic it is not: it selects PIL's filter, which is what is reproduced here (see
    _bicubic_resized_crop).
    """
    if interpolation == "bicubic":
        return _bicubic_resized_crop(x, top, left, crop_h, crop_w, flip)
    if interpolation != "bilinear":
        raise GenrepError(f"unknown interpolation {interpolation!r}; expected bilinear or bicubic")
    b, _, h, w = x.shape
    ys = _source_coords(top, crop_h, h)
    xs = _source_coords(left, crop_w, w)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    # With align_corners=True grid_sample puts -1 and +1 on the edge pixels' centres: pixel p is 2p/(n-1) - 1.
    gy = ys * (2 / max(h - 1, 1)) - 1
    gx = xs * (2 / max(w - 1, 1)) - 1
    grid = torch.stack((gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _bicubic_resized_crop(x, top, left, crop_h, crop_w, flip):
    """Bicubic resize of each sample's box to the full size, then flip some; clamped to [0, 1].

    torchvision's bicubic with antialias=True (torch's _upsample_bicubic2d_aa) is PIL's: the cubic kernel
    with a = -0.5 (not -0.75, which grid_sample and antialias=False use), and taps that fall outside the box
    are dropped and the rest renormalised (not replaced by the box's edge pixel). Resampling is separable, so
    each output column, then each output row, is a weighted sum of 4 gathered source columns (rows).

    The cubic overshoots: torchvision leaves float results outside [0, 1]; MAE resizes uint8 PIL images,
    which clip to 0..255, and we clamp.
    """
    b, c, h, w = x.shape
    rows, row_weights = _cubic_taps(top, crop_h, h)  # [B, h, 4]
    cols, col_weights = _cubic_taps(left, crop_w, w)  # [B, w, 4]
    flip = flip.view(b, 1, 1)
    cols = torch.where(flip, cols.flip(1), cols)
    col_weights = torch.where(flip, col_weights.flip(1), col_weights)
    out = sum(col_weights[:, None, None, :, k] * x.gather(3, cols[:, None, None, :, k].expand(b, c, h, w))
              for k in range(4))
    out = sum(row_weights[:, None, :, None, k] * out.gather(2, rows[:, None, :, None, k].expand(b, c, h, w))
              for k in range(4))
    return out.clamp(0, 1)


def _cubic_taps(offset, size, n):
    """Source pixels and weights of PIL's bicubic upsampling of boxes [offset, offset + size) to n pixels.

    offset, size: [B] (floats holding integers, size <= n). Returns long indices into the image's axis and
    float weights, [B, n, 4] each. Output pixel k's centre is at (k + 0.5) * size / n in the box; it reads
    box pixels j (centres at j + 0.5) with weight cubic(j + 0.5 - centre), where |.| < 2, i.e. at most 4 of
    them starting at floor(centre - 1.5); taps outside the box get weight 0 and the rest sum to 1.
    """
    offset, size = offset.float()[:, None, None], size.float()[:, None, None]
    centre = (torch.arange(n, device=offset.device, dtype=torch.float32)[None, :, None] + 0.5) * (size / n)
    j = (centre - 1.5).floor().clamp(min=0) + torch.arange(4, device=offset.device, dtype=torch.float32)
    weights = torch.where(j < size, _cubic(j + 0.5 - centre), 0.0)
    weights = weights / weights.sum(dim=2, keepdim=True)
    return (offset + torch.minimum(j, size - 1)).long(), weights


def _cubic(t, a=-0.5):
    """Keys' cubic convolution kernel with PIL's a = -0.5 (torch's antialiased bicubic uses the same)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def _source_coords(offset, size, n):
    """Image coordinate that each of n output pixels samples, for boxes [offset, offset + size), [B, n].

    align_corners=False: output pixel k samples the box at (k + 0.5) * size / n - 0.5. torch's upsampling
    (which torchvision uses) clamps that to the box's first and last pixel centres, so no pixel outside the
    box leaks in, as it would if we just let grid_sample read the neighbours of the box.
    """
    offset, size = offset.float()[:, None], size.float()[:, None]
    k = torch.arange(n, device=offset.device, dtype=torch.float32)
    pos = (k + 0.5) * (size / n) - 0.5
    return offset + torch.minimum(pos.clamp(min=0), size - 1)


# ----------------------------------------------------------------------------------------------------
# Colour ops with one factor per sample: x float [B, C, H, W] in [0, 1], factor float [B]. Each matches the
# torchvision.transforms.functional op of the same name image by image, including its clamp to [0, 1].
# For 1-channel images torchvision's saturation, hue and grayscale return the image unchanged (to match PIL),
# while brightness and contrast (against the image's own mean) apply; these do the same.


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a, b, ratio):
    ratio = ratio.view(-1, 1, 1, 1)
    return (ratio * a + (1.0 - ratio) * b).clamp(0, 1)  # torchvision's _blend, operand order kept


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = rgb_to_grayscale(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hue by factor (in turns, [-0.5, 0.5]) through HSV, as torchvision does."""
    if x.shape[1] == 1:
        return x
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + factor.view(-1, 1, 1)) % 1.0, s, v)


def _rgb_to_hsv(x):
    # torchvision's formulation (after PIL): where max == min, s and h are 0 and no division by zero happens.
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    same = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(same, torch.ones_like(maxc), maxc)
    chroma = torch.where(same, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / chroma, (maxc - g) / chroma, (maxc - b) / chroma
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    # Closed form of the six-sector HSV -> RGB table: r, g, b use k = (n + 6h) mod 6 with n = 5, 3, 1.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        channels.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=1)


def _color_jitter(x, factors, order, apply):
    """ColorJitter per sample: factors [B, 4] (brightness, contrast, saturation, hue), order [B, 4] a
    permutation of the op ids 0..3 giving each sample's own op order, apply [B] bool (RandomApply).

    torchvision draws one op order per call, i.e. per image. Here every op runs on the whole batch in each of
    the 4 slots and a mask keeps it for the samples that have it in that slot: 16 vectorised passes instead of
    a loop over samples (and no host sync, as selecting subsets would need).
    """
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for slot in range(4):
        for op_id, op in enumerate(ops):
            mine = (apply & (order[:, slot] == op_id)).view(-1, 1, 1, 1)
            x = torch.where(mine, op(x, factors[:, op_id]), x)
    return x


# ----------------------------------------------------------------------------------------------------
# Random erasing as MAE fine-tunes: timm's RandomErasing(re_prob, mode="pixel", max_count=1), whose box is
# torchvision's RandomErasing(p, scale=(0.02, 1/3), ratio=(0.3, 1/0.3)) box (area uniform, aspect log-uniform,
# 10 tries, a box strictly smaller than the image, else no erasing) and whose fill is N(0, 1) per pixel and
# channel after Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), i.e. mean + std * N(0, 1) on the [0, 1]
# pixels here, left unclipped as timm leaves it (grey images: the three channels' mean mean and std).

ERASE_SCALE = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
ERASE_TRIES = 10
ERASE_COLUMNS = 1 + 2 * ERASE_TRIES + 2  # fires, (area, log aspect) per try, top, left
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def erase_box_params(u: torch.Tensor, h: int, w: int, prob: float):
    """From uniforms u [B, ERASE_COLUMNS] (float64): (on, top, left, box_h, box_w) as torchvision's
    RandomErasing.get_params draws them, for every row at once."""
    t = ERASE_TRIES
    area = h * w * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, 1:1 + t])
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1 + t:1 + 2 * t])
    tries_h = torch.round(torch.sqrt(area * aspect))  # half to even, like Python's round in torchvision
    tries_w = torch.round(torch.sqrt(area / aspect))
    fits = (tries_h < h) & (tries_w < w)
    first = fits.double().argmax(dim=1, keepdim=True)
    box_h, box_w = tries_h.gather(1, first).squeeze(1), tries_w.gather(1, first).squeeze(1)
    top = (u[:, 1 + 2 * t] * (h - box_h + 1)).floor()  # randint(0, h - box_h + 1)
    left = (u[:, 2 + 2 * t] * (w - box_w + 1)).floor()
    return (u[:, 0] < prob) & fits.any(dim=1), top, left, box_h, box_w


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Erase one box of each image of x (float [B, C, H, W], any device) with probability ``prob``, filled with
    per-pixel noise (see above). The boxes come from ``generator`` (CPU); the noise from a generator on x's device
    seeded from it, so a step is reproducible on its device without moving B x C x H x W numbers from the host."""
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        raise GenrepError(f"random erasing probability must be in [0, 1], got {prob!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise GenrepError("random_erase needs a CPU torch.Generator (torch.Generator() or torch.Generator('cpu'))")
    b, c, h, w = x.shape
    if prob == 0 or b == 0:
        return x
    u = torch.rand(b, ERASE_COLUMNS, generator=generator, dtype=torch.float64)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    on, top, left, box_h, box_w = _to_device(list(erase_box_params(u, h, w, prob)), x.device)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if c == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device)
    fill = mean.to(x.device).view(1, c, 1, 1) + std.to(x.device).view(1, c, 1, 1) * noise
    rows = torch.arange(h, device=x.device, dtype=top.dtype)
    cols = torch.arange(w, device=x.device, dtype=left.dtype)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    box = on.bool().view(-1, 1, 1) & in_rows[:, :, None] & in_cols[:, None, :]
    return torch.where(box[:, None], fill.to(x.dtype), x)
