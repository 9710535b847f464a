"""The registered data sets: the embedded ``digits``, the torchvision-backed ``mnist``, ``cifar10``,
``cifar100``, ``svhn`` and ``stl10``, the sets read from their published files, ``celeba``, ``tinyimagenet``
and ``imagenet32`` (:mod:`.file_sets`), and the diffusion-features paper's fine-grained transfer sets
``aircraft``, ``cars``, ``cub``, ``dogs``, ``flowers`` and ``nabirds`` (:mod:`.fgvc_sets`): file lists,
converters, download under a socket timeout, and the error that says how to get the files when they are
missing offline.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GenrepError
from . import fgvc_sets as fg
from . import file_sets as fs
from .imageset import _one_line
from .resize import CENTER_CROP, SQUASH

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 16
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0   # per socket operation, so a black-holed network cannot hang a run
_OFFLINE_FIXES = ("or copy the files there, or set GENREP_DATA / root to a folder that has them, "
                  "or use npz:PATH")


# ----------------------------------------------------------------------------------------------- digits
def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)       # 0..16 -> 0..255
    y = d.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=y)
    idx = np.sort(train_idx if split == "train" else test_idx)
    return torch.from_numpy(x[idx]).unsqueeze(1), torch.from_numpy(y[idx]), [str(i) for i in range(10)]


# ----------------------------------------------------------------------------------------------- torchvision
@dataclass(frozen=True)
class _Registered:
    name: str
    description: str
    native_size: int | None                                  # the height (and width, unless native_width); None: varies
    channels: int
    num_classes: int = 10
    default_size: int | None = None
    native_width: int | None = None                          # non-square sets only (CelebA's faces)
    # sets kept under <root>/<name> only:
    files: Callable[[str], list[str]] | None = None         # split -> files (a trailing / names a folder)
    make: Callable[[Path, str, bool], Any] | None = None     # (folder, split, download) -> torchvision set
    # (made, size, resize) -> images, labels, classes; a converter that decodes image files resizes as it decodes
    # (to hold 162,770 CelebA faces at 32x32, not at 218x178); the others give native images, resized afterwards
    convert: Callable[[Any, int | None, str], tuple[torch.Tensor, torch.Tensor, list[str]]] | None = None
    fetch: bool = True   # False: genrep never downloads it (an account, or none at run time); ``source`` says where
    source: str = ""     # how to get the files, said when they are missing
    resize: str = SQUASH  # how image_size is reached unless data.resize says (genrep.data.resize)


def _tv():
    import torchvision.datasets as tvd

    return tvd


def _mnist_files(split: str) -> list[str]:
    # torchvision checks all four raw files whichever split is asked for
    return [f"MNIST/raw/{os.path.splitext(f)[0]}" for f, _ in _tv().MNIST.resources]


def _cifar_files(cls_name: str) -> Callable[[str], list[str]]:
    def files(split: str) -> list[str]:
        cls = getattr(_tv(), cls_name)
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [f"{cls.base_folder}/{f}" for f in names]
    return files


def _svhn_files(split: str) -> list[str]:
    return [_tv().SVHN.split_list[split][1]]


def _stl10_files(split: str) -> list[str]:
    # torchvision verifies every file of the archive (unlabeled_X.bin too) before loading either split
    cls = _tv().STL10
    return [f"{cls.base_folder}/{f}" for f, _ in cls.train_list + cls.test_list]


def _labels(seq) -> torch.Tensor:
    return torch.from_numpy(np.asarray(seq, dtype=np.int64).reshape(-1).copy())


def _convert_mnist(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return ds.data.to(torch.uint8).unsqueeze(1), ds.targets.to(torch.int64), [str(i) for i in range(10)]


def _convert_cifar(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))   # NHWC -> NCHW
    return x, _labels(ds.targets), list(ds.classes)


def _convert_svhn(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return torch.from_numpy(np.ascontiguousarray(ds.data)), _labels(ds.labels), [str(i) for i in range(10)]


def _native(convert: Callable[[Any], tuple[torch.Tensor, torch.Tensor, list[str]]]):
    """A converter of a torchvision set's in-memory arrays: native images, which load_dataset resizes."""
    return lambda ds, size, how: convert(ds)


_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _convert_stl10(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)
    return torch.from_numpy(np.ascontiguousarray(ds.data)), _labels(ds.labels), classes


def _fgvc_convert(name: str):
    return lambda files, size, how: fs.convert_files(files, size, how, name)


# the diffusion-features paper's transfer sets (table 5): name, description with table 5's split, classes, files,
# make, where to get them; none is downloaded at run time
_FGVC = [
    ("aircraft", "FGVC Aircraft variants, 6,667 trainval as train / 3,333 test, 100 classes", 100,
     fg.aircraft_files, fg.make_aircraft,
     f"download fgvc-aircraft-2013b.tar.gz from {fg.AIRCRAFT_URL} and unpack it there"),
    ("cars", "Stanford Cars, 8,144 train / 8,041 test, 196 classes", 196, fg.cars_files, fg.make_cars,
     "the Stanford site no longer serves it: put the original release's devkit/ (car_devkit.tgz), cars_train/, "
     "cars_test/ and cars_test_annos_withlabels.mat in its stanford_cars/ sub-folder (torchvision's layout)"),
    ("cub", "CUB-200-2011 birds, 5,994 train / 5,794 test, 200 classes", 200, fg.cub_files, fg.make_cub,
     f"download CUB_200_2011.tgz from {fg.CUB_URL} and unpack it there"),
    ("dogs", "Stanford Dogs, 12,000 train / 8,580 test, 120 classes", 120, fg.dogs_files, fg.make_dogs,
     f"download images.tar and lists.tar from {fg.DOGS_URL} and unpack both there"),
    ("flowers", "Oxford Flowers-102, 2,040 train+val as train / 6,149 test, 102 classes", 102, fg.flowers_files,
     fg.make_flowers, f"download 102flowers.tgz (unpack it: jpg/), imagelabels.mat and setid.mat from "
     f"{fg.FLOWERS_URL} into its flowers-102/ sub-folder"),
    ("nabirds", "NABirds species, 23,929 train / 24,633 test, 555 classes", 555, fg.nabirds_files, fg.make_nabirds,
     f"download nabirds.tar.gz from {fg.NABIRDS_URL} (after accepting its terms) and unpack it there"),
]

_REGISTRY: dict[str, _Registered] = {
    r.name: r for r in [
        _Registered("digits", "scikit-learn's bundled 8x8 handwritten digits, 1,797 images, 10 classes "
                    "(fixed stratified 80/20 split, random_state 0; served at 16x16)", 8, 1,
                    default_size=DIGITS_DEFAULT_SIZE),
        _Registered("mnist", "MNIST handwritten digits, 60,000 train / 10,000 test, 10 classes", 28, 1,
                    files=_mnist_files,
                    make=lambda f, s, d: _tv().MNIST(str(f), train=s == "train", download=d),
                    convert=_native(_convert_mnist)),
        _Registered("cifar10", "CIFAR-10, 50,000 train / 10,000 test, 10 classes", 32, 3,
                    files=_cifar_files("CIFAR10"),
                    make=lambda f, s, d: _tv().CIFAR10(str(f), train=s == "train", download=d),
                    convert=_native(_convert_cifar)),
        _Registered("cifar100", "CIFAR-100 (fine labels), 50,000 train / 10,000 test, 100 classes", 32, 3, 100,
                    files=_cifar_files("CIFAR100"),
                    make=lambda f, s, d: _tv().CIFAR100(str(f), train=s == "train", download=d),
                    convert=_native(_convert_cifar)),
        _Registered("svhn", "SVHN cropped digits, 73,257 train / 26,032 test, 10 classes (no 'extra')", 32, 3,
                    files=_svhn_files,
                    make=lambda f, s, d: _tv().SVHN(str(f), split=s, download=d),
                    convert=_native(_convert_svhn)),
        _Registered("stl10", "STL-10 labelled splits, 5,000 train / 8,000 test, 10 classes, 96x96", 96, 3,
                    files=_stl10_files,
                    make=lambda f, s, d: _tv().STL10(str(f), split=s, download=d),
                    convert=_native(_convert_stl10)),
        _Registered("celeba", "CelebA aligned faces (178 wide, 218 high), 162,770 train / 19,962 test, one "
                    "class 'face' (an OOD set: resized to NxN without cropping, as the HybViT code)", 218, 3, 1,
                    native_width=178, files=fs.celeba_files, make=fs.make_celeba, convert=fs.convert_celeba,
                    source="torchvision fetches it from Google Drive and needs gdown (pip install gdown); or "
                           "download img_align_celeba.zip (unzip it there) and the five list files from "
                           "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into its celeba/ sub-folder"),
        _Registered("tinyimagenet", "Tiny-ImageNet, 100,000 train / 10,000 val as test, 200 classes, 64x64", 64, 3,
                    200, files=fs.tiny_files, make=fs.make_tiny, convert=fs.convert_tiny,
                    source=f"or download {fs.TINY_URL} and unzip it there"),
        _Registered("imagenet32", "Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017), 1,281,167 train / 50,000 "
                    "val as test, 1,000 classes", 32, 3, fs.IMAGENET32_CLASSES,
                    files=fs.imagenet32_files, make=fs.make_imagenet32, convert=fs.convert_imagenet32, fetch=False,
                    source=f"download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip from {fs.IMAGENET32_URL} "
                           f"(an ImageNet account) and unzip both there"),
        *[_Registered(name, f"{text}; any size, served centre-cropped at {fg.FGVC_SIZE}", None, 3, classes,
                      default_size=fg.FGVC_SIZE, files=files, make=make, convert=_fgvc_convert(name), fetch=False,
                      source=source, resize=CENTER_CROP)
          for name, text, classes, files, make, source in _FGVC],
    ]
}


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _missing(folder: Path, files: list[str]) -> list[str]:
    return [f for f in files if not ((folder / f).is_dir() if f.endswith("/") else (folder / f).is_file())]


def _load_torchvision(reg: _Registered, split: str, data_root: Path, download: bool,
                      size: int | None, how: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    assert reg.files is not None and reg.make is not None and reg.convert is not None
    folder = data_root / reg.name
    files = reg.files(split)
    missing = _missing(folder, files)
    failure = None
    if missing and download and reg.fetch:
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                return reg.convert(reg.make(folder, split, True), size, how)
        except GenrepError:
            raise
        except Exception as e:  # noqa: BLE001 - network failures come as many types; reported below
            failure = _one_line(e)
        missing = _missing(folder, files)
    if missing:
        lacks = f"{folder} lacks {', '.join(missing)}"
        if failure is not None:
            raise GenrepError(f"{reg.name} is not available: downloading it to {folder} failed ({failure}) "
                              f"and {lacks}; run once with network access, {_OFFLINE_FIXES}"
                              f"{'; ' + reg.source if reg.source else ''}")
        if not reg.fetch:
            raise GenrepError(f"{reg.name} is not available: {lacks}; genrep cannot download it: {reg.source}, "
                              f"{_OFFLINE_FIXES}")
        raise GenrepError(f"{reg.name} is not available offline: {lacks}; run once with network access and "
                          f"download=True (it downloads there), {_OFFLINE_FIXES}"
                          f"{'; ' + reg.source if reg.source else ''}")
    try:
        return reg.convert(reg.make(folder, split, False), size, how)
    except GenrepError:
        raise
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, pickle/scipy/PIL errors on bad files
        fix = ("delete them and run once with network access, or copy intact originals there" if reg.fetch
               else f"replace them with intact originals: {reg.source}")
        raise GenrepError(f"{reg.name} files in {folder} are corrupted or incomplete ({_one_line(e)}); {fix}")
