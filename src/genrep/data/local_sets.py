"""The user's own files: ``npz:PATH`` (the array layout and the JPEG-bytes layout) and
``folder:PATH`` (one sub-folder per class, optionally under train/ and test/).
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import GenrepError
from .imageset import _GRAY_MODES, SPLITS, _check_labels, _one_line, _pil_decode, _resize, _stack
from .resize import CENTER_CROP, center_crop_pil, check_center_crop

FOLDER_TEST_FRACTION = 0.2
FOLDER_SPLIT_SEED = 0


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


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray, size: int | None, what: str, how: str) -> torch.Tensor:
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
    return _stack(images, size, what, how)


_Loaded = tuple[torch.Tensor, torch.Tensor, list[str], str]   # images, labels, classes, full name


def _load_npz(path_text: str, split: str, size: int | None, how: str) -> _Loaded:
    path = Path(path_text).expanduser()
    name = f"npz:{path_text}"
    if not path_text:
        raise GenrepError("npz: needs a file path, e.g. npz:/data/cifar10-jpeg.npz")
    if not path.is_file():
        raise GenrepError(f"{name}: no such file {path}; give the path of an .npz with x_train, y_train, "
                          f"x_test, y_test (or the JPEG layout train_jpeg, train_offsets, ...)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
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
                images = _decode_jpegs(buf, off, size, f"{name} ({split})", how)
            else:
                images = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        else:
            images = _nchw(get(f"x_{split}"), f"{name}: x_{split}")
            y = _check_labels(get(f"y_{split}"), len(images), name, f"y_{split}")
            if len(images):
                images = _resize(images, size, how, f"{name} ({split})")
        if "classes" in keys:
            raw = get("classes").reshape(-1)
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw.tolist()]
        else:   # the classes are the labels that occur in either split: each must have images
            other = "test" if split == "train" else "train"
            seen = set(np.unique(y.numpy()).tolist())
            if f"y_{other}" in keys:
                y_other = get(f"y_{other}").reshape(-1)
                if y_other.size and np.issubdtype(y_other.dtype, np.integer):
                    seen |= set(np.unique(y_other).tolist())
            top = max(seen, default=-1)
            if len(seen) < top + 1:
                gaps = [c for c in range(top + 1) if c not in seen][:3]
                raise GenrepError(f"{name}: labels run to {top} but only {len(seen)} of the classes 0..{top} have "
                                  f"images (none of {', '.join(map(str, gaps))}, ...); relabel to 0..K-1, or store "
                                  f"all class names as 'classes' in the .npz to declare them")
            classes = [str(i) for i in range(top + 1)]
    return images, y, classes, f"npz:{os.path.abspath(path)}"


# ----------------------------------------------------------------------------------------------- folder
# genrep's models take images up to 1024 pixels a side (data.image_size); a source image above this many pixels
# is refused from its header, so a decompression bomb never allocates
MAX_FOLDER_PIXELS = 4096 * 4096

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


def folder_splits(root: Path, name: str, test_dirs: tuple[str, ...] = ("test",),
                  ) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """(classes, {split: [(file, label)]}, where) of an image folder: ``root/<class>/<image>``, or ``root/train/...``
    beside one of ``test_dirs`` (``folder:`` reads test/; ``genrep pack`` also ImageNet's val/); without them a
    seeded stratified 80/20 split per class. ``name`` opens every refusal."""
    exts = _image_extensions()
    test_dir = next((root / d for d in test_dirs if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        per_split = {"train": _class_files(root / "train", exts), "test": _class_files(test_dir, exts)}
        classes = sorted(set(per_split["train"]) | set(per_split["test"]))
        index = {c: i for i, c in enumerate(classes)}
        files_of = {s: [(f, index[c]) for c, fs in per_split[s].items() for f in fs] for s in SPLITS}
        where = f"{root}/{{train,{test_dir.name}}}"
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
                          f"(optionally under train/ and {'/'.join(test_dirs)}/)")
    total = len(files_of["train"]) + len(files_of["test"])
    if total == 0:
        raise GenrepError(f"{name}: no image files in the class sub-folders of {where} (looked for "
                          f"{', '.join(e for e in ('.png', '.jpg', '.jpeg', '.bmp') if e in exts)}, ...)")
    return classes, files_of, where


def _load_folder(path_text: str, split: str, size: int | None, how: str) -> _Loaded:
    from PIL import Image

    name = f"folder:{path_text}"
    if not path_text:
        raise GenrepError("folder: needs a directory, e.g. folder:/data/pets with one sub-folder per class")
    root = Path(path_text).expanduser()
    if not root.is_dir():
        raise GenrepError(f"{name}: no such directory {root}; give a folder with one sub-folder of images "
                          f"per class (optionally under train/ and test/)")
    classes, files_of, _ = folder_splits(root, name)
    total = len(files_of["train"]) + len(files_of["test"])
    if not files_of[split]:
        raise GenrepError(f"{name}: the {split} split is empty ({total} images in all; the automatic split "
                          f"puts {FOLDER_TEST_FRACTION:.0%} of each class in test, rounded); add images, or "
                          f"make train/ and test/ sub-folders")
    # one pass over every header (cheap, lazy) so both splits agree on channels and the size check
    modes, sizes = set(), set()
    for f, _ in files_of["train"] + files_of["test"]:
        try:
            with warnings.catch_warnings(), Image.open(f) as im:  # our own pixel limit below says it in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                modes.add(im.mode)
                sizes.add(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise GenrepError(f"{name}: cannot read {f} as an image ({_one_line(e)}); remove or replace it")
        if im.size[0] * im.size[1] > MAX_FOLDER_PIXELS:  # checked from the header, before any decoding
            raise GenrepError(f"{name}: {f} is {im.size[0]}x{im.size[1]} pixels, more than genrep decodes "
                              f"({MAX_FOLDER_PIXELS:,} pixels); shrink it, or remove it from the data set")
        if how == CENTER_CROP and size is not None:
            check_center_crop(im.size[0], im.size[1], size, f"{name}: {f}")
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    if len(sizes) > 1 and size is None:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise GenrepError(f"{name}: images come in {len(sizes)} sizes (e.g. {h1}x{w1} and {h2}x{w2}); pass "
                          f"image_size=N (data.image_size=N) to resize them all to NxN")
    # a centre crop is made as each file is decoded (64,274 ImageNet photographs at 256 px, not at their own sizes)
    crop = (lambda im: center_crop_pil(im, size)) if how == CENTER_CROP and size is not None else None
    images = [_pil_decode(f, mode, str(f), crop) for f, _ in files_of[split]]
    labels = torch.tensor([c for _, c in files_of[split]], dtype=torch.int64)
    return _stack(images, size, name, how), labels, classes, f"folder:{os.path.abspath(root)}"
