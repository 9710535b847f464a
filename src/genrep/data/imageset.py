"""The in-memory :class:`ImageSet` and the helpers several loaders share: one-line error text,
resizing, stacking, Pillow decoding, label checks and the final assembly of a split (:func:`_finish`).

The loaders live in :mod:`genrep.data.torchvision_sets` (digits and the torchvision sets) and
:mod:`genrep.data.local_sets` (``npz:PATH`` and ``folder:PATH``); :mod:`genrep.data.datasets` is the
public entry point.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GenrepError
from .resize import CENTER_CROP, SQUASH, center_crop_tensor, check_center_crop

SPLITS = ("train", "test")
_RESIZE_CHUNK = 2048               # images per interpolation call (bounds the float32 working memory)


# ----------------------------------------------------------------------------------------------- the set
@dataclass(repr=False)
class ImageSet:
    """One split of an image data set, held in memory on the CPU, or read from a packed folder when indexed."""

    images: torch.Tensor   # uint8 [N, C, H, W], C = 1 or 3; a packed set's PackedImages decodes when indexed
    labels: torch.Tensor   # int64 [N]
    classes: list[str]
    name: str              # "digits", "cifar10", "npz:/path/x.npz", "folder:/path"

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        from .packed import PackedImages   # here: packed.py builds on this module

        if not isinstance(x, PackedImages) and (not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4
                or x.shape[1] not in (1, 3)):
            raise ValueError(f"ImageSet.images must be a uint8 [N, C, H, W] tensor with C in (1, 3), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"ImageSet.labels must be an int64 [N] tensor with N = {len(x)}, got "
                             f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
        self.classes = [str(c) for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        """The side of the (square) images; a non-square set is an error that says how to fix it."""
        h, w = self.image_shape
        if h != w:
            raise GenrepError(f"data set {self.name} has non-square {h}x{w} images; load it with "
                              f"image_size=N (data.image_size=N) to resize them to NxN")
        return h

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        h, w = self.image_shape
        return (f"ImageSet(name={self.name!r}, n={len(self)}, channels={self.channels}, size={h}x{w}, "
                f"classes={self.num_classes})")


# ----------------------------------------------------------------------------------------------- helpers
def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resize(images: torch.Tensor, size: int | None, how: str = SQUASH, what: str = "the data set") -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size]: squashed whole (bilinear, antialiased where it shrinks) or
    centre-cropped (:mod:`genrep.data.resize`); ``what`` names the images in a refusal."""
    if size is None:
        return images
    if how == CENTER_CROP:
        return center_crop_tensor(images, size, f"image 0 of {what}") if len(images) else images
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], _RESIZE_CHUNK):
        x = images[i:i + _RESIZE_CHUNK].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < h or size < w)
        out[i:i + _RESIZE_CHUNK] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _stack(images: list[torch.Tensor], size: int | None, what: str, how: str = SQUASH) -> torch.Tensor:
    """Stack [C, H, W] uint8 tensors, resizing (``how``) when ``size`` is given; mixed sizes need ``size``."""
    shapes = {tuple(t.shape[1:]) for t in images}
    if len(shapes) <= 1:
        return _resize(torch.stack(images), size, how, what)
    if size is None:
        a, b = sorted(shapes)[:2]
        raise GenrepError(f"{what} has images of {len(shapes)} different sizes (e.g. {a[0]}x{a[1]} and "
                          f"{b[0]}x{b[1]}); pass image_size=N (data.image_size=N) to resize them all to NxN")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(images):
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    if how == CENTER_CROP:   # every size checked before any image is cropped
        for (h, w), idx in groups.items():
            check_center_crop(w, h, size, f"image {idx[0]} of {what}")
    out = torch.empty((len(images), images[0].shape[0], size, size), dtype=torch.uint8)
    for idx in groups.values():
        group = torch.stack([images[i] for i in idx])
        out[idx] = (center_crop_tensor(group, size, f"image {idx[0]} of {what}") if how == CENTER_CROP
                    else _resize(group, size))
    return out


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _pil_decode(data: bytes | str | os.PathLike, mode: str, what: str, transform=None) -> torch.Tensor:
    """One image (bytes or a path) -> uint8 [C, H, W] in ``mode`` ("L" or "RGB"), through ``transform`` (a PIL
    image to a PIL image: a centre crop) where one is given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert(mode)
            arr = np.asarray(transform(im) if transform is not None else im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise GenrepError(f"cannot decode {what}: {_one_line(e)}; it must be an image file Pillow can read")
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


# a classifier head over more classes than this is a mislabelled file, not a data set (ImageNet-21k has 21,841)
MAX_CLASSES = 1_000_000


def _check_labels(y: np.ndarray, n_images: int, what: str, key: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise GenrepError(f"{what}: {key} must be a 1-D integer array of class indices, got {y.dtype} "
                          f"{tuple(y.shape)}")
    if len(y) != n_images:
        raise GenrepError(f"{what}: {key} has {len(y)} labels for {n_images} images; they must match one "
                          f"to one")
    if len(y) and y.min() < 0:
        raise GenrepError(f"{what}: {key} has negative labels (min {int(y.min())}); labels must be 0..K-1")
    if len(y) and int(y.max()) > MAX_CLASSES:
        raise GenrepError(f"{what}: {key} has label {int(y.max())}, not a class index genrep can train on "
                          f"(at most {MAX_CLASSES}); labels must be 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def _finish(images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str,
            split: str) -> ImageSet:
    if len(images) == 0:
        raise GenrepError(f"the {split} split of {name} is empty; a data set needs at least one image per "
                          f"split")
    if len(labels) and int(labels.max()) >= len(classes):
        raise GenrepError(f"{name} has label {int(labels.max())} but only {len(classes)} classes; labels "
                          f"must be 0..{len(classes) - 1} (or list all class names in 'classes')")
    return ImageSet(images=images.contiguous(), labels=labels, classes=list(classes), name=name)
