"""Out-of-distribution image sets shaped like the in-distribution set (its channels and size).

Generated sets (``GENERATED``), after JEM and the HybViT paper's table 3:

- ``noise``: every pixel uniform in 0..255, independently per channel.
- ``constant``: each image one uniformly random colour (a grey level for one channel).
- ``interp``: the pixel-wise average 0.5 a + 0.5 b (rounded half up) of two images a, b of the
  in-distribution set given (the HybViT paper's "CIFAR10 Interp" uses the test set). How a and b are paired
  (``INTERP_PAIRS``):

  - ``random`` (the default): as the HybViT code (Task/eval_tasks.py, ``OODAUC``), which shuffles the test set
    into batches of 100 and averages each batch with the one before it: a seeded permutation p, and image k mixes
    p[k] with p[k + 100], for k < N - 100 (9,900 images from CIFAR-10's 10,000; two distinct images, of any
    classes). More images continue with a fresh permutation, as the code's next epoch would; a set of fewer
    than 200 images uses a stride of half its size.
  - ``different_class``: a uniformly random a, and b uniform among the images whose class differs from a's.

Any other name is a data set of the registry (:func:`genrep.data.datasets.dataset_names`, including
``npz:PATH`` and ``folder:PATH``): its test split is loaded at the in-distribution image size, converted to
the in-distribution channel count (grey -> RGB by repeating; RGB -> grey by ITU-R 601 luma,
0.299 R + 0.587 G + 0.114 B), and a seeded random subset of ``n`` images is kept (all of them, in their
order, when the split has at most ``n``). The same ``seed`` gives the same images.

``n=None`` asks for the whole set, as the paper evaluates: a registry set's whole test split, ``interp``'s
N - 100 pairs (``random``) or N images (``different_class``), and as many ``noise`` and ``constant`` images as the
in-distribution set has.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..data.datasets import dataset_names, load_dataset
from ..data.imageset import ImageSet
from ..errors import GenrepError

__all__ = ["GENERATED", "INTERP_PAIRS", "check_ood_images", "make_ood_images", "ood_set_names"]

GENERATED = ("noise", "constant", "interp")
INTERP_PAIRS = ("random", "different_class")
INTERP_STRIDE = 100   # the HybViT code's OOD batch: image j of batch i mixes with image j of batch i - 1
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


def _random_pairs(n_in: int, n: int | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(p[k], p[k + stride]) of one shuffle after another: the code's batch i averaged with batch i - 1."""
    stride = min(INTERP_STRIDE, n_in // 2)
    per_shuffle = n_in - stride
    n = per_shuffle if n is None else n
    firsts, seconds = [], []
    for _ in range(-(-n // per_shuffle)):    # as many shuffles as n needs (ceil)
        p = torch.randperm(n_in, generator=g)
        firsts.append(p[:per_shuffle])
        seconds.append(p[stride:])
    return torch.cat(firsts)[:n], torch.cat(seconds)[:n]


def _different_class_pairs(y: Tensor, n: int, g: torch.Generator, name: str) -> tuple[Tensor, Tensor]:
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    if int((counts > 0).sum()) < 2:
        raise GenrepError(f"the interp OOD set with different_class pairs mixes images of two different classes, "
                          f"but {name} has only one class; use random pairs, or noise, constant or a data set")
    order = torch.argsort(y, stable=True)                 # indices grouped by class
    start = torch.cumsum(counts, 0) - counts              # where each class's group begins in ``order``
    a = torch.randint(0, len(y), (n,), generator=g)
    ya = y[a]
    # the r-th of the N - n_ya other-class images: positions before a's class group, then after it
    others = len(y) - counts[ya]
    r = torch.minimum((torch.rand(n, generator=g, dtype=torch.float64) * others).long(), others - 1)
    return a, order[torch.where(r < start[ya], r, r + counts[ya])]


def _interp(in_set: ImageSet, n: int | None, g: torch.Generator, pairs: str) -> Tensor:
    if len(in_set) < 2:
        raise GenrepError(f"the interp OOD set mixes two images of {in_set.name}, which has only {len(in_set)}")
    if pairs == "random":
        a, b = _random_pairs(len(in_set), n, g)
    else:
        a, b = _different_class_pairs(in_set.labels, len(in_set) if n is None else n, g, in_set.name)
    mixed = (in_set.images[a].to(torch.int16) + in_set.images[b].to(torch.int16) + 1) // 2
    return mixed.to(torch.uint8)


def make_ood_images(name: str, in_set: ImageSet, n: int | None, *, seed: int = 0,
                    root: str | os.PathLike | None = None, download: bool = False,
                    interp_pairs: str = "random") -> Tensor:
    """``n`` OOD images (None: the whole set), uint8 [n, C, H, W] with the in-distribution set's C, H and W (see
    the module doc)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise GenrepError(f"the number of OOD images must be a positive integer or None (all), got {n!r}")
    if interp_pairs not in INTERP_PAIRS:
        raise GenrepError(f"interp pairs {interp_pairs!r} are unknown; choose {', '.join(INTERP_PAIRS)}")
    if not isinstance(name, str) or not name.strip():
        raise GenrepError(f"OOD set name must be a non-empty string, got {name!r}; choose one of "
                          f"{', '.join(ood_set_names())}")
    text = name.strip()
    size, c = in_set.image_size, in_set.channels
    g = torch.Generator().manual_seed(seed)
    count = len(in_set) if n is None else n
    if text.lower() == "noise":
        return torch.randint(0, 256, (count, c, size, size), generator=g, dtype=torch.uint8)
    if text.lower() == "constant":
        colours = torch.randint(0, 256, (count, c, 1, 1), generator=g, dtype=torch.uint8)
        return colours.expand(-1, -1, size, size).contiguous()
    if text.lower() == "interp":
        return _interp(in_set, n, g, interp_pairs)
    if not _is_registry_name(text):
        raise GenrepError(f"unknown OOD set {text!r}; choose one of {', '.join(ood_set_names())}")
    images = _registry_test_images(text, size, c, None if root is None else str(root), download)
    if n is not None and len(images) > n:
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
