"""Image data sets by name: one uint8 tensor of images and one int64 tensor of labels per split.

Names (see ``docs/data.md``):

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), always available offline. A fixed
  stratified split: 20 % test, ``sklearn.model_selection.train_test_split(random_state=0)``
  (1,437 train / 360 test). Served at 16x16 unless ``image_size`` says otherwise.
- ``mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: torchvision data sets kept under
  ``<root>/<name>`` (``root`` defaults to :func:`default_data_root`), downloaded on first use when
  ``download`` is true. STL-10 gives its labelled train/test splits.
- ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``classes``), or the
  JPEG-bytes layout ``train_jpeg, train_offsets, y_train, test_jpeg, test_offsets, y_test``.
- ``folder:PATH``: ``PATH/<class>/<image>``, or ``PATH/train/<class>/...`` and ``PATH/test/...``;
  without train/ and test/ a seeded stratified 80/20 split per class.

Everything the user can get wrong is a one-line :class:`GenrepError`.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GenrepError

__all__ = ["ImageSet", "dataset_names", "default_data_root", "describe_datasets", "load_dataset"]

SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 16
FOLDER_TEST_FRACTION = 0.2
FOLDER_SPLIT_SEED = 0
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0   # per socket operation, so a black-holed network cannot hang a run
_RESIZE_CHUNK = 2048               # images per interpolation call (bounds the float32 working memory)
_FORMS = ("npz:PATH", "folder:PATH")
_OFFLINE_FIXES = ("or copy the files there, or set GENREP_DATA / root to a folder that has them, "
                  "or use npz:PATH")


# ----------------------------------------------------------------------------------------------- the set
@dataclass(repr=False)
class ImageSet:
    """One split of an image data set, held in memory on the CPU."""

    images: torch.Tensor   # uint8 [N, C, H, W], C = 1 or 3
    labels: torch.Tensor   # int64 [N]
    classes: list[str]
    name: str              # "digits", "cifar10", "npz:/path/x.npz", "folder:/path"

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if (not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4
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
def default_data_root() -> Path:
    """``$GENREP_DATA`` if set, else ``~/.cache/genrep/data``."""
    env = os.environ.get("GENREP_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "genrep" / "data"


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size]: bilinear, antialiased where it shrinks."""
    if size is None:
        return images
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


def _stack(images: list[torch.Tensor], size: int | None, what: str) -> torch.Tensor:
    """Stack [C, H, W] uint8 tensors, resizing when ``size`` is given; mixed sizes need ``size``."""
    shapes = {tuple(t.shape[1:]) for t in images}
    if len(shapes) <= 1:
        return _resize(torch.stack(images), size)
    if size is None:
        a, b = sorted(shapes)[:2]
        raise GenrepError(f"{what} has images of {len(shapes)} different sizes (e.g. {a[0]}x{a[1]} and "
                          f"{b[0]}x{b[1]}); pass image_size=N (data.image_size=N) to resize them all to NxN")
    out = torch.empty((len(images), images[0].shape[0], size, size), dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(images):
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    for idx in groups.values():
        out[idx] = _resize(torch.stack([images[i] for i in idx]), size)
    return out


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _pil_decode(data: bytes | str | os.PathLike, mode: str, what: str) -> torch.Tensor:
    """One image (bytes or a path) -> uint8 [C, H, W] in ``mode`` ("L" or "RGB")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise GenrepError(f"cannot decode {what}: {_one_line(e)}; it must be an image file Pillow can read")
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


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
    native_size: int
    channels: int
    num_classes: int = 10
    default_size: int | None = None
    # torchvision data sets only:
    files: Callable[[str], list[str]] | None = None         # split -> files (relative to <root>/<name>)
    make: Callable[[Path, str, bool], Any] | None = None     # (folder, split, download) -> torchvision set
    convert: Callable[[Any], tuple[torch.Tensor, torch.Tensor, list[str]]] | None = None


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


_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _convert_stl10(ds) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)
    return torch.from_numpy(np.ascontiguousarray(ds.data)), _labels(ds.labels), classes


_REGISTRY: dict[str, _Registered] = {
    r.name: r for r in [
        _Registered("digits", "scikit-learn's bundled 8x8 handwritten digits, 1,797 images, 10 classes "
                    "(fixed stratified 80/20 split, random_state 0; served at 16x16)", 8, 1,
                    default_size=DIGITS_DEFAULT_SIZE),
        _Registered("mnist", "MNIST handwritten digits, 60,000 train / 10,000 test, 10 classes", 28, 1,
                    files=_mnist_files,
                    make=lambda f, s, d: _tv().MNIST(str(f), train=s == "train", download=d),
                    convert=_convert_mnist),
        _Registered("cifar10", "CIFAR-10, 50,000 train / 10,000 test, 10 classes", 32, 3,
                    files=_cifar_files("CIFAR10"),
                    make=lambda f, s, d: _tv().CIFAR10(str(f), train=s == "train", download=d),
                    convert=_convert_cifar),
        _Registered("cifar100", "CIFAR-100 (fine labels), 50,000 train / 10,000 test, 100 classes", 32, 3, 100,
                    files=_cifar_files("CIFAR100"),
                    make=lambda f, s, d: _tv().CIFAR100(str(f), train=s == "train", download=d),
                    convert=_convert_cifar),
        _Registered("svhn", "SVHN cropped digits, 73,257 train / 26,032 test, 10 classes (no 'extra')", 32, 3,
                    files=_svhn_files,
                    make=lambda f, s, d: _tv().SVHN(str(f), split=s, download=d),
                    convert=_convert_svhn),
        _Registered("stl10", "STL-10 labelled splits, 5,000 train / 8,000 test, 10 classes, 96x96", 96, 3,
                    files=_stl10_files,
                    make=lambda f, s, d: _tv().STL10(str(f), split=s, download=d),
                    convert=_convert_stl10),
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
    return [f for f in files if not (folder / f).is_file()]


def _load_torchvision(reg: _Registered, split: str, data_root: Path,
                      download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    assert reg.files is not None and reg.make is not None and reg.convert is not None
    folder = data_root / reg.name
    files = reg.files(split)
    missing = _missing(folder, files)
    failure = None
    if missing and download:
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                return reg.convert(reg.make(folder, split, True))
        except Exception as e:  # noqa: BLE001 - network failures come as many types; reported below
            failure = _one_line(e)
        missing = _missing(folder, files)
    if missing:
        lacks = f"{folder} lacks {', '.join(missing)}"
        if failure is not None:
            raise GenrepError(f"{reg.name} is not available: downloading it to {folder} failed ({failure}) "
                              f"and {lacks}; run once with network access, {_OFFLINE_FIXES}")
        raise GenrepError(f"{reg.name} is not available offline: {lacks}; run once with network access and "
                          f"download=True (it downloads there), {_OFFLINE_FIXES}")
    try:
        ds = reg.make(folder, split, False)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, pickle/scipy errors on bad files
        raise GenrepError(f"{reg.name} files in {folder} are corrupted or incomplete ({_one_line(e)}); "
                          f"delete them and run once with network access, or copy intact originals there")
    return reg.convert(ds)


# ----------------------------------------------------------------------------------------------- npz
def _nchw(x: np.ndarray, what: str) -> torch.Tensor:
    """[N,H,W], [N,H,W,C] or [N,C,H,W] uint8 -> torch uint8 [N,C,H,W]. Ambiguous 4-D shapes read as NHWC."""
    if x.dtype != np.uint8:
        raise GenrepError(f"{what} has dtype {x.dtype}; images must be uint8 0..255 "
                          f"(if they are in [0, 1]: np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))")
    if x.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    if x.ndim == 4:
        if x.shape[3] in (1, 3):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        if x.shape[1] in (1, 3):
            return torch.from_numpy(np.ascontiguousarray(x))
    raise GenrepError(f"{what} has shape {tuple(x.shape)}; images must be [N,H,W], [N,H,W,C] or [N,C,H,W] "
                      f"with C = 1 or 3")


def _torchvision_decode_jpeg():
    """torchvision's batched JPEG decoder, or None where it is missing (it is deprecated since
    torchvision 0.29 in favour of TorchCodec, so a later release may drop it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(chunks: list[torch.Tensor], rgb: bool) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(chunks, mode=ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED)
    return decode


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray, size: int | None, what: str) -> torch.Tensor:
    """Concatenated JPEG files -> uint8 [N, C, H, W]. torchvision's batched decoder (about 2.5x faster
    than Pillow: 50,000 CIFAR images in about 1 s against 2.8 s, same pixels), Pillow as the fallback
    for anything it cannot read (PNG bytes, damaged files) or when torchvision lacks it."""
    data = torch.from_numpy(np.ascontiguousarray(buf))
    bounds = offsets.tolist()
    chunks = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    decode = _torchvision_decode_jpeg()
    images = None
    if decode is not None:
        try:
            images = decode(chunks, False)
            if {t.shape[0] for t in images} not in ({1}, {3}):
                images = decode(chunks, True)    # mixed grey/colour or CMYK: all RGB
        except (RuntimeError, ValueError):       # not JPEG (PNG bytes, say) or damaged
            images = None
    if images is None:
        from PIL import Image

        images = []
        for i, c in enumerate(chunks):
            raw = c.numpy().tobytes()
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    mode = "L" if im.mode in _GRAY_MODES else "RGB"
            except (OSError, ValueError, SyntaxError):
                mode = "RGB"   # _pil_decode reports it
            images.append(_pil_decode(raw, mode, f"image {i} of {what}"))
        if {t.shape[0] for t in images} == {1, 3}:
            images = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in images]
    return _stack(images, size, what)


_Loaded = tuple[torch.Tensor, torch.Tensor, list[str], str]   # images, labels, classes, full name


def _load_npz(path_text: str, split: str, size: int | None) -> _Loaded:
    path = Path(path_text).expanduser()
    name = f"npz:{path_text}"
    if not path_text:
        raise GenrepError("npz: needs a file path, e.g. npz:/data/cifar10-jpeg.npz")
    if not path.is_file():
        raise GenrepError(f"{name}: no such file {path}; give the path of an .npz with x_train, y_train, "
                          f"x_test, y_test (or the JPEG layout train_jpeg, train_offsets, ...)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise GenrepError(f"{name}: cannot read {path} as a NumPy .npz archive ({_one_line(e)}); write it "
                          f"with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise GenrepError(f"{name}: {path} holds a single array, not an .npz archive; write it with "
                          f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    with z:
        keys = set(z.files)

        def get(key: str) -> np.ndarray:
            try:
                return z[key]
            except ValueError as e:   # object arrays need pickle
                raise GenrepError(f"{name}: array '{key}' cannot be read without pickle ({_one_line(e)}); "
                                  f"store it as a plain numeric or string array "
                                  f"(e.g. np.array(names, dtype=str))")

        if {f"{split}_jpeg", f"{split}_offsets"} & keys:
            need = [f"{split}_jpeg", f"{split}_offsets", f"y_{split}"]
            layout = "JPEG"
        else:
            need = [f"x_{split}", f"y_{split}"]
            layout = "array"
        lacking = [k for k in need if k not in keys]
        if lacking:
            has = ", ".join(sorted(keys)) or "nothing"
            raise GenrepError(f"{name}: {path} lacks {', '.join(lacking)} (it has {has}); expected x_train, "
                              f"y_train, x_test, y_test (+ optional classes), or the JPEG layout "
                              f"train_jpeg, train_offsets, y_train, test_jpeg, test_offsets, y_test")
        if layout == "JPEG":
            buf, off = get(f"{split}_jpeg"), get(f"{split}_offsets")
            if buf.dtype != np.uint8 or buf.ndim != 1:
                raise GenrepError(f"{name}: {split}_jpeg must be a 1-D uint8 byte buffer, got {buf.dtype} "
                                  f"{tuple(buf.shape)}")
            if (off.ndim != 1 or not np.issubdtype(off.dtype, np.integer) or len(off) < 1 or off[0] < 0
                    or off[-1] > len(buf) or (np.diff(off) < 0).any()):
                raise GenrepError(f"{name}: {split}_offsets must be N+1 non-decreasing integers within the "
                                  f"{len(buf)}-byte {split}_jpeg buffer (image i = buf[off[i]:off[i+1]])")
            n = len(off) - 1
            y = _check_labels(get(f"y_{split}"), n, name, f"y_{split}")
            if n:
                images = _decode_jpegs(buf, off, size, f"{name} ({split})")
            else:
                images = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        else:
            images = _nchw(get(f"x_{split}"), f"{name}: x_{split}")
            y = _check_labels(get(f"y_{split}"), len(images), name, f"y_{split}")
            if len(images):
                images = _resize(images, size)
        if "classes" in keys:
            raw = get("classes").reshape(-1)
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw.tolist()]
        else:   # as many classes as the largest label of either split says
            other = "test" if split == "train" else "train"
            top = int(y.max()) if len(y) else -1
            if f"y_{other}" in keys:
                y_other = get(f"y_{other}")
                if y_other.size and np.issubdtype(y_other.dtype, np.integer):
                    top = max(top, int(y_other.max()))
            classes = [str(i) for i in range(top + 1)]
    return images, y, classes, f"npz:{os.path.abspath(path)}"


# ----------------------------------------------------------------------------------------------- folder
def _image_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _class_files(folder: Path, exts: frozenset[str]) -> dict[str, list[Path]]:
    """class name -> sorted image files (recursive) for each sub-folder of ``folder``."""
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in exts
                             and not any(part.startswith(".") for part in p.relative_to(d).parts))
    return out


def _split_counts(n: int) -> int:
    """Test images out of n in the automatic per-class split (rounded half up)."""
    return int(np.floor(n * FOLDER_TEST_FRACTION + 0.5))


def _load_folder(path_text: str, split: str, size: int | None) -> _Loaded:
    from PIL import Image

    name = f"folder:{path_text}"
    if not path_text:
        raise GenrepError("folder: needs a directory, e.g. folder:/data/pets with one sub-folder per class")
    root = Path(path_text).expanduser()
    if not root.is_dir():
        raise GenrepError(f"{name}: no such directory {root}; give a folder with one sub-folder of images "
                          f"per class (optionally under train/ and test/)")
    exts = _image_extensions()
    if (root / "train").is_dir() and (root / "test").is_dir():
        per_split = {s: _class_files(root / s, exts) for s in SPLITS}
        classes = sorted(set(per_split["train"]) | set(per_split["test"]))
        index = {c: i for i, c in enumerate(classes)}
        files_of = {s: [(f, index[c]) for c, fs in per_split[s].items() for f in fs] for s in SPLITS}
        where = f"{root}/{{train,test}}"
    else:
        per_class = _class_files(root, exts)
        classes = list(per_class)
        files_of = {"train": [], "test": []}
        for ci, c in enumerate(classes):
            fs = per_class[c]
            rng = np.random.default_rng([FOLDER_SPLIT_SEED, ci])
            test = set(rng.permutation(len(fs))[: _split_counts(len(fs))].tolist())
            files_of["train"] += [(f, ci) for i, f in enumerate(fs) if i not in test]
            files_of["test"] += [(f, ci) for i, f in enumerate(fs) if i in test]
        where = str(root)
    if not classes:
        raise GenrepError(f"{name}: {where} has no class sub-folders; expected {root}/<class>/<image files> "
                          f"(optionally under train/ and test/)")
    total = len(files_of["train"]) + len(files_of["test"])
    if total == 0:
        raise GenrepError(f"{name}: no image files in the class sub-folders of {where} (looked for "
                          f"{', '.join(e for e in ('.png', '.jpg', '.jpeg', '.bmp') if e in exts)}, ...)")
    if not files_of[split]:
        raise GenrepError(f"{name}: the {split} split is empty ({total} images in all; the automatic split "
                          f"puts {FOLDER_TEST_FRACTION:.0%} of each class in test, rounded); add images, or "
                          f"make train/ and test/ sub-folders")
    # one pass over every header (cheap, lazy) so both splits agree on channels and the size check
    modes, sizes = set(), set()
    for f, _ in files_of["train"] + files_of["test"]:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                sizes.add(im.size)
        except (OSError, ValueError, SyntaxError) as e:
            raise GenrepError(f"{name}: cannot read {f} as an image ({_one_line(e)}); remove or replace it")
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    if len(sizes) > 1 and size is None:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise GenrepError(f"{name}: images come in {len(sizes)} sizes (e.g. {h1}x{w1} and {h2}x{w2}); pass "
                          f"image_size=N (data.image_size=N) to resize them all to NxN")
    images = [_pil_decode(f, mode, str(f)) for f, _ in files_of[split]]
    labels = torch.tensor([c for _, c in files_of[split]], dtype=torch.int64)
    return _stack(images, size, name), labels, classes, f"folder:{os.path.abspath(root)}"


# ----------------------------------------------------------------------------------------------- public API
def dataset_names() -> list[str]:
    """Registered names, then the two path forms ``npz:PATH`` and ``folder:PATH``."""
    return list(_REGISTRY) + list(_FORMS)


def _valid_names_text() -> str:
    return f"{', '.join(_REGISTRY)}, npz:PATH (x_train/y_train/x_test/y_test arrays or the JPEG layout) or " \
           f"folder:PATH (one sub-folder per class)"


def load_dataset(name: str, split: str = "train", *, image_size: int | None = None,
                 root: str | os.PathLike | None = None, download: bool = True) -> ImageSet:
    """Load one split of a data set as uint8 [N, C, H, W] images and int64 labels on the CPU.

    ``image_size`` resizes to ``image_size x image_size`` (bilinear, antialiased when shrinking);
    ``None`` keeps the native size (digits: 16). ``root`` is the cache folder of the torchvision sets
    (default :func:`default_data_root`); ``download`` lets them be fetched when missing.
    """
    if not isinstance(name, str) or not name.strip():
        raise GenrepError(f"data set name must be a non-empty string, got {name!r}; valid: "
                          f"{_valid_names_text()}")
    if split not in SPLITS:
        raise GenrepError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise GenrepError(f"image_size must be a positive integer or None (native size), got {image_size!r}")
    text = name.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() == "npz":
        images, labels, classes, full = _load_npz(rest.strip(), split, image_size)
        return _finish(images, labels, classes, full, split)
    if sep and kind.lower() == "folder":
        images, labels, classes, full = _load_folder(rest.strip(), split, image_size)
        return _finish(images, labels, classes, full, split)
    reg = _REGISTRY.get(text.lower())
    if reg is None:
        import difflib

        close = difflib.get_close_matches(text.lower(), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise GenrepError(f"unknown data set {text!r}; {hint}valid: {_valid_names_text()}")
    if reg.name == "digits":
        images, labels, classes = _load_digits(split)
    else:
        data_root = Path(root).expanduser() if root is not None else default_data_root()
        images, labels, classes = _load_torchvision(reg, split, data_root, download)
    size = image_size if image_size is not None else reg.default_size
    return _finish(_resize(images, size), labels, classes, reg.name, split)


def describe_datasets(root: str | os.PathLike | None = None) -> list[dict]:
    """One dict per registered data set, for ``genrep datasets``: ``name``, ``description``, ``splits``,
    ``native_size`` (int), ``size`` (e.g. "32x32"), ``channels``, ``num_classes``, ``available`` (usable offline right now:
    embedded, or every file present under ``where``; presence only, no checksum), ``where`` (the folder
    it looks in) and ``files`` (what it looks for there). The ``npz:PATH`` / ``folder:PATH`` forms read
    the user's own files and are not listed."""
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    rows = []
    for reg in _REGISTRY.values():
        row = {"name": reg.name, "description": reg.description, "splits": list(SPLITS),
               "native_size": reg.native_size, "size": f"{reg.native_size}x{reg.native_size}",
               "channels": reg.channels, "num_classes": reg.num_classes}
        if reg.files is None:
            row.update(available=True, where="embedded (scikit-learn)", files=[])
        else:
            folder = data_root / reg.name
            files = sorted({f for s in SPLITS for f in reg.files(s)})
            row.update(available=not _missing(folder, files), where=str(folder), files=files)
        rows.append(row)
    return rows
