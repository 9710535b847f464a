"""Out-of-distribution image sets shaped like the in-distribution set (its channels and size).

Generated sets (``GENERATED``), after JEM and the HybViT paper's table 3:

- ``noise``: every pixel uniform in 0..255, independently per channel.
- ``constant``: each image one uniformly random colour (a grey level for one channel).
- ``interp``: the pixel-wise average 0.5 a + 0.5 b (rounded half up) of two random images a, b of
  *different* classes of the in-distribution set given (the HybViT paper's "CIFAR10 Interp" uses the test
  set); b is drawn uniformly among the images whose class differs from a's.

Any other name is a data set of the registry (:func:`genrep.data.datasets.dataset_names`, including
``npz:PATH`` and ``folder:PATH``): its test split is loaded at the in-distribution image size, converted to
the in-distribution channel count (grey -> RGB by repeating; RGB -> grey by ITU-R 601 luma,
0.299 R + 0.587 G + 0.114 B), and a seeded random subset of ``n`` images is kept (all of them, in their
order, when the split has at most ``n``). The same ``seed`` gives the same images.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..data.datasets import dataset_names, load_dataset
from ..data.imageset import ImageSet
from ..errors import GenrepError

__all__ = ["GENERATED", "check_ood_images", "make_ood_images", "ood_set_names"]

GENERATED = ("noise", "constant", "interp")
_LUMA = (0.299, 0.587, 0.114)


def ood_set_names() -> list[str]:
    """Generated sets, then the data-set registry's names (and its npz:PATH / folder:PATH forms)."""
    return list(GENERATED) + dataset_names()


def _is_registry_name(name: str) -> bool:
    kind, sep, _ = name.partition(":")
    return bool(sep and kind.lower() in ("npz", "folder")) or name.lower() in dataset_names()


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 images with ``channels`` channels: grey -> RGB by repeating, RGB -> grey by ITU-R 601 luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor(_LUMA).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def _interp(in_set: ImageSet, n: int, g: torch.Generator) -> Tensor:
    y = in_set.labels
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    if int((counts > 0).sum()) < 2:
        raise GenrepError(f"the interp OOD set mixes images of two different classes, but {in_set.name} has "
                          f"only one class; choose noise, constant or a data set")
    order = torch.argsort(y, stable=True)                 # indices grouped by class
    start = torch.cumsum(counts, 0) - counts              # where each class's group begins in ``order``
    a = torch.randint(0, len(y), (n,), generator=g)
    ya = y[a]
    # the r-th of the N - n_ya other-class images: positions before a's class group, then after it
    others = len(y) - counts[ya]
    r = torch.minimum((torch.rand(n, generator=g, dtype=torch.float64) * others).long(), others - 1)
    b = order[torch.where(r < start[ya], r, r + counts[ya])]
    mixed = (in_set.images[a].to(torch.int16) + in_set.images[b].to(torch.int16) + 1) // 2
    return mixed.to(torch.uint8)


def make_ood_images(name: str, in_set: ImageSet, n: int, *, seed: int = 0,
                    root: str | os.PathLike | None = None, download: bool = False) -> Tensor:
    """``n`` OOD images, uint8 [n, C, H, W] with the in-distribution set's C, H and W (see the module doc)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GenrepError(f"the number of OOD images must be a positive integer, got {n!r}")
    if not isinstance(name, str) or not name.strip():
        raise GenrepError(f"OOD set name must be a non-empty string, got {name!r}; choose one of "
                          f"{', '.join(ood_set_names())}")
    text = name.strip()
    size, c = in_set.image_size, in_set.channels
    g = torch.Generator().manual_seed(seed)
    if text.lower() == "noise":
        return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    if text.lower() == "constant":
        colours = torch.randint(0, 256, (n, c, 1, 1), generator=g, dtype=torch.uint8)
        return colours.expand(-1, -1, size, size).contiguous()
    if text.lower() == "interp":
        return _interp(in_set, n, g)
    if not _is_registry_name(text):
        raise GenrepError(f"unknown OOD set {text!r}; choose one of {', '.join(ood_set_names())}")
    images = _registry_test_images(text, size, c, None if root is None else str(root), download)
    if len(images) > n:
        return images[torch.randperm(len(images), generator=g)[:n].sort().values]
    return images.clone()  # never hand out the cached tensor itself


@functools.lru_cache(maxsize=4)
def _registry_test_images(name: str, size: int, channels: int, root: str | None, download: bool) -> Tensor:
    # one evaluation draws from a registry set several times (preflight, OOD, t-SNE): decode it once
    return to_channels(load_dataset(name, "test", image_size=size, root=root, download=download).images, channels)


def check_ood_images(images: Tensor, in_set: ImageSet, name: str) -> None:
    """One-line error unless ``images`` are non-empty uint8 [N, C, H, W] shaped like ``in_set``'s images."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise GenrepError(f"OOD set {name} must be uint8 images [N, C, H, W], got "
                          f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if len(images) == 0:
        raise GenrepError(f"OOD set {name} is empty; it needs at least one image")
    (h, w), c = in_set.image_shape, in_set.channels
    if tuple(images.shape[1:]) != (c, h, w):
        _, oc, oh, ow = images.shape
        raise GenrepError(f"OOD set {name} has {oh}x{ow}x{oc} images but the in-distribution set {in_set.name} "
                          f"has {h}x{w}x{c}; pass it by name so genrep resizes it, or resize it yourself")
