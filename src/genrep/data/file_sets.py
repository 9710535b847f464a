"""The registered sets read from their published files rather than converted from a torchvision object's arrays:
``celeba`` (torchvision's CelebA finds the split's JPEGs), ``tinyimagenet`` (its folder layout) and
``imagenet32`` (the npz batches of Chrabaszcz et al. 2017). The registry in :mod:`.torchvision_sets` lists
their files, says where to get them when they are missing, and reports a damaged file in one line.

Each set has ``make(folder, split, download)`` (find the split's files, fetching them where genrep can) and
``convert(made, size, resize)`` -> (uint8 [N, C, H, W] images, int64 labels, class names).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GenrepError
from .imageset import _stack
from .resize import CENTER_CROP, SQUASH, center_crop_pil, check_center_crop

_Converted = tuple[torch.Tensor, torch.Tensor, list[str]]

# PIL decodes and resizes outside the GIL, so a few threads divide the time of 100,000 small JPEGs
_DECODE_THREADS = min(8, os.cpu_count() or 1)


def decode_files(paths: list[Path], size: int | None, what: str, how: str = SQUASH) -> torch.Tensor:
    """RGB uint8 [N, 3, H, W] from image files, each resized as it is decoded, so only the resized set is held.
    ``squash``: PIL's bilinear filter to size x size, what torchvision's ``Resize((size, size))`` does to a PIL
    image (the HybViT code's transform of CelebA). ``center_crop``: guided-diffusion's centre crop
    (:mod:`.resize`), every header checked first, so a file it refuses stops the load before any decoding."""
    from PIL import Image

    crop = how == CENTER_CROP and size is not None

    def header(path: Path) -> None:
        with Image.open(path) as im:
            check_center_crop(im.width, im.height, size, f"{what}: {path}")

    def one(path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop:
                im = center_crop_pil(im, size)
            elif size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        if crop:
            list(pool.map(header, paths))
        images = list(pool.map(one, paths))
    if not images:
        return torch.empty(0, 3, size or 1, size or 1, dtype=torch.uint8)
    return _stack(images, None, what).contiguous()


@dataclass
class LabelledFiles:
    """A split as image files, their labels (0..K-1) and the K class names: what a set's ``make`` finds."""
    paths: list[Path]
    labels: list[int]
    classes: list[str]


def convert_files(files: LabelledFiles, size: int | None, how: str, what: str) -> _Converted:
    return decode_files(files.paths, size, what, how), torch.tensor(files.labels, dtype=torch.int64), files.classes


# ----------------------------------------------------------------------------------------------- CelebA
CELEBA_CLASSES = ["face"]   # its 40 attributes are not one label per image; as an OOD set only the images count


def celeba_files(split: str) -> list[str]:
    # torchvision's CelebA checks the md5 of all five lists (it reads them all) and that the images were unzipped
    lists = ["list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
             "list_landmarks_align_celeba.txt", "list_eval_partition.txt"]
    return [f"celeba/{f}" for f in lists] + ["celeba/img_align_celeba/"]


def make_celeba(folder: Path, split: str, download: bool):
    import torchvision.datasets as tvd

    return tvd.CelebA(str(folder), split=split, target_type=[], download=download)


def convert_celeba(ds, size: int | None, how: str) -> _Converted:
    """The aligned 178x218 faces of the split (list_eval_partition.txt: train 162,770, test 19,962)."""
    base = Path(ds.root) / ds.base_folder / "img_align_celeba"
    images = decode_files([base / f for f in ds.filename], size, "celeba", how)
    return images, torch.zeros(len(images), dtype=torch.int64), list(CELEBA_CLASSES)


# ----------------------------------------------------------------------------------------------- Tiny-ImageNet
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_DIR = "tiny-imagenet-200"
_JPEG = (".jpeg", ".jpg")


def tiny_files(split: str) -> list[str]:
    # the labelled splits: train/<wnid>/images/*.JPEG, and val/ (images + val_annotations.txt) as test
    if split == "train":
        return [f"{TINY_DIR}/wnids.txt", f"{TINY_DIR}/train/"]
    return [f"{TINY_DIR}/wnids.txt", f"{TINY_DIR}/val/val_annotations.txt", f"{TINY_DIR}/val/images/"]


def make_tiny(folder: Path, split: str, download: bool) -> LabelledFiles:
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_URL, str(folder), md5=TINY_MD5)
    root = folder / TINY_DIR
    wnids = (root / "wnids.txt").read_text().split()
    # sorted like torchvision's ImageFolder, which the HybViT code reads it with: the same label numbers
    classes = sorted(set(wnids))
    index = {w: i for i, w in enumerate(classes)}
    paths, labels = [], []
    if split == "train":
        for w in classes:
            found = sorted(p for p in (root / "train" / w / "images").glob("*") if p.suffix.lower() in _JPEG)
            if not found:
                raise GenrepError(f"tinyimagenet: {root / 'train' / w / 'images'} has no JPEG images; the "
                                  f"extracted set is incomplete: delete {root} and extract {TINY_URL} again")
            paths += found
            labels += [index[w]] * len(found)
    else:
        for n, line in enumerate((root / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise GenrepError(f"tinyimagenet: line {n} of {root / 'val' / 'val_annotations.txt'} does not name "
                                  f"an image and a class of wnids.txt ({line[:80]!r}); the file is damaged")
            paths.append(root / "val" / "images" / fields[0])
            labels.append(index[fields[1]])
    return LabelledFiles(paths, labels, classes)


def convert_tiny(files: LabelledFiles, size: int | None, how: str) -> _Converted:
    """200 classes of 64x64 images: 100,000 train, the 10,000 labelled val images as test (some are grey:
    read as RGB)."""
    return convert_files(files, size, how, "tinyimagenet")


# ----------------------------------------------------------------------------------------------- ImageNet32
IMAGENET32_CLASSES = 1000
IMAGENET32_URL = "https://image-net.org/download-images.php"


def imagenet32_files(split: str) -> list[str]:
    # the two official zips unpack to these folders
    if split == "train":
        return [f"Imagenet32_train_npz/train_data_batch_{i}.npz" for i in range(1, 11)]
    return ["Imagenet32_val_npz/val_data.npz"]


def make_imagenet32(folder: Path, split: str, download: bool) -> list[Path]:
    return [folder / f for f in imagenet32_files(split)]


def _imagenet32_labels(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if not {"data", "labels"} <= set(z.files):
            raise GenrepError(f"imagenet32: {path} has {', '.join(sorted(z.files)) or 'no arrays'}, not 'data' and "
                              f"'labels'; it is not a Downsampled ImageNet batch: download it again")
        y = np.asarray(z["labels"]).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 1 or y.max() > IMAGENET32_CLASSES)):
        raise GenrepError(f"imagenet32: the labels of {path} must be the integers 1..{IMAGENET32_CLASSES} of the "
                          f"published batches, got {y.dtype} from {y.min() if len(y) else '-'} to "
                          f"{y.max() if len(y) else '-'}")
    return y.astype(np.int64) - 1     # published 1-based


def convert_imagenet32(paths: list[Path], size: int | None, how: str) -> _Converted:
    """Each batch holds 'data', uint8 [N, 3072]: the 32x32 R, G and B planes in turn (CHW), and 'labels' 1..1000.
    The labels are read first, so the images go straight into one tensor (1.28 M train images: 3.9 GB, not twice).
    Native images: load_dataset resizes them afterwards."""
    labels = [_imagenet32_labels(p) for p in paths]
    images = torch.empty((sum(len(y) for y in labels), 3, 32, 32), dtype=torch.uint8)
    at = 0
    for path, y in zip(paths, labels):
        with np.load(path, allow_pickle=False) as z:
            x = z["data"]
        if x.dtype != np.uint8 or x.shape != (len(y), 3 * 32 * 32):
            raise GenrepError(f"imagenet32: 'data' of {path} is {x.dtype} {tuple(x.shape)}; a 32x32 batch holds "
                              f"uint8 [{len(y)}, 3072] (one row per label)")
        images[at:at + len(y)] = torch.from_numpy(x.reshape(-1, 3, 32, 32))
        at += len(y)
    return images, torch.from_numpy(np.concatenate(labels)), [str(i) for i in range(IMAGENET32_CLASSES)]
