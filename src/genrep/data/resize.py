"""How a data set's images reach ``image_size`` x ``image_size`` (``data.resize``).

- ``squash``: the whole image resized to the square, bilinear (antialiased when shrinking); what every set had
  before the key existed, and still the default of every set but the fine-grained ones.
- ``center_crop``: guided-diffusion's ``center_crop_arr`` (``guided_diffusion/image_datasets.py``), as the
  diffusion-features paper resizes its inputs: halve with PIL's BOX filter while the short side is at least twice
  the target, scale the short side to the target with BICUBIC, then cut the centred square. The aspect ratio is
  kept; a short side below the target is upsampled.

The centre crop is planned from the image's width and height alone, so a whole set can be checked from the file
headers (:func:`center_crop_refusal`) before a pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GenrepError

SQUASH, CENTER_CROP = "squash", "center_crop"
RESIZES = (SQUASH, CENTER_CROP)
# the crop first scales the short side to the target, and the long side with it: a 3x4000 strip at 256 px would be
# a 256x341,333 image (87 million pixels) before the crop. Refused above this, i.e. an aspect ratio beyond 256:1 at
# 256 px (the bound of a folder set's source images, genrep.data.local_sets.MAX_FOLDER_PIXELS)
MAX_CROP_SOURCE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class CropPlan:
    halvings: int                     # BOX halvings of both sides (integer division, as PIL sizes)
    scaled: tuple[int, int]           # (width, height) after the BICUBIC scaling of the short side to the target
    box: tuple[int, int, int, int]    # the centred square: left, top, right, bottom


def plan_center_crop(width: int, height: int, size: int) -> CropPlan:
    """The steps of guided-diffusion's centre crop for a ``width`` x ``height`` image and target ``size``."""
    w, h, halvings = width, height, 0
    while min(w, h) >= 2 * size:
        w, h, halvings = w // 2, h // 2, halvings + 1
    scale = size / min(w, h)
    sw, sh = round(w * scale), round(h * scale)     # Python's round, as guided-diffusion: half to even
    left, top = (sw - size) // 2, (sh - size) // 2
    return CropPlan(halvings, (sw, sh), (left, top, left + size, top + size))


def center_crop_refusal(width: int, height: int, size: int) -> str | None:
    """Why a ``width`` x ``height`` image cannot be centre-cropped to ``size`` (the rest of a one-line error that
    names the image), or None when it can."""
    if min(width, height) < 2:
        return (f"is {width}x{height} pixels; data.resize center_crop needs at least 2 pixels a side (one row or "
                f"column scaled to {size} px is a smear, not an image): remove or replace it")
    sw, sh = plan_center_crop(width, height, size).scaled
    if sw * sh > MAX_CROP_SOURCE_PIXELS:
        return (f"is {width}x{height} pixels; data.resize center_crop would scale its short side to {size} px and "
                f"crop from a {sw}x{sh} image ({sw * sh:,} pixels, more than {MAX_CROP_SOURCE_PIXELS:,}): crop it "
                f"to an aspect ratio of at most {MAX_CROP_SOURCE_PIXELS // size ** 2}:1, remove it, or use "
                f"data.resize squash")
    return None


def check_center_crop(width: int, height: int, size: int, what: str) -> None:
    reason = center_crop_refusal(width, height, size)
    if reason is not None:
        raise GenrepError(f"{what} {reason}")


def center_crop_pil(image, size: int):
    """A PIL image centre-cropped to ``size`` x ``size`` by :func:`plan_center_crop`'s steps, in its own mode."""
    from PIL import Image

    plan = plan_center_crop(image.width, image.height, size)
    for _ in range(plan.halvings):
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    image = image.resize(plan.scaled, resample=Image.BICUBIC)
    return image.crop(plan.box)


def center_crop_tensor(images: torch.Tensor, size: int, subject: str) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> uint8 [N, C, size, size], each image through PIL as grey or RGB;
    ``subject`` names the first image in the refusal ("image 3 of npz:/x.npz (train)")."""
    from PIL import Image

    n, c, h, w = images.shape
    if (h, w) == (size, size):   # no halving, a scale of 1, the whole square: the pixels themselves
        return images
    check_center_crop(w, h, size, subject)
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for i in range(n):
        hwc = images[i].permute(1, 2, 0).numpy()
        im = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if c == 1 else hwc))
        arr = np.asarray(center_crop_pil(im, size))
        out[i] = torch.from_numpy(arr.reshape(size, size, c).copy()).permute(2, 0, 1)
    return out
