"""Images as a researcher has them (a uint8 or float tensor, channels first or last, a NumPy array, a PIL image, or a
list of them) brought to what a trained run reads: uint8 [B, C, S, S] at the run's channels and size, resized the way
its data set was (``data.resize``: the whole image squashed, or the centre square)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GenrepError
from .imageset import _resize

IMAGE_FORMS = "a uint8 or float tensor [B, C, H, W] or [B, H, W, C] (or one image), a NumPy array, a PIL image, or a list"


def to_run_images(images, channels: int, size: int, resize: str) -> torch.Tensor:
    """``images`` in any of ``IMAGE_FORMS`` -> uint8 [B, channels, size, size] on the CPU; one line for anything else."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise GenrepError(f"the list of images is empty; give {IMAGE_FORMS}")
        parts = [_one_batch(x, channels, f"image {i} of the list") for i, x in enumerate(images)]
        return torch.cat([_resize(p, size, resize, f"image {i} of the list") for i, p in enumerate(parts)])
    return _resize(_one_batch(images, channels, "the images"), size, resize, "the images")


def _one_batch(x, channels: int, what: str) -> torch.Tensor:
    """One image or a batch as uint8 [B, C, H, W]."""
    if _is_pil(x):
        mode = "L" if channels == 1 else "RGB"
        x = np.asarray(x.convert(mode))
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise GenrepError(f"{what} are a NumPy array of {x.dtype}; give {IMAGE_FORMS}")
        x = torch.from_numpy(np.array(x) if not x.flags.writeable else np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise GenrepError(f"{what} are a {type(x).__name__}; give {IMAGE_FORMS}")
    x = x.detach().cpu()
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or 0 in x.shape:
        raise GenrepError(f"{what} have shape {tuple(x.shape)}; give {IMAGE_FORMS}")
    if x.shape[1] != channels and x.shape[-1] == channels:   # channels last
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        raise GenrepError(f"{what} have {x.shape[1]} channels (shape {tuple(x.shape)}) and the run reads "
                          f"{channels}-channel images; convert them (a PIL image is converted for you)")
    return _as_uint8(x.contiguous(), what)


def _as_uint8(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):   # also NaN
            raise GenrepError(f"{what} are floats in [{lo:.4g}, {hi:.4g}]; float images must lie in [0, 1] (or give "
                              f"uint8 in 0..255)")
        return (x.float() * 255).round_().to(torch.uint8)
    if x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise GenrepError(f"{what} are integers in [{lo}, {hi}]; integer images must lie in 0..255")
        return x.to(torch.uint8)
    raise GenrepError(f"{what} have dtype {x.dtype}; give uint8 in 0..255 or floats in [0, 1]")


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:   # pragma: no cover - Pillow comes with torchvision
        return False
    return isinstance(x, Image.Image)
