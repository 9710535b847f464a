"""The ``classifier`` augmentation: what the HybViT paper's code does to a classification training image.

gevit_main.py (sndnyang/Diffusion_ViT) composes, for its CE stream and its ViT baseline alike:
RandomHorizontalFlip, RandomCrop(32, padding=4) (zero padding), CIFAR10Policy (AutoAugment), ToTensor,
Normalize(0.5, 0.5), RandomErasing(probability=0.25, sh=0.4, r1=0.3, mean=(0.5, 0.5, 0.5)). This module does
the same, in that order, for a whole batch, each image with its own parameters (see ``augment`` for how they
are drawn). Mixup and CutMix need the labels and act on the batch, so they live in ``mixing.py``.

The erasing is that code's (Zhong et al.'s), not torchvision's RandomErasing: area uniform in [0.02, 0.4] of
the image, aspect ratio uniform (not log-uniform) in [0.3, 1/0.3], 100 tries, and the box filled with 0.5
*after* Normalize(0.5, 0.5), i.e. with 0.75 in the [0, 1] pixels we return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GenrepError
from .augment import _to_device
from .autoaugment import AUTOAUGMENT_POLICIES, AutoAugmentParams, autoaugment, autoaugment_params
from .autoaugment import COLUMNS as AUTOAUGMENT_COLUMNS

PAD = 4
P_FLIP = 0.5
ERASE_AREA = (0.02, 0.4)  # fraction of the image
ERASE_RATIO = 0.3  # aspect ratio h / w uniform in [0.3, 1 / 0.3]
ERASE_TRIES = 100
ERASE_VALUE = 0.75  # the code's fill, 0.5 after Normalize(0.5, 0.5)

# Uniforms drawn per sample: flip, crop top, crop left; AutoAugment's; erase on, (area, ratio) per try, box top,
# box left.
_AA = 3
_ERASE = _AA + AUTOAUGMENT_COLUMNS
COLUMNS = _ERASE + 1 + 2 * ERASE_TRIES + 2


def check_options(policy: str, erase_prob: float) -> None:
    if policy not in AUTOAUGMENT_POLICIES:
        raise GenrepError(f"unknown AutoAugment policy {policy!r}; choose one of {', '.join(AUTOAUGMENT_POLICIES)}")
    if not 0 <= erase_prob <= 1:
        raise GenrepError(f"the random-erasing probability must be in [0, 1], got {erase_prob!r}")


def classifier(x: torch.Tensor, u: torch.Tensor, policy: str, erase_prob: float, pad: int = PAD) -> torch.Tensor:
    """x uint8 [B, C, H, W], u float64 [B, COLUMNS] (CPU) -> float32 [B, C, H, W] in [0, 1] on x's device."""
    _, _, h, w = x.shape
    flip = u[:, 0] < P_FLIP
    top = (u[:, 1] * (2 * pad + 1)).floor()  # uniform over the 2 * pad + 1 offsets, like randint
    left = (u[:, 2] * (2 * pad + 1)).floor()
    aa = autoaugment_params(u[:, _AA:_ERASE], policy, h, w) if policy != "none" else None
    erase = erase_params(u[:, _ERASE:], h, w, erase_prob)
    first = [flip, top, left, *erase]
    moved = _to_device([*first, *(aa or ())], x.device)  # one host-to-device copy
    flip_d, top_d, left_d, *erase_d = moved[:len(first)]
    out = _flip_crop(x, flip_d, top_d.long(), left_d.long(), pad).float() / 255
    if aa is not None:
        out = autoaugment(out, aa, AutoAugmentParams(*moved[len(first):]))
    return erase_boxes(out, *erase_d)


def _flip_crop(x, flip, top, left, pad):
    """Flip some images, zero-pad by ``pad`` and cut each one's window, in one uint8 gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    # flipping then padding is padding then flipping: column j of the flipped padded image is w + 2 pad - 1 - j
    cols = torch.where(flip[:, None], w + 2 * pad - 1 - cols, cols)
    batch_idx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan_idx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch_idx, chan_idx, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def erase_params(u: torch.Tensor, h: int, w: int, prob: float):
    """Zhong et al.'s RandomErasing box for every row at once -> (on, top, left, height, width), float64.

    Each row tries ERASE_TRIES (area, aspect ratio) draws and keeps the first box strictly smaller than the
    image; a row with none (tiny images only) is not erased.
    """
    t = ERASE_TRIES
    area = h * w * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 1:1 + t])
    aspect = ERASE_RATIO + (1 / ERASE_RATIO - ERASE_RATIO) * u[:, 1 + t:1 + 2 * t]
    tries_h = torch.round(torch.sqrt(area * aspect))  # half to even, like Python's round in that code
    tries_w = torch.round(torch.sqrt(area / aspect))
    fits = (tries_w < w) & (tries_h < h)
    first = fits.double().argmax(dim=1, keepdim=True)  # the first fitting try
    box_h = tries_h.gather(1, first).squeeze(1)
    box_w = tries_w.gather(1, first).squeeze(1)
    top = (u[:, 1 + 2 * t] * (h - box_h + 1)).floor()
    left = (u[:, 2 + 2 * t] * (w - box_w + 1)).floor()
    return (u[:, 0] < prob) & fits.any(dim=1), top, left, box_h, box_w


def erase_boxes(x: torch.Tensor, on, top, left, box_h, box_w) -> torch.Tensor:
    """Fill each sample's box [top, top + box_h) x [left, left + box_w) with ERASE_VALUE where ``on``."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device, dtype=top.dtype)
    cols = torch.arange(w, device=x.device, dtype=left.dtype)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    box = on.view(-1, 1, 1) & in_rows[:, :, None] & in_cols[:, None, :]
    return torch.where(box[:, None], torch.full_like(x, ERASE_VALUE), x)
